"""The weights artifact: sharded safetensors + ``manifest.json``.

Written by the weights stage (seeded init or checkpoint import), read by every later stage and by
the serving bundles. The manifest records each tensor's shard, each shard's sha256 and the
parameter counts, so later stages fingerprint the weights by reading one small file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from grc.errors import StageError
from grc.model.gr import GRModel
from grc.model.params import ParamSpec, all_params, init_tensor
from grc.model.tables import Tables
from grc.safetensors_io import TORCH_TO_ST, TensorEntry, memmap_tensor, read_header, to_float32, write_streaming
from grc.spec.schema import InitConfig, ModelConfig, WeightsConfig

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
Progress = Callable[[int, int], None]


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
    manifest_shards, tensors = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        digest = write_streaming(out / fname, shard, {"format": "pt"})
        for e in shard:
            tensors[e.name] = {"shape": list(e.shape), "dtype": e.dtype, "shard": fname}
            done += e.nbytes
        if progress:
            progress(done, total)
        manifest_shards.append({"file": fname, "sha256": digest, "bytes": (out / fname).stat().st_size})
    index = {"metadata": {"total_size": total}, "weight_map": {n: t["shard"] for n, t in tensors.items()}}
    (out / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    counts = {"dense": 0, "embedding": 0}
    for e in entries:
        kind = "embedding" if e.name.startswith("tables.") else "dense"
        counts[kind] += _numel(e.shape)
    counts["total"] = counts["dense"] + counts["embedding"]
    return {
        "format": "grc-weights/1",
        **meta,
        "block_rows": cfg.table_block_rows,
        "parameters": counts,
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

    def entry(p: ParamSpec) -> TensorEntry:
        dtype = _dtype(init.embedding_dtype if p.kind == "embedding" else init.dtype)
        return TensorEntry(p.name, p.shape, TORCH_TO_ST[dtype], lambda: init_tensor(p, init.seed, init.std, dtype))

    return _write([entry(p) for p in params], out, cfg, {"source": {"init": init.model_dump()}}, progress)


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


def import_checkpoint(
    model: ModelConfig, cfg: WeightsConfig, out: Path, base: Path, progress: Progress | None = None
) -> dict:
    """Map a checkpoint onto grc names; list every missing / unexpected / misshapen key, then fail."""
    assert cfg.checkpoint is not None
    path = cfg.checkpoint if cfg.checkpoint.is_absolute() else base / cfg.checkpoint
    source = _read_checkpoint(path)
    renamed: dict[str, Callable[[], torch.Tensor]] = {}
    for key, load in source.items():
        for old, new in cfg.key_map.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = load
    params = all_params(model, cfg.table_block_rows)
    entries, missing, wrong = [], [], []
    used: set[str] = set()
    for p in params:
        whole = f"tables.{p.table}.weight"
        if p.name in renamed:
            load, used_key, rows = renamed[p.name], p.name, None
        elif p.kind == "embedding" and whole in renamed:
            start = p.block * cfg.table_block_rows
            load, used_key, rows = renamed[whole], whole, (start, start + p.shape[0])
        else:
            missing.append(p.name)
            continue
        used.add(used_key)
        entries.append((p, load, rows))
    loaded: list[TensorEntry] = []
    for p, load, rows in entries:
        tensor = load()
        full_shape = tuple(tensor.shape)
        expected = (model.tables[str(p.table)].vocab_size, p.shape[1]) if rows else p.shape  # rows: a table block
        if full_shape != expected:
            wrong.append(f"{p.name}: expected shape {list(expected)}, checkpoint has {list(full_shape)}")
            continue
        dtype = tensor.dtype if tensor.dtype in TORCH_TO_ST and p.kind == "embedding" else torch.float32
        loaded.append(TensorEntry(p.name, p.shape, TORCH_TO_ST[dtype], _slice(load, rows, dtype)))
    unexpected = sorted(set(renamed) - used)
    if missing or unexpected or wrong:
        lines = [f"weights.checkpoint: {path} does not match the model:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {w}" for w in wrong]
        raise StageError("\n".join(lines))
    return _write(loaded, out, cfg, {"source": {"checkpoint": str(path), "key_map": cfg.key_map}}, progress)


def _slice(
    load: Callable[[], torch.Tensor], rows: tuple[int, int] | None, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        tensor = load()
        return (tensor[rows[0] : rows[1]] if rows else tensor).to(dtype).contiguous()

    return produce


# --------------------------------------------------------------------------- reading
def read_manifest(weights_dir: Path) -> dict:
    return json.loads((weights_dir / MANIFEST).read_text())


def load_model(model_cfg: ModelConfig, weights_dir: Path) -> GRModel:
    """The dense modules with their weights, in float32 (the reference precision)."""
    manifest = read_manifest(weights_dir)
    model = GRModel(model_cfg)
    state = {}
    headers = {}
    for name in model.state_dict():
        shard = weights_dir / manifest["tensors"][name]["shard"]
        if shard not in headers:
            headers[shard] = read_header(shard)
        header, start = headers[shard]
        info = header[name]
        state[name] = to_float32(memmap_tensor(shard, info, start), info["dtype"]).reshape(info["shape"]).clone()
    model.load_state_dict(state)
    return model.eval()


def open_tables(model_cfg: ModelConfig, weights_dir: Path) -> Tables:
    """Memory-mapped tables: a lookup reads only the rows it asks for."""
    manifest = read_manifest(weights_dir)
    block_rows = manifest["block_rows"]
    headers: dict[Path, tuple[dict, int]] = {}
    blocks: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name in sorted(n for n in manifest["tensors"] if n.startswith("tables.")):
        table = name.split(".")[1]
        shard = weights_dir / manifest["tensors"][name]["shard"]
        if shard not in headers:
            headers[shard] = read_header(shard)
        header, start = headers[shard]
        info = header[name]
        blocks.setdefault(table, []).append(_memmap_rows(memmap_tensor(shard, info, start), info["dtype"]))
    vocab = {t: c.vocab_size for t, c in model_cfg.tables.items()}
    return Tables(blocks, vocab, block_rows)


def _memmap_rows(array, st_dtype: str) -> Callable[[torch.Tensor], torch.Tensor]:  # type: ignore[no-untyped-def]
    return lambda rows: to_float32(array[rows.numpy()], st_dtype)
