"""The user-history cache in-process on a CUDA GPU, through grc's Triton kernels: one user's full
forward vs the cached score step, for each spec and dtype, eager and as CUDA graphs, with exactness.

Per spec (default mtgr-small, mtgr-base) and dtype (default bfloat16, then float32), 1 user x history
{1000, max_seq_len - 256 - profile tokens} x candidates {256, 512} (a shape past max_seq_len is
recorded as skipped). Dense model only, the spec's deterministic random init in the dtype, random
tokens; impl "triton" (grc's kernels: hstu_attention for the full forward, hstu_attention_cached for
the cached step). Figures per shape (median of --repeat runs after warm-up, synchronized host clock):

- full_forward_ms: ``GRDense.forward_jagged`` (the model's forward), eager;
- cached_score_ms: ``GRDense.score`` against a cache prefilled with the profile and the history
  (delta 0: only the candidates are new), eager; ``delta10_score_ms``: 10 history events new;
- prefill_ms: the prefill a miss adds (eager);
- graph_uncached_ms / graph_cached_ms: the score step (``run_plan``) captured in a CUDA graph, on an
  empty cache (the whole sequence: what a miss computes) and on the prefilled one. The launch
  overhead of eager PyTorch is the same for both paths, so the graph figures show the device work.

Exactness (fresh random inputs each run): the relative error ||x - ref|| / ||ref|| of the full
forward and of the cached step against the float64 model (the same rounded weights and tokens,
PyTorch reference ops), the cached step vs the full forward, whether the cached step equals the
uncached step bit for bit, and whether a repeated cached step is bit-identical (determinism).
Tolerances: TOLERANCE below. First, on a GPU, the served model's own scorer (``served_check``: a
KIND_GPU instance's CachedScorer on tests/specs/mtgr-tiny.yaml's seeded weights) in float32 and
bfloat16. Results go to one JSON (bench/_common.write_result), rewritten after every shape, so a
run cut short keeps what it measured; --budget-s stops starting new shapes.

    python bench/history_cache_device.py --out $OUT/history-cache-h200.json [--specs mtgr-small,mtgr-base]
    TRITON_INTERPRET=1 python bench/history_cache_device.py --dry-run --out /tmp/x.json   # CPU: tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # grc and kernels from a checkout

from bench._common import write_result
from bench.history_cache import dense_model, timed
from grc.model.gr import GRDense
from grc.model.kv_cache import UserKV
from grc.spec.loader import load_spec
from grc.spec.schema import ModelConfig

TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}  # rel. error vs float64; bf16: 8 mantissa bits, tanh.approx SiLU
NOW = 1_750_000_000
DRY_SHAPES = ((24, 8), (40, 16))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def graphed(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``step`` captured in a CUDA graph (after warm-up on a side stream, which also autotunes the
    kernels); the returned function replays it and returns the graph's output buffer."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class User:
    """One random user: tokens [n, D] (profile, history, candidates) and timestamps, on the device."""

    def __init__(self, model: GRDense, history: int, candidates: int, device: torch.device, dtype: torch.dtype):
        cfg = model.cfg
        self.profile = len(cfg.profile)
        self.n = self.profile + history + candidates
        self.candidates = candidates
        self.tokens = torch.randn(self.n, cfg.d_model, device=device).to(dtype)
        gaps = (2.0 ** (torch.rand(history) * 21)).to(torch.int64).sort(descending=True).values
        stamps = torch.cat([torch.full((self.profile,), NOW), NOW - gaps, torch.full((candidates,), NOW)])
        self.stamps = stamps.to(device)
        self.nc = torch.tensor([candidates], device=device)
        self.nc_host = torch.tensor([candidates])  # the cached step gets host counts, as the served model passes them

    def offsets(self, rows: int) -> torch.Tensor:
        return torch.tensor([0, rows], device=self.tokens.device)

    def full(self, model: GRDense, impl: str) -> torch.Tensor:
        return model.forward_jagged(self.tokens, self.offsets(self.n), self.nc, self.stamps, impl)[-self.candidates :]

    def prefill(self, model: GRDense, cached: int, impl: str) -> UserKV:
        return model.prefill(self.tokens[:cached], self.stamps[:cached], self.profile, NOW, impl)

    def score(self, model: GRDense, cache: UserKV, impl: str) -> torch.Tensor:
        cached = cache.length
        new = self.tokens[cached:]
        offsets = torch.tensor([0, new.shape[0]])
        return model.score([cache], new, offsets, self.nc_host, self.stamps[cached:], [NOW], impl)[0]

    def planned(self, model: GRDense, cache: UserKV, impl: str) -> Callable[[], torch.Tensor]:
        """The score step's device half (run_plan) for this user on ``cache``, its plan built once."""
        cached = cache.length
        plan = model.plan_score([cache], self.offsets(self.n - cached), self.nc, self.stamps[cached:], [NOW])
        tokens = self.tokens[cached:]
        return lambda: model.run_plan(plan, [cache], tokens, impl)[0]


def case(
    model: GRDense, oracle: GRDense, history: int, candidates: int, args: argparse.Namespace, dtype: str
) -> dict[str, Any]:
    cfg = model.cfg
    device = next(model.parameters()).device
    user = User(model, history, candidates, device, getattr(torch, dtype))
    if user.n > cfg.hstu.max_seq_len:
        return {"skipped": f"{user.n} tokens exceed max_seq_len {cfg.hstu.max_seq_len}"}
    impl, repeat = "triton", args.repeat
    row: dict[str, Any] = {"tokens": user.n, "cached_tokens": user.n - candidates}
    with torch.no_grad():
        cache = user.prefill(model, user.n - candidates, impl)
        row["cache_mb"] = cache.nbytes / (1 << 20)
        full_s, full = timed(lambda: user.full(model, impl), repeat, device)
        score_s, cached = timed(lambda: user.score(model, cache, impl), repeat, device)
        prefill_s, _ = timed(lambda: user.prefill(model, user.n - candidates, impl).keys[0], repeat, device)
        delta_cache = user.prefill(model, user.n - candidates - 10, impl)
        delta_s, delta_scores = timed(lambda: user.score(model, delta_cache, impl), repeat, device)
        empty = model.empty_cache(user.profile, user.tokens)
        uncached_step = user.planned(model, empty, impl)
        cached_step = user.planned(model, cache, impl)
        uncached, again = uncached_step(), cached_step()
        row.update(
            full_forward_ms=full_s * 1e3,
            cached_score_ms=score_s * 1e3,
            speedup=full_s / score_s,
            delta10_score_ms=delta_s * 1e3,
            delta10_speedup=full_s / delta_s,
            prefill_ms=prefill_s * 1e3,
        )
        if device.type == "cuda":
            try:
                graph_full_s, _ = timed(graphed(uncached_step), repeat, device)
                graph_cached_s, _ = timed(graphed(cached_step), repeat, device)
                row.update(
                    graph_uncached_ms=graph_full_s * 1e3,
                    graph_cached_ms=graph_cached_s * 1e3,
                    graph_speedup=graph_full_s / graph_cached_s,
                )
            except Exception as err:  # recorded, not hidden: the eager figures stand without it
                row["graph_error"] = f"{type(err).__name__}: {err}"[:500]
        else:
            row["graph_skipped"] = "no CUDA device (CUDA graphs need one)"
        ref = oracle.forward_jagged(user.tokens.double(), user.offsets(user.n), user.nc, user.stamps, "pytorch")[
            -candidates:
        ]
    row.update(
        rel_err_full_vs_fp64=rel_err(full, ref),
        rel_err_cached_vs_fp64=rel_err(cached, ref),
        rel_err_delta10_vs_fp64=rel_err(delta_scores, ref),
        rel_err_cached_vs_full=rel_err(cached, full),
        max_abs_cached_vs_full=float((cached.double() - full.double()).abs().max()),
        bit_identical_cached_vs_uncached_step=bool(torch.equal(cached, uncached)),
        bit_identical_repeat=bool(torch.equal(cached, again)),
        tolerance=TOLERANCE[dtype],
    )
    worst = max(row["rel_err_full_vs_fp64"], row["rel_err_cached_vs_fp64"], row["rel_err_delta10_vs_fp64"])
    row["ok"] = bool(worst < TOLERANCE[dtype] and ref.abs().max() > 0 and row["bit_identical_repeat"])
    return row


def served_check(cfg: ModelConfig, weights: Path, dtype: str, seed: int, device: str | None = None) -> dict[str, Any]:
    """The served model's scorer (``CachedScorer`` of grc/serving/triton/models/history_cached.py, as a
    KIND_GPU instance builds it) on the GPU: a user's first visit (a miss, prefilled on the GPU), a
    longer visit (a hit: 10 new events + candidates), the same request without user_id (uncached),
    each vs the float64 PyTorch model; and where the entry lives and how its bytes are counted.
    ``device``: default the GPU (instance_device); "cpu" for a dry run (the kernels under the Triton
    interpreter, in float32: a CPU instance's dtype)."""
    from grc.model.sample import random_batch
    from grc.serving.common import request as rq
    from grc.serving.common.validate import parse
    from grc.serving.triton.check import Reference
    from grc.serving.triton.models.history_cached import CachedScorer, instance_device

    full = rq.user_request(random_batch(cfg, 1, 30, 5, torch.Generator().manual_seed(seed)), 0, cfg)
    history = {rq.history_input(t) for t in cfg.history} | {rq.HISTORY_TIME}
    earlier = {k: a[:, :20] if k in history else a for k, a in full.items()}
    reference = Reference(cfg, weights)
    where = device or instance_device(True, 0)
    scorer = CachedScorer(cfg, weights, 1 << 24, None, where, "digest", dtype, impl="triton")
    user = np.array([3], np.int64)
    out: dict[str, Any] = {"dtype": str(scorer.dtype), "impl": scorer.impl, "tolerance": TOLERANCE[dtype]}
    for name, arrays, ids in (("miss", earlier, user), ("hit", full, user), ("uncached", full, None)):
        got = scorer.score(parse(dict(arrays), cfg, True), ids)
        out[f"rel_err_{name}_vs_fp64"] = rel_err(torch.from_numpy(got), torch.from_numpy(reference.scores(arrays)))
    stats = scorer.cache.stats()
    entry = scorer.cache.lookup((scorer.namespace, 3), lambda _: True)
    out.update(
        hits=stats.hits,
        misses=stats.misses,
        bytes_counted=stats.bytes,
        bytes_held=scorer.cache.stored_bytes(),
        kv_devices=sorted({str(k.device) for k in entry.kv.keys}) if entry else [],
        kv_dtypes=sorted({str(k.dtype) for k in entry.kv.keys}) if entry else [],
    )
    worst = max(out[f"rel_err_{n}_vs_fp64"] for n in ("miss", "hit", "uncached"))
    out["ok"] = bool(
        worst < TOLERANCE[dtype]
        and (stats.hits, stats.misses) == (1, 1)
        and stats.bytes == out["bytes_held"] > 0
        and out["kv_devices"] == [str(scorer.device)]
        and out["kv_dtypes"] == [str(scorer.dtype)]
    )
    return out


def served_checks(repo: Path, device: str | None) -> list[dict[str, Any]]:
    """served_check on tests/specs/mtgr-tiny.yaml's seeded weights, written to a temporary folder."""
    import json
    import tempfile

    from grc.weights import write_init

    spec = load_spec(repo / "tests" / "specs" / "mtgr-tiny.yaml").spec
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp)
        manifest = write_init(spec.model, spec.weights, spec.weights.source, weights)  # type: ignore[arg-type]
        (weights / "manifest.json").write_text(json.dumps(manifest))
        seed = int(torch.randint(0, 1 << 30, ()).item())
        return [served_check(spec.model, weights, dtype, seed, device) for dtype in ("float32", "bfloat16")]


def session_run(repo: Path, args: argparse.Namespace, device: torch.device, dtype: str, started: float) -> Any:
    """bench/history_cache_session.py's workload on the served scorer, on the first of --specs
    (dry run: mtgr-tiny, small shapes), --session-users users x 5 visits, each of its three modes
    cut at --session-budget-s seconds (its own budget: it runs whatever --budget-s says)."""
    from bench import history_cache_session as hs

    if args.session_users <= 0:
        return "skipped: --session-users 0"
    name = args.specs.split(",")[0]
    spec = repo / "tests" / "specs" / "mtgr-tiny.yaml" if args.dry_run else repo / "specs" / f"{name}.yaml"
    flags = ["--spec", str(spec), "--users", str(args.session_users)]
    if args.dry_run:
        flags += ["--users", "6", "--base", "20", "--delta", "3", "--candidates", "4"]
    workload = hs.parser().parse_args(flags)
    try:
        return {"workload": vars(workload), **hs.session(workload, str(device), dtype, args.session_budget_s)}
    except Exception as err:
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def shapes(spec_model: Any, dry_run: bool) -> list[tuple[int, int]]:
    if dry_run:
        return list(DRY_SHAPES)
    longest = spec_model.hstu.max_seq_len - 256 - len(spec_model.profile)
    return [(h, c) for h in (1000, longest) for c in (256, 512)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default="mtgr-small,mtgr-base", help="names under specs/ (comma-separated)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=150.0, help="no new shape starts after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 repeats (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--session-users", type=int, default=200, help="session workload users (0: none)")
    ap.add_argument("--session-budget-s", type=float, default=10.0, help="seconds per session mode, at most")
    ap.add_argument("--out", required=True, help="result file (.json)")
    args = ap.parse_args()
    started = time.monotonic()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("history_cache_device.py: torch sees no CUDA device (use --dry-run on a CPU)")
    if args.dry_run:
        args.repeat = 2
    device = torch.device("cuda" if cuda else "cpu")
    result: dict[str, Any] = {
        "kernels_on": "the GPU" if cuda else "the CPU, Triton interpreter (dry run: the flow, not the speed)",
        "impl": "triton",
        "repeat": args.repeat,
        "timing": "median of --repeat runs after a warm-up run, torch.cuda.synchronize around each, host clock",
        "dry_run": args.dry_run,
        "cases": [],
        "skipped": [],
    }
    repo = Path(__file__).resolve().parents[1]
    try:  # dry run: on the CPU, float32, the kernels under the interpreter
        result["served_check"] = served_checks(repo, None if cuda else "cpu")
    except Exception as err:
        result["served_check"] = [{"error": f"{type(err).__name__}: {err}"[:500], "ok": False}]
        traceback.print_exc()
    write_result(Path(args.out), result)
    print(f"[{time.monotonic() - started:6.1f} s] served model: {result['served_check']}", flush=True)
    for turn, dtype in enumerate(args.dtypes.split(",")):
        if turn == 1:  # after the first dtype's shapes: the session workload, then the other dtypes
            result["session"] = session_run(repo, args, device, args.dtypes.split(",")[0], started)
            write_result(Path(args.out), result)
        for name in args.specs.split(","):
            spec = load_spec(repo / "specs" / f"{name}.yaml").spec
            model = dense_model(spec.model, device, getattr(torch, dtype))
            oracle = copy.deepcopy(model).double()  # the same rounded weights, in float64
            for history, candidates in shapes(spec.model, args.dry_run):
                label = f"{name} {dtype} {history}x{candidates}"
                elapsed = time.monotonic() - started
                if elapsed > args.budget_s:
                    result["skipped"].append(f"{label}: budget {args.budget_s:.0f} s spent ({elapsed:.0f} s)")
                    print(f"[{elapsed:6.1f} s] SKIP {label}: budget spent", flush=True)
                    continue
                row: dict[str, Any] = {"spec": name, "dtype": dtype, "history": history, "candidates": candidates}
                try:
                    row.update(case(model, oracle, history, candidates, args, dtype))
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {err}"[:500]
                    traceback.print_exc()
                result["cases"].append(row)
                write_result(Path(args.out), result)
                print(f"[{time.monotonic() - started:6.1f} s] {label}: {summary(row)}", flush=True)
            del model, oracle
            if cuda:
                torch.cuda.empty_cache()
    write_result(Path(args.out), result)
    print(f"wrote {args.out}")
    for row in result["cases"]:
        print(f"{row['spec']:>10} {row['dtype']:>8} {row['history']:>5}x{row['candidates']:<4} {summary(row)}")


def summary(row: dict[str, Any]) -> str:
    if "skipped" in row or "error" in row:
        return row.get("skipped") or row["error"]
    graph = (
        f"graph {row['graph_uncached_ms']:.3f} -> {row['graph_cached_ms']:.3f} ms ({row['graph_speedup']:.1f}x)"
        if "graph_speedup" in row
        else row.get("graph_error") or row.get("graph_skipped", "")
    )
    return (
        f"full {row['full_forward_ms']:.3f} ms, cached {row['cached_score_ms']:.3f} ms ({row['speedup']:.1f}x), "
        f"+10 events {row['delta10_speedup']:.1f}x, {graph}; rel err vs fp64 full {row['rel_err_full_vs_fp64']:.1e} "
        f"cached {row['rel_err_cached_vs_fp64']:.1e}; bit-identical to the uncached step "
        f"{row['bit_identical_cached_vs_uncached_step']}, repeat {row['bit_identical_repeat']}; ok {row['ok']}"
    )


if __name__ == "__main__":
    main()
