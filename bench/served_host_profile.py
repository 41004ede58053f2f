"""Where the fused model's served path spends its HOST time per execute, cached (history cache) vs uncached.

Sessions 14-15 (bench/results/history-cache-notes.md): the served cached session on the H200 was host-bound, ~7 ms
of Python per execute of ~6 users against 1-2 ms of device time, and the cached mode paid more host time than the
uncached one (dense host 2.23 vs 0.57 ms, layout 0.59 vs 0.24 ms per execute). This bench drives the same kind of
session in-process on the CPU, through the very Ranker a fused model's execute() calls (``Ranker.from_model_dir``
with the config parameters the bundle writes), with a model small enough that its compute stays small and the host
bookkeeping stands out:

- a session of returning users: ``--users`` users x ``--visits`` visits, ``--per-execute`` users per execute (one
  request each), each visit ``--delta`` events longer than the last, ``--candidates`` candidates;
- modes: ``cached`` (the requests with user ids: the store's visits, the arena's placement and plan, the cached
  step), ``uncached`` (the same requests without ids: the fused model's whole dense step);
- per mode: host microseconds per execute by phase (the Ranker's PhaseClock, plus ``check``), and under cProfile
  the share of the time in model compute (grc/model, kernels/, torch) vs the serving path's own Python
  (grc/serving/**), with the top own-time functions of grc/serving; and the torch ops each execute dispatches, by
  where (the serving path's own, the lookups and projector, the dense step): on a GPU each is a host-side launch.

Every cached answer is compared with the uncached one of the same request (TOLERANCE: float32 on the CPU 1e-5
relative, bfloat16 on a GPU 0.06), and each mode's with the float64 model (FLOAT64_TOLERANCE), the figures written
before either check can fail (session 24's GPU run: cached vs uncached 0.195 apart, which this tells apart).

With ``--device cuda`` the same on a GPU, in bfloat16 with the Ranker's CUDA graphs and the arena's, as a KIND_GPU
instance serves: there every torch op is a launch, so the phases show what the H200's host pays per execute (the
served session of session 22: layout 1.20 vs 0.25 ms, dense host 1.05 vs 0.39 cached vs uncached, ~0.7 ms more
than this bench's CPU figures explain). There the model's time is its launches (the device runs behind), and the
``fetch`` phase holds the wait for the device.

    python bench/served_host_profile.py [--store arena|copies] [--out bench/results/served-host-profile-cpu.json]
    python bench/served_host_profile.py --device cuda --base 1000 --candidates 256 --max-seq-len 1536 \
        --users 60 --budget-mb 2048 --out $OUT/served-host-profile-h200.json
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result

REPO = Path(__file__).resolve().parents[1]
Arrays = dict[str, np.ndarray]
TOLERANCE = {"float32": 1e-5, "bfloat16": 0.06}  # cached vs uncached, max relative (the CPU's dtype, a GPU's)
# each mode vs the float64 model (check.Reference), max relative per request: the served contract (float32 as
# tests/serving/fused_checks.py's Ranker checks; bfloat16 the GPU specs' aoti tolerance)
FLOAT64_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.06}


def build_ranker(
    folder: Path, store: str, max_seq_len: int, candidates: int, budget_mb: float, device: str = "cpu"
) -> Any:
    """A cached fused Ranker (backend pytorch_kernels) of mtgr-tiny, its sequences and candidates widened, on
    ``device`` (cuda: bfloat16, as the GPU specs serve; the Ranker's CUDA graphs and the arena's, as served)."""
    from grc.serving.ranker.ranker import Ranker
    from grc.serving.triton.fused_bundle import fused_config
    from grc.spec.loader import load_spec
    from tests.conftest import TEST_SPECS, run_build, write_spec

    over: dict[str, Any] = {
        "model.hstu.max_seq_len": max_seq_len,
        "model.max_candidates": candidates,
        "bundles.triton.pipeline": "fused",
        "bundles.triton.backend": "pytorch_kernels",
        "bundles.triton.history_cache": {"enabled": True, "budget_mb": budget_mb, "store": store},
    }
    if device != "cpu":
        over["engine.aoti.dtype"] = "bfloat16"  # the fused model's dense dtype on a GPU (params["dtype"])
    spec_path = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", over)
    run_build(spec_path, only=["weights"])
    model_dir = folder / "m"
    model_dir.mkdir(exist_ok=True)
    if not (model_dir / "weights").exists():
        (model_dir / "weights").symlink_to(folder / "artifacts" / "mtgr-tiny" / "weights")
    spec = load_spec(spec_path).spec
    msg = fused_config(spec, "m", "pytorch_kernels", None, 0)
    params = {k: v.string_value for k, v in msg.parameters.items()}
    said: list[str] = []
    ranker = Ranker.from_model_dir(model_dir, device, params, log=said.append)
    return spec, ranker, said


def session(
    cfg: Any, users: int, visits: int, base: int, delta: int, candidates: int
) -> list[list[tuple[int, Arrays]]]:
    """Per visit k, every user's k-th request (``batches`` cuts them into executes)."""
    from bench.history_cache_session import user_visits

    per_user = [user_visits(cfg, u, base, visits, delta, candidates, 60) for u in range(users)]
    return [[(u, per_user[u][k]) for u in range(users)] for k in range(visits)]


def batches(rounds: list[list[tuple[int, Arrays]]], per: int) -> list[list[tuple[int, Arrays]]]:
    out = []
    for visit in rounds:
        out += [visit[i : i + per] for i in range(0, len(visit), per)]
    return out


def execute(ranker: Any, batch: list[tuple[int, Arrays]], cached: bool, clock: dict[str, float]) -> list[np.ndarray]:
    """What fused.py's execute() does with the Ranker: check the requests together, rank them in one call."""
    started = time.perf_counter()
    checked = ranker.check_all([{**r, "user_id": np.array([[u]], np.int64)} if cached else dict(r) for u, r in batch])
    clock["check"] += time.perf_counter() - started
    assert all(isinstance(c, dict) for c in checked), checked  # the session's requests are good
    return [o["scores"] for o in ranker.rank(checked)]


def rel(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected| (one request's scores)."""
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def float64_errors(
    cfg: Any, weights_dir: Path, work: list[list[tuple[int, Arrays]]], answers: dict[str, list[np.ndarray]]
) -> dict[str, list[float]]:
    """Per mode, the worst request's scores of each visit (the session's first visits are the cached mode's misses,
    the later ones its hits) against the PyTorch model in float64 (check.Reference, on the CPU): which mode, and
    which kind of visit, strays where cached and uncached disagree."""
    from grc.serving.triton import check

    reference = check.Reference(cfg, weights_dir)
    requests = [(u, r) for batch in work for u, r in batch]
    expected = [reference.scores(dict(r)) for _, r in requests]
    visit_of: dict[int, int] = {}
    visits = []  # each request's visit number: the n-th request of its user
    for u, _ in requests:
        visits.append(visit_of.get(u, 0))
        visit_of[u] = visits[-1] + 1
    out = {}
    for mode, got in answers.items():
        worst = [0.0] * (max(visits) + 1)
        for k, g, e in zip(visits, got, expected, strict=True):
            worst[k] = max(worst[k], rel(g, e))
        out[mode] = worst
    return out


def profile_split(prof: cProfile.Profile, executes: int, top: int) -> dict[str, Any]:
    """Under cProfile: the model's compute (the cumulative time of ModelTime's wrappers), the host rest, and the top
    own-time functions of grc/serving (with their share of the host rest)."""
    stats = pstats.Stats(prof)
    total = model = 0.0
    serving: list[tuple[float, str]] = []
    for (filename, line, name), (_, _, tottime, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        if filename == __file__ and name == "run":
            model += cum
        if "/grc/serving/" in filename:
            serving.append((tottime, f"{filename.split('/grc/serving/')[-1]}:{line}({name})"))
    host = total - model
    serving.sort(reverse=True)
    per = 1e6 / executes
    return {
        "model_us_per_execute": round(model * per, 1),
        "host_us_per_execute": round(host * per, 1),
        "serving_own_share_of_host": round(sum(t for t, _ in serving) / host, 3),
        "top_serving_own": [
            {"us_per_execute": round(t * per, 1), "share_of_host": round(t / host, 3), "function": n}
            for t, n in serving[:top]
        ],
    }


def cumulative(prof: cProfile.Profile, executes: int, top: int) -> list[dict[str, Any]]:
    """The serving path's functions by cumulative time (what each costs with what it calls)."""
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, name), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "/grc/serving/" in filename:
            rows.append((cum, f"{filename.split('/grc/serving/')[-1]}:{line}({name})"))
    rows.sort(reverse=True)
    return [{"us_per_execute": round(c / executes * 1e6, 1), "function": n} for c, n in rows[:top]]


class ModelTime:
    """Wall seconds inside the model's compute, by wrapping its entry points on this Ranker: the dense runner
    (uncached), ``GRDense.run_scattered`` / ``GRDense.score`` (the cached step's), ``Ranker._tokens`` (lookups and
    the token projector). What is left of an execute's wall time is the serving path's host work."""

    def __init__(self, ranker: Any):
        self.seconds = {"dense": 0.0, "embed": 0.0}
        self.part = "serving"  # where a torch op dispatched now belongs (OpCount)
        ranker.dense = self.timed(ranker.dense, "dense")
        ranker._tokens = self.timed(ranker._tokens, "embed")
        if ranker.history is not None:
            dense = ranker.history.dense
            for name in ("run_scattered", "score"):
                object.__setattr__(dense, name, self.timed(getattr(dense, name), "dense"))

    def timed(self, fn: Any, part: str) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            started, outer = time.perf_counter(), self.part
            self.part = part
            try:
                return fn(*a, **kw)
            finally:
                self.part = outer
                self.seconds[part] += time.perf_counter() - started

        return run


def count_ops(model: ModelTime, work: list[list[tuple[int, Arrays]]], run: Any) -> dict[str, float]:
    """Torch ops dispatched per execute (aten, below autograd), by where they run: the serving path's own, the
    lookups and projector (embed), the dense step. On a GPU each is a host-side launch (~10-50 us there, session 14's
    trace): the serving path's and embed's are paid per execute; the dense step's are replayed from CUDA graphs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"serving": 0, "embed": 0, "dense": 0}

    class OpCount(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            counts[model.part] += 1
            return func(*args, **(kwargs or {}))

    with OpCount():
        for batch in work:
            run(batch)
    return {k: round(v / len(work), 1) for k, v in counts.items()}


def run_mode(
    ranker: Any, model: ModelTime, work: list[list[tuple[int, Arrays]]], cached: bool, repeats: int
) -> dict[str, Any]:
    """The session ``repeats`` times (user ids fresh each time when cached) timed by phase, then once profiled."""
    from grc.serving.ranker.phases import PHASES

    best: dict[str, float] | None = None
    answers: list[np.ndarray] = []
    for rep in range(repeats + 1):
        shift = (rep + 1) * 10**6  # fresh ids: every repeat meets the same misses and hits
        ranker.clock.seconds = dict.fromkeys(PHASES, 0.0)
        model.seconds = dict.fromkeys(model.seconds, 0.0)
        clock = {"check": 0.0}
        started = time.perf_counter()
        got = []
        for batch in work:
            got += execute(ranker, [(u + shift, r) for u, r in batch], cached, clock)
        wall = time.perf_counter() - started
        phases = {**{k: v for k, v in ranker.clock.seconds.items() if v}, **clock}
        compute = model.seconds["dense"] + model.seconds["embed"]
        phases["dense"] = phases.get("dense", 0.0) - model.seconds["dense"]  # the dense phase's host part
        phases["embed"] = phases.get("embed", 0.0) - model.seconds["embed"]
        phases |= {"model:dense": model.seconds["dense"], "model:embed": model.seconds["embed"], "wall": wall,
                   "host": wall - compute}  # fmt: skip
        if rep == 0:
            answers = got  # the first pass (also the warm-up) gives the answers compared
        elif best is None or phases["host"] < best["host"]:
            best = phases
    assert best is not None
    prof = cProfile.Profile()
    shift = 99 * 10**6
    clock = {"check": 0.0}
    prof.enable()
    for batch in work:
        execute(ranker, [(u + shift, r) for u, r in batch], cached, clock)
    prof.disable()
    n = len(work)
    shift = 98 * 10**6
    ops = count_ops(model, work, lambda batch: execute(ranker, [(u + shift, r) for u, r in batch], cached, clock))
    return {
        "host_us_per_execute": {k: round(v / n * 1e6, 1) for k, v in best.items()},
        "torch_ops_per_execute": ops,
        "profile": profile_split(prof, n, 12),
        "cumulative_serving": cumulative(prof, n, 25),
        "answers": answers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="arena", choices=("arena", "copies", "auto"))
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--visits", type=int, default=5)
    ap.add_argument("--per-execute", type=int, default=6)
    ap.add_argument("--base", type=int, default=120, help="history events at a user's first visit")
    ap.add_argument("--delta", type=int, default=10, help="events each visit adds")
    ap.add_argument("--candidates", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--budget-mb", type=float, default=64.0)
    # default: the arena step padded to the ladders' shapes and kept per shape, as on a GPU
    ap.add_argument("--eager-shapes", action="store_true", help="the arena step at each exact shape (a CPU instance's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of the session per mode (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the host part is not smeared)")
    ap.add_argument("--device", default="cpu", help="cuda: the same on a GPU (bfloat16, CUDA graphs), where each "
                    "torch op is a launch: the served cached path's host phases as the H200 pays them")  # fmt: skip
    ap.add_argument("--out", default="served-host-profile-cpu", help="result name or .json path")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="served-host-"))
    started = time.perf_counter()

    def say(what: str) -> None:  # progress, so that a call cut at its time limit still says where it was
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", flush=True)

    spec, ranker, said = build_ranker(
        folder, args.store, args.max_seq_len, args.candidates, args.budget_mb, args.device
    )
    say(f"Ranker loaded on {args.device} (its warm-up included)")
    if ranker.history.caches.arena is not None and not args.eager_shapes:
        ranker.history.caches.arena.pad = True  # the GPU's padded shapes, their steps kept (run eagerly here)
    rounds = session(spec.model, args.users, args.visits, args.base, args.delta, args.candidates)
    work = batches(rounds, args.per_execute)
    model = ModelTime(ranker)
    modes = {}
    for mode in ("uncached", "cached"):
        say(f"{mode}: {args.repeats + 1} passes of {len(work)} executes, then one under cProfile")
        modes[mode] = run_mode(ranker, model, work, mode == "cached", args.repeats)
    say("both modes run; comparing with the float64 model")
    answers = {mode: m.pop("answers") for mode, m in modes.items()}
    worst = max(rel(c, u) for c, u in zip(answers["cached"], answers["uncached"], strict=True))
    vs_float64 = float64_errors(spec.model, folder / "artifacts" / "mtgr-tiny" / "weights", work, answers)
    assert ranker.history is not None
    stats = ranker.history.caches.cache.stats()
    print(f"store {args.store}; {len(work)} executes of {args.per_execute} users; cached vs uncached max rel "
          f"{worst:.1e}; vs float64 by visit: " + ", ".join(f"{k} {[f'{v:.1e}' for v in vs]}"
                                                           for k, vs in vs_float64.items()))  # fmt: skip
    print(f"store: hits {stats.hits}, misses {stats.misses}, evictions {stats.evictions}")
    step = ranker.history.caches.arena
    arena_counts = None
    if step is not None:  # how the arena placed the hits: grown where they lie, or moved (a copy of their rows)
        arena_counts = {"in_place": step.arena.in_place, "moves": step.arena.moves, "splits": step.splits,
                        "unplaced": step.unplaced, "gap_rows": step.arena.alloc.gap}  # fmt: skip
        print("arena: " + ", ".join(f"{k} {v}" for k, v in arena_counts.items()))
    last = ("model:dense", "model:embed", "wall", "host")
    names = sorted({k for m in modes.values() for k in m["host_us_per_execute"]}, key=lambda k: (k in last, k))
    names = [k for k in names if k not in last] + list(last)
    print(f"{'host us / execute':<20}" + "".join(f"{m:>12}" for m in modes))
    for k in names:
        print(f"{k:<20}" + "".join(f"{m['host_us_per_execute'].get(k, 0.0):>12.0f}" for m in modes.values()))
    print(f"{'torch ops / execute':<20}" + "".join(f"{m:>12}" for m in modes))
    for k in ("serving", "embed", "dense"):
        print(f"{k:<20}" + "".join(f"{m['torch_ops_per_execute'][k]:>12.1f}" for m in modes.values()))
    for mode, m in modes.items():
        p = m["profile"]
        print(
            f"\n{mode} under cProfile: model {p['model_us_per_execute']:.0f} us, host "
            f"{p['host_us_per_execute']:.0f} us per execute (grc/serving's own code "
            f"{p['serving_own_share_of_host']:.0%} of the host part); top own:"
        )
        for row in p["top_serving_own"][:10]:
            print(f"  {row['us_per_execute']:>8.0f} us {row['share_of_host']:>6.1%}  {row['function']}")
    result = {
        "what": f"host time per execute of the fused Ranker in-process on {args.device} (mtgr-tiny widened), cached "
        "vs uncached; cProfile's own time split into model compute (on a GPU: its launches) and the serving path",
        "args": vars(args),
        "loaded": said,
        "executes": len(work),
        "max_rel_cached_vs_uncached": worst,
        "max_rel_vs_float64": {mode: max(vs) for mode, vs in vs_float64.items()},
        "max_rel_vs_float64_by_visit": vs_float64,
        "store_stats": stats.__dict__,
        "arena": arena_counts,
        "modes": modes,
    }
    out = Path(args.out) if args.out.endswith(".json") else args.out
    print(f"wrote {write_result(out, result)}")  # before the checks: a run that fails them keeps its figures
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    bad = {k: vs for k, vs in vs_float64.items() if not max(vs) <= FLOAT64_TOLERANCE[dtype]}
    assert not bad, f"vs the float64 model, over {FLOAT64_TOLERANCE[dtype]}: {bad}"
    assert worst <= TOLERANCE[dtype], f"cached vs uncached {worst:.3g}, over {TOLERANCE[dtype]}"


if __name__ == "__main__":
    main()
