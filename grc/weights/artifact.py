"""The weights artifact: sharded safetensors + ``manifest.json``.

Written by the weights stage (seeded init or checkpoint import), read by every later stage and by
the serving bundles. The manifest records each tensor's shard, each shard's sha256 and the
parameter counts, so later stages fingerprint the weights by reading one small file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from grc.errors import StageError
from grc.model.gr import GRModel
from grc.model.params import ParamSpec, all_params, init_tensor
from grc.model.tables import QUANTIZED, Tables, dequantize_rows, factor_names, quantize_rows
from grc.spec.schema import InitConfig, ModelConfig, WeightsConfig
from grc.weights.safetensors_io import TORCH_TO_ST, TensorEntry, memmap_tensor, read_header, to_float32, write_streaming

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
# What stages that never look up a table read of this artifact (export, aoti): each dense tensor's
# shape, dtype and sha256 (of its own bytes, not its shard's), so a change of table precision
# leaves this file byte-identical and those stages' cache keys unchanged.
DENSE_VIEW = "dense.json"
FLOAT_TABLES = (torch.float32, torch.bfloat16, torch.float16)
CODE_DTYPE = {"int8": "I8", "fp8_e4m3": "F8_E4M3"}
Progress = Callable[[int, int], None]


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_table(name: str) -> bool:
    return name.startswith("tables.")


def is_factor(name: str) -> bool:
    """A quantized block's per-row scale / offset: bytes of the table, not parameters."""
    return is_table(name) and name.count(".") == 3


def table_entries(p: ParamSpec, dtype: str, load: Callable[[], torch.Tensor]) -> list[TensorEntry]:
    """One table block as stored in ``dtype``: one tensor for float dtypes; the codes and their
    per-row factors for quantized ones (quantized once, when the first of them is written)."""
    if dtype not in QUANTIZED:
        want = _dtype(dtype)
        return [TensorEntry(p.name, p.shape, TORCH_TO_ST[want], lambda: load().to(want).contiguous())]
    memo: dict[str, torch.Tensor] = {}

    def part(key: str) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            if key not in memo:
                memo.update(quantize_rows(load(), dtype, p.name))
            return memo.pop(key)  # dropped once written: one block's codes in memory at a time

        return produce

    entries = [TensorEntry(p.name, p.shape, CODE_DTYPE[dtype], part("codes"))]
    return entries + [TensorEntry(f"{p.name}.{f}", (p.shape[0],), "F16", part(f)) for f in factor_names(dtype)]


def _shards(entries: list[TensorEntry], limit: int) -> list[list[TensorEntry]]:
    """Greedy packing in a fixed order: the same spec always gives the same shard layout."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _write(entries: list[TensorEntry], out: Path, cfg: WeightsConfig, meta: dict, progress: Progress | None) -> dict:
    shards = _shards(entries, cfg.shard_size_mb << 20)
    total = sum(e.nbytes for e in entries)
    done = 0
    manifest_shards: list[dict] = []
    own_digests: dict[str, str] = {}
    tensors: dict[str, dict] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        digest = write_streaming(out / fname, shard, {"format": "pt"}, own_digests)
        for e in shard:
            tensors[e.name] = {"shape": list(e.shape), "dtype": e.dtype, "shard": fname}
            done += e.nbytes
        if progress:
            progress(done, total)
        manifest_shards.append({"file": fname, "sha256": digest, "bytes": (out / fname).stat().st_size})
    index = {"metadata": {"total_size": total}, "weight_map": {n: t["shard"] for n, t in tensors.items()}}
    (out / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    counts, sizes = {"dense": 0, "embedding": 0}, {"dense": 0, "embedding": 0}
    for e in entries:
        kind = "embedding" if is_table(e.name) else "dense"
        counts[kind] += 0 if is_factor(e.name) else _numel(e.shape)
        sizes[kind] += e.nbytes
    counts["total"] = counts["dense"] + counts["embedding"]
    view = {
        "tensors": {
            n: {"shape": t["shape"], "dtype": t["dtype"], "sha256": own_digests[n]}
            for n, t in tensors.items()
            if not is_table(n)
        }
    }
    (out / DENSE_VIEW).write_text(json.dumps(view, indent=1, sort_keys=True) + "\n")
    return {
        "format": "grc-weights/1",
        **meta,
        "block_rows": cfg.table_block_rows,
        "parameters": counts,
        "bytes": sizes,
        "shards": manifest_shards,
        "tensors": tensors,
    }


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_init(
    model: ModelConfig, cfg: WeightsConfig, init: InitConfig, out: Path, progress: Progress | None = None
) -> dict:
    """Seeded random weights; one tensor in memory at a time, so peak memory ~ the largest block."""
    params = all_params(model, cfg.table_block_rows)

    def entries(p: ParamSpec) -> list[TensorEntry]:
        if p.kind == "embedding":  # drawn in float32, then stored (rounded or quantized) in the table dtype
            return table_entries(p, init.embedding_dtype, lambda: init_tensor(p, init.seed, init.std, torch.float32))
        dtype = _dtype(init.dtype)
        return [TensorEntry(p.name, p.shape, TORCH_TO_ST[dtype], lambda: init_tensor(p, init.seed, init.std, dtype))]

    meta = {"source": {"init": init.model_dump()}, "table_dtype": init.embedding_dtype}
    return _write([e for p in params for e in entries(p)], out, cfg, meta, progress)


def _read_checkpoint(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> lazy loader. Never unpickles: safetensors, or torch.load(weights_only=True)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise StageError(f"weights.checkpoint: no checkpoint file at {path}")
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    out[key] = _lazy_safetensor(f, key)
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # the unpickler refuses anything but tensors and containers
                raise StageError(f"weights.checkpoint: {f} is not a weights-only state_dict: {exc}") from None
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            out.update({k: (lambda v=v: v) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def _lazy_safetensor(file: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(key)

    return load


Located = tuple[ParamSpec, Callable[[], torch.Tensor], tuple[int, int] | None]


def locate_checkpoint(
    model: ModelConfig, path: Path, key_map: dict[str, str], block_rows: int
) -> tuple[list[Located], list[str], list[str]]:
    """Each grc parameter's loader in the checkpoint (a table block may be rows of a whole table),
    and the grc names missing from it and the checkpoint keys nothing uses."""
    renamed: dict[str, Callable[[], torch.Tensor]] = {}
    for key, load in _read_checkpoint(path).items():
        for old, new in key_map.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = load
    entries: list[Located] = []
    missing: list[str] = []
    used: set[str] = set()
    for p in all_params(model, block_rows):
        whole = f"tables.{p.table}.weight"
        if p.name in renamed:
            load, used_key, rows = renamed[p.name], p.name, None
        elif p.kind == "embedding" and whole in renamed:
            start = p.block * block_rows
            load, used_key, rows = renamed[whole], whole, (start, start + p.shape[0])
        else:
            missing.append(p.name)
            continue
        used.add(used_key)
        entries.append((p, load, rows))
    return entries, missing, sorted(set(renamed) - used)


def import_checkpoint(
    model: ModelConfig, cfg: WeightsConfig, out: Path, base: Path, progress: Progress | None = None
) -> dict:
    """Map a checkpoint onto grc names; list every missing / unexpected / misshapen key, then fail."""
    assert cfg.checkpoint is not None
    path = cfg.checkpoint if cfg.checkpoint.is_absolute() else base / cfg.checkpoint
    entries, missing, unexpected = locate_checkpoint(model, path, cfg.key_map, cfg.table_block_rows)
    wrong = []
    loaded: list[TensorEntry] = []
    table_dtypes = set()
    for p, load, rows in entries:
        tensor = load()
        full_shape = tuple(tensor.shape)
        expected = (model.tables[str(p.table)].vocab_size, p.shape[1]) if rows else p.shape  # rows: a table block
        if full_shape != expected:
            wrong.append(f"{p.name}: expected shape {list(expected)}, checkpoint has {list(full_shape)}")
            continue
        if p.kind != "embedding":
            loaded.append(TensorEntry(p.name, p.shape, "F32", slice_loader(load, rows, torch.float32)))
            continue
        # tables keep the checkpoint's float dtype unless weights.embedding_dtype asks for another
        kept = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(tensor.dtype, "float32")
        table_dtypes.add(cfg.embedding_dtype or kept)
        loaded += table_entries(p, cfg.embedding_dtype or kept, slice_loader(load, rows, torch.float32))
    if missing or unexpected or wrong:
        lines = [f"weights.checkpoint: {path} does not match the model:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {w}" for w in wrong]
        raise StageError("\n".join(lines))
    meta = {"source": {"checkpoint": str(path), "key_map": cfg.key_map}, "table_dtype": "/".join(sorted(table_dtypes))}
    return _write(loaded, out, cfg, meta, progress)


def slice_loader(
    load: Callable[[], torch.Tensor], rows: tuple[int, int] | None, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        tensor = load()
        return (tensor[rows[0] : rows[1]] if rows else tensor).to(dtype).contiguous()

    return produce


# --------------------------------------------------------------------------- reading
def read_manifest(weights_dir: Path) -> dict:
    return json.loads((weights_dir / MANIFEST).read_text())


def memmap_arrays(weights_dir: Path, manifest: dict, names: list[str]) -> dict[str, tuple[np.ndarray, dict]]:
    """name -> (read-only memory map of its bytes, its safetensors header entry); each shard's header read once."""
    headers: dict[Path, tuple[dict, int]] = {}
    out = {}
    for name in names:
        shard = weights_dir / manifest["tensors"][name]["shard"]
        if shard not in headers:
            headers[shard] = read_header(shard)
        header, start = headers[shard]
        out[name] = (memmap_tensor(shard, header[name], start), header[name])
    return out


def load_model(model_cfg: ModelConfig, weights_dir: Path) -> GRModel:
    """The dense modules with their weights, in float32 (the reference precision)."""
    manifest = read_manifest(weights_dir)
    model = GRModel(model_cfg)
    arrays = memmap_arrays(weights_dir, manifest, list(model.state_dict()))
    state = {
        name: to_float32(array, info["dtype"]).reshape(info["shape"]).clone() for name, (array, info) in arrays.items()
    }
    model.load_state_dict(state)
    return model.eval()


def open_tables(model_cfg: ModelConfig, weights_dir: Path) -> Tables:
    """Memory-mapped tables: a lookup reads (and, for quantized tables, dequantizes) only the rows it asks for."""
    manifest = read_manifest(weights_dir)
    names = sorted(n for n in manifest["tensors"] if is_table(n))
    arrays = memmap_arrays(weights_dir, manifest, names)
    blocks: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name in (n for n in names if not is_factor(n)):
        array, info = arrays[name]
        kind = {code: kind for kind, code in CODE_DTYPE.items()}.get(info["dtype"])
        if kind is None:
            fetch = _memmap_rows(array, info["dtype"])
        else:
            fetch = _quantized_rows(array, {f: arrays[f"{name}.{f}"][0] for f in factor_names(kind)}, kind)
        blocks.setdefault(name.split(".")[1], []).append(fetch)
    vocab = {t: c.vocab_size for t, c in model_cfg.tables.items()}
    return Tables(blocks, vocab, manifest["block_rows"])


def _memmap_rows(array, st_dtype: str) -> Callable[[torch.Tensor], torch.Tensor]:  # type: ignore[no-untyped-def]
    return lambda rows: to_float32(array[rows.numpy()], st_dtype)


def _quantized_rows(codes, factors: dict, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:  # type: ignore[no-untyped-def]
    def fetch(rows: torch.Tensor) -> torch.Tensor:
        at = rows.numpy()
        picked = torch.from_numpy(np.asarray(codes[at]))  # fancy indexing copies just these rows off the map
        picked = picked.view(torch.float8_e4m3fn) if kind == "fp8_e4m3" else picked
        return dequantize_rows(picked, {f: torch.from_numpy(np.asarray(a[at])) for f, a in factors.items()}, kind)

    return fetch
