"""Checks of the fused request path shared by the in-process tests (reference ops) and the Triton
interpreter worker (grc's kernels, TRITON_INTERPRET=1 set before anything imports triton): each
returns plain numbers the test asserts on."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grc.serving.ranker import buckets as bk
from grc.serving.ranker import dense as dn
from grc.spec.loader import load_spec
from grc.spec.schema import ModelConfig, Spec

REPO = Path(__file__).resolve().parents[2]
MTGR_TINY = REPO / "tests" / "specs" / "mtgr-tiny.yaml"
# Padding adds rows to every batched matmul: the real rows may differ in the last bits (blocking),
# never more. float64 reference ops: 1e-12; float32 kernels: 1e-5; bfloat16 (GPU): one rounding, 1e-2.
PAD_TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-2}


def tiny_model() -> ModelConfig:
    return load_spec(MTGR_TINY).spec.model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def padding_errors(
    impl: str, dtype: torch.dtype, seed: int, device: str = "cpu", graphs: bool = False
) -> dict[str, Any]:
    """Scores of a ragged batch run unpadded vs padded into buckets (the default plan's choice, one
    with pad users and empty users, one that misses): per bucket the real rows' relative error,
    the padded tokens counted, and whether every row of the padded run (pad and empty users too)
    is finite. ``graphs``: each bucket replayed from a CUDA graph captured beforehand."""
    from grc.aoti.inputs import random_inputs, seeded_dense
    from grc.aoti.model import JaggedDense

    cfg = tiny_model()
    seq = cfg.hstu.max_seq_len
    dev = torch.device(device)
    dense = seeded_dense(cfg, seed).to(device=dev, dtype=dtype)
    fn = JaggedDense(dense, impl=impl).eval()
    gen = torch.Generator().manual_seed(seed)
    plan = bk.default_plan(4, seq)
    rungs = {b.tokens for b in plan}
    inputs = random_inputs(cfg, 3, 40, 12, gen)
    while inputs.args()[0].shape[0] in rungs:  # a batch exactly on a rung needs no padding: draw another
        inputs = random_inputs(cfg, 3, 40, 12, gen)
    inputs = inputs.to(dev, dtype)
    args = inputs.args()
    total, users = args[0].shape[0], inputs.users
    buckets = {
        "default_plan": bk.choose(plan, users, total, seq),
        "pad_and_empty_users": bk.Bucket(tokens=total + 2 * seq + 5, users=users + 6),
    }
    out: dict[str, Any] = {}
    with torch.no_grad():
        base = fn(*args)
        out["unpadded_finite"] = bool(torch.isfinite(base).all())
        for name, bucket in buckets.items():
            assert bucket is not None
            stats = dn.GraphStats()
            runner = dn.Bucketed(fn, [bucket], seq, cfg.d_model, dtype, dev, graphs, stats)
            got = runner(*args).clone()
            again = runner(*args)  # a second replay: the same scores (nothing stale in the static buffers)
            full = fn(*bk.pad(bucket, seq, *args))
            out[name] = {
                "rel_err": _rel(got, base),
                "replay_equal": bool(torch.equal(got, again)),
                "padded_tokens": stats.padded_tokens,
                "expected_padding": 2 * (bucket.tokens - total),
                "all_rows_finite": bool(torch.isfinite(full).all()),
                "misses": stats.graph_misses,
                "hits": stats.graph_hits,
            }
        stats = dn.GraphStats()
        small = dn.Bucketed(fn, [bk.Bucket(tokens=total - 1, users=8)], seq, cfg.d_model, dtype, dev, graphs, stats)
        out["miss"] = {
            "rel_err": _rel(small(*args), base),
            "misses": stats.graph_misses,
            "padded_tokens": stats.padded_tokens,
        }
    return out


def gather_errors(seed: int, device: str = "cpu") -> dict[str, bool]:
    """kernels.gather.gather_rows vs index_select, bit for bit, for every table dtype (and 1-D factors);
    on CUDA the tables sit in pinned host memory and the ids and rows on the GPU."""
    from kernels.gather import gather_rows

    def gather(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if device == "cpu":
            return gather_rows(t, ids)
        return gather_rows(t.pin_memory(), ids.to(device)).cpu()

    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(37, 19, generator=gen)
    ids = torch.randint(0, 37, (23,), generator=gen)
    ids[:2] = torch.tensor([0, 36])  # the first and last rows
    tables = {
        "float32": base,
        "bfloat16": base.bfloat16(),
        "float16": base.half(),
        "int8": (base * 40).clamp(-128, 127).to(torch.int8),
        "fp8_e4m3": base.to(torch.float8_e4m3fn),
        "fp16_factors_1d": base[:, 0].half(),
        "wide_rows": torch.randn(37, 1500, generator=gen),
    }
    return {
        name: bool(
            torch.equal(
                gather(t, ids).view(torch.uint8) if t.dtype == torch.float8_e4m3fn else gather(t, ids),
                t.index_select(0, ids).view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.index_select(0, ids),
            )
        )
        for name, t in tables.items()
    } | {"empty_ids": gather(base, ids[:0]).shape == (0, 19)}


def gather_concat_errors(seed: int, device: str = "cpu") -> dict[str, bool]:
    """kernels.gather.gather_concat vs torch.cat of index_select (+ the extra columns) cast to float32, bit for bit:
    1-4 tables of mixed float dtypes, dims past the kernel's column block, with and without extra columns, row counts
    off the row block and zero. On CUDA the tables sit in pinned host memory (the gather reads through UVA) and on the
    device alike."""
    from kernels.gather import MAX_PARTS, gather_concat

    gen = torch.Generator().manual_seed(seed)
    kinds = [(torch.bfloat16, 3), (torch.float16, 200), (torch.float32, 16), (torch.bfloat16, 129)][:MAX_PARTS]
    places = ("device", "pinned") if device != "cpu" else ("cpu",)
    out = {}
    for parts, extra_cols, n in itertools.product(range(1, MAX_PARTS + 1), (0, 16), (0, 1, 37)):
        tables = [torch.randn(53, dim, generator=gen).to(dtype) for dtype, dim in kinds[:parts]]
        ids = [torch.randint(0, 53, (n,), generator=gen) for _ in tables]
        ids[0][:1] = 52  # the last row
        extra = [torch.randn(n, extra_cols, generator=gen)] if extra_cols else []
        want = torch.cat([t[i] for t, i in zip(tables, ids, strict=True)] + extra, -1).float()
        side = extra[0].to(device) if extra else None
        for place in places:
            held = [t.pin_memory() if place == "pinned" else t.to(device) for t in tables]
            got = gather_concat(held, [i.to(device) for i in ids], side, torch.float32)
            out[f"{parts} tables, extra {extra_cols}, {n} rows, {place}"] = torch.equal(got.cpu(), want)
    return out


def table_matches(
    weights_dir: Path, cfg: ModelConfig, placement: str, seed: int, device: str = "cpu"
) -> dict[str, bool]:
    """DeviceTables vs the memory-mapped lookups, bit for bit. On CPU its tensors stay on the CPU and
    ``placement`` picks the gather; on CUDA the tables load as that placement puts them."""
    from grc.serving.ranker.tables import DeviceTables, _load, open_lookup
    from grc.weights import open_tables

    mapped = open_tables(cfg, weights_dir)
    dev = torch.device(device)
    ours = (
        DeviceTables(_load(weights_dir, dev), placement, dev)
        if dev.type == "cpu"
        else open_lookup(cfg, weights_dir, dev, placement, 1, lambda m: None)
    )
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, table in cfg.tables.items():
        ids = torch.randint(0, table.vocab_size, (50,), generator=gen)
        ids[0] = table.vocab_size - 1
        same = torch.equal(ours.lookup(name, ids.to(dev)).cpu(), mapped.lookup(name, ids))
        # straight to the model's dtype (one cast) == through float32, both lookups
        half = mapped.lookup(name, ids).to(torch.bfloat16)
        same = same and torch.equal(mapped.lookup(name, ids, torch.bfloat16), half)
        same = same and torch.equal(ours.lookup(name, ids.to(dev), torch.bfloat16).cpu(), half)
        # as stored (None), cast after: the same bits as the cast lookup (Ranker._tokens concatenates, then casts)
        full = mapped.lookup(name, ids)
        stored = ours.lookup(name, ids.to(dev), None).cpu(), mapped.lookup(name, ids, None)
        out[name] = same and all(torch.equal(rows.float(), full) for rows in stored)
    # a kind's tables at once (the Ranker's lookups): one kernel where it runs (float tables, on CUDA or under the
    # interpreter), else None; the same bits as the tables one by one, concatenated
    names = list(cfg.tables)[:4]
    kind_ids = [torch.randint(0, cfg.tables[n].vocab_size, (31,), generator=gen) for n in names]
    joined = ours.lookup_concat(names, [i.to(dev) for i in kind_ids], None, torch.float32)
    want = torch.cat([mapped.lookup(n, i) for n, i in zip(names, kind_ids, strict=True)], -1)
    out["lookup_concat"] = joined is None or torch.equal(joined.cpu(), want)
    return out


def fused_params(spec: Spec, backend: str) -> dict[str, str]:
    """The config.pbtxt parameters the bundle writes for a fused model of ``backend``."""
    from grc.serving.triton.fused_bundle import fused_config

    msg = fused_config(spec, "m", backend, None)
    return {k: v.string_value for k, v in msg.parameters.items()}


def ranker_errors(
    spec_path: Path,
    weights_dir: Path,
    backend: str,
    seed: int,
    model_dir: Path,
    device: str = "cpu",
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Ranker.from_model_dir on requests of one and of several users vs the float64 reference: worst
    relative error of the scores, and whether each response is consistent (check_response, with the
    served tolerance: float32 on CPU, the dense dtype's on a GPU). ``params``: a built model's
    config.pbtxt parameters (default: what the bundle would write for ``backend``)."""
    from grc.serving.common import request as rq
    from grc.serving.ranker.ranker import Ranker
    from grc.serving.triton import check, load
    from grc.stages.aoti import tolerance as aoti_tolerance

    spec = load_spec(spec_path).spec
    model_dir.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "weights").exists():
        (model_dir / "weights").symlink_to(weights_dir)
    params = params or fused_params(spec, backend)
    ranker = Ranker.from_model_dir(model_dir, device, params, log=lambda m: None)
    reference = check.Reference(spec.model, weights_dir)
    tolerance = aoti_tolerance(spec, params["dtype"] if device.startswith("cuda") else "float32")
    weights = rq.rank_weights(spec.model, spec.bundles.triton)
    pool = load.request_pool(spec.model, 6, seed=seed)
    requests = [*pool[:4], rq.stack_requests([pool[4], pool[4]])]  # the last: 2 users in one request
    outs = ranker.rank([ranker.check(dict(r)) for r in requests])
    worst, problems = 0.0, []
    for r, o in zip(requests, outs, strict=True):
        expected = reference.scores(r)
        worst = max(worst, float(np.abs(o["scores"] - expected).max() / np.abs(expected).max()))
        problems += check.check_response(
            o, expected, r, spec.model, weights, spec.bundles.triton.top_k, tolerance
        ).problems
    return {
        "rel_err": worst,
        "problems": problems,
        "stats": ranker.stats(),
        "dtypes": {k: str(v.dtype) for k, v in outs[-1].items()},
        "shapes": {k: list(v.shape) for k, v in outs[-1].items()},
    }


def assert_padding_exact(result: dict[str, Any], tol: float, seed: int, graphs: bool = False) -> None:
    assert result["unpadded_finite"], f"seed={seed}"
    for name in ("default_plan", "pad_and_empty_users"):
        r = result[name]
        assert r["rel_err"] <= tol, f"seed={seed} {name}: a real user's scores changed by {r['rel_err']:.2e}"
        assert r["padded_tokens"] == r["expected_padding"] > 0 and r["misses"] == 0, (name, r)
        assert r["replay_equal"] and r["hits"] == (2 if graphs else 0), (name, r)
        assert r["all_rows_finite"], f"seed={seed} {name}: a padding or empty user produced NaN/inf"
    assert result["miss"]["misses"] == 1 and result["miss"]["padded_tokens"] == 0 and result["miss"]["rel_err"] == 0


def assert_ranker(result: dict[str, Any], tol: float, seed: int) -> None:
    assert result["rel_err"] <= tol and not result["problems"], f"seed={seed}: {result}"
    assert result["stats"]["requests"] == 5 and result["stats"]["users"] == 6 and result["stats"]["rank_us"] > 0
    assert result["dtypes"] == {
        "scores": "float32",
        "ranked_candidates": "int64",
        "ranked_items": "int64",
        "ranked_scores": "float32",
        "ranked_task_scores": "float32",
    }
    assert result["shapes"]["scores"][0] == 2  # the two-user request came back as one response of 2 users


def dump(result: Any) -> str:
    return json.dumps(result)
