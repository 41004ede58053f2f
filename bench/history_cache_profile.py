"""Where the eager history-cache step spends its time on the GPU: one user's full forward, cached score and
planned score (run_plan), each profiled from the host and from the device.

    python bench/history_cache_profile.py --out $OUT/history-cache-profile-h200.json    # a CUDA GPU
    TRITON_INTERPRET=1 python bench/history_cache_profile.py --dry-run --out /tmp/p.json  # CPU: tiny shape

bench/results/history-cache-h200.json measured, at mtgr-small bf16 1789 x 256: full forward 4.9 ms and cached
score 5.5 ms eager, 0.42 and 0.28 ms as CUDA graphs: eager is 12-20x its device work, and the cached step
(what a served hit runs, grc/serving/ranker/history.py) loses to the uncached one. This names the host costs
behind that, per path (median of --repeat calls after warm-up, impl "triton"; ``served_score`` is the cached score
as the served store called it eagerly, its reuse checked on the host; ``graphs_score`` the served step since
session 8, replayed from a CUDA graph, grc/serving/common/score_graphs.py):

- ``wall_ms``: one synchronized call; ``kernels`` / ``kernel_ms``: device kernels per call and their time
  (torch.profiler); ``syncs``: host waits per call (cudaStreamSynchronize, cudaDeviceSynchronize, blocking
  cudaMemcpy: every device->host read such as ``.tolist()`` or ``int(t)``);
- ``host_ops``: the profiler's host ops by self time (ms per call);
- ``python``: cProfile, ms per call: ``own`` by own time, ``grc`` grc/ and kernels/ functions by cumulative time.

With ``--mixed HITS:MISSES``, also one served execute's users in ONE arena step (``arena_mixed``; with PyTorch's
GEMMs, cuBLAS, instead of grc's fused ones: ``arena_mixed_unfused``) beside the same users' whole sequences in one
eager forward (``full_forward_mixed``): the served session spends more device time per execute cached than uncached
(1.76 vs 1.50 ms on the H200, session 22, ~4 hits and ~1 miss of history 1,000 per execute), which a one-user
profile does not show.

Not a timed test: figures for the next change to the served cached path (CUDA graphs or fewer host
steps). Written through bench/_common.write_result (provenance, source digest).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # grc and kernels from a checkout

from bench._common import write_result
from bench.history_cache_device import DELTA, NOW, User, hand_back, held_user, model_in, spec_path
from grc.model.gr import GRDense
from grc.model.kv_cache import KVLayout, UserKV
from grc.serving.common.arena_graphs import ArenaGraphs, ArenaUser
from grc.serving.common.kv_arena import GROWTH_GAP, KVArena
from grc.serving.common.score_graphs import ScoreGraphs
from grc.serving.ranker.dense import GraphStats
from grc.spec.loader import load_spec
from grc.spec.schema import ModelConfig

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")
TOP = 15


def wall_ms(run: Callable[[], Any], repeat: int, cuda: bool) -> float:
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def device_profile(run: Callable[[], Any], calls: int, cuda: bool) -> dict[str, Any]:
    """torch.profiler over ``calls`` calls: kernels, syncs and host ops, per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        if cuda:
            torch.cuda.synchronize()
    kernels = kernel_us = 0.0
    syncs = 0
    host: dict[str, float] = {}
    device: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0.0) or 0.0
        if device_us and event.device_type.name == "CUDA":
            kernels += event.count
            kernel_us += device_us
            device[event.key[:120]] = device.get(event.key[:120], 0.0) + device_us
            continue
        if any(event.key.startswith(s) for s in SYNCS):
            syncs += event.count
        host[event.key] = host.get(event.key, 0.0) + event.self_cpu_time_total
    top = sorted(host.items(), key=lambda kv: -kv[1])[:TOP]
    top_device = sorted(device.items(), key=lambda kv: -kv[1])[:TOP]
    return {
        "kernels": kernels / calls,
        "kernel_ms": round(kernel_us / calls / 1000, 4),
        "syncs": syncs / calls,
        "host_ops": {k: round(v / calls / 1000, 4) for k, v in top},
        "device_kernels": {k: round(v / calls / 1000, 4) for k, v in top_device},  # ms per call, by kernel name
    }


def python_profile(run: Callable[[], Any], calls: int) -> dict[str, dict[str, float]]:
    """cProfile, ms per call: ``own`` the functions by own time; ``grc`` the repository's functions (grc/,
    kernels/) by cumulative time, children included (file:line(function), paths from the repository)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    root = str(Path(__file__).resolve().parents[1]) + "/"

    def top(rows: list[Any], column: int) -> dict[str, float]:
        ranked = sorted(rows, key=lambda kv: -kv[1][column])[:TOP]
        return {
            f"{f.replace(root, '')}:{line}({fn})": round(v[column] / calls * 1000, 4) for (f, line, fn), v in ranked
        }

    ours = [kv for kv in stats.items() if kv[0][0].startswith((root + "grc/", root + "kernels/"))]
    return {"own": top(list(stats.items()), 2), "grc": top(ours, 3)}


def switched(run: Callable[[], torch.Tensor], name: str, value: Any) -> Callable[[], torch.Tensor]:
    """``run`` with ``grc.model.hstu.<name>`` set to ``value`` while it runs (its graphs are captured so)."""
    from grc.model import hstu

    def with_switch() -> torch.Tensor:
        was = getattr(hstu, name)
        setattr(hstu, name, value)
        try:
            return run()
        finally:
            setattr(hstu, name, was)

    return with_switch


def flipped_prologue(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``run`` with NORM_PROLOGUE["uvqk_step"] flipped while it runs (its graphs are captured so)."""
    from grc.model import hstu

    flipped = dict(hstu.NORM_PROLOGUE, uvqk_step=not hstu.NORM_PROLOGUE["uvqk_step"])
    return switched(run, "NORM_PROLOGUE", flipped)


def case_arguments(ap: argparse.ArgumentParser, spec: str) -> None:
    """The options of one user's case (this script's and bench/gemm_tiles.py's): spec, dtype, candidates, history,
    repeat, dry run, out."""
    ap.add_argument("--spec", default=spec)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--history", type=int, help="history events (default: max_seq_len - 256 - profile tokens)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--out", required=True)


@dataclass
class Case:
    """One user's case from ``case_arguments``' options: the model on the device and the user, in the args' dtype
    (a tiny shape and 2 repeats with --dry-run)."""

    cfg: ModelConfig
    device: torch.device
    cuda: bool
    dtype: torch.dtype
    model: GRDense
    user: User
    history: int
    candidates: int
    repeat: int


def one_user(args: argparse.Namespace, program: str) -> Case:
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit(f"{program}: torch sees no CUDA device (use --dry-run on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_spec(spec_path(Path(__file__).resolve().parents[1], args.spec)).spec.model
    candidates = 8 if args.dry_run else args.candidates
    history = 24 if args.dry_run else args.history or cfg.hstu.max_seq_len - 256 - len(cfg.profile)
    dtype = getattr(torch, args.dtype)
    user = User(cfg, history, candidates, 0, device, dtype)
    repeat = 2 if args.dry_run else args.repeat
    return Case(cfg, device, cuda, dtype, model_in(cfg, device, args.dtype), user, history, candidates, repeat)


def arena_hit(case: Case, cache: UserKV) -> Callable[[], torch.Tensor]:
    """The served hit over the device arena (store: arena), on an arena and graphs of its own: ``cache``'s rows
    copied in once, each call grows the entry in place (User.in_arena)."""
    h, model = case.cfg.hstu, case.model
    layout = KVLayout(h.num_layers, h.num_heads, h.head_qk, h.head_v)
    arena = KVArena(layout, 2 * h.max_seq_len, ArenaGraphs.scratch_rows(model, 1), case.dtype, case.device)
    return case.user.in_arena(ArenaGraphs(model, "triton", GraphStats(), 1, arena, graphs=case.cuda), cache)


# (user, its cache: None for a miss) of a mixed step: a served execute's users, hits and misses in ONE step
Mixed = list[tuple[User, UserKV | None]]


def mixed_users(case: Case, spec: str, history: int) -> Mixed:
    """``spec`` "HITS:MISSES" users of ``history`` events each (--dry-run: 24), the served session's execute
    (bench/history_cache_served_session.py: ~5 users per execute at 16 clients, one in five a first visit): a hit
    holds its profile and history less the DELTA events its visit adds (then computes those and its candidates),
    a miss holds nothing (its whole sequence)."""
    hits, misses = (int(n) for n in spec.split(":"))
    history = 24 if case.history == 24 else history  # a dry run's tiny shape
    out: Mixed = []
    for i in range(hits + misses):
        user = User(case.cfg, history, case.candidates, i + 1, case.device, case.dtype)
        cached = user.n - case.candidates - DELTA
        out.append((user, user.prefill(case.model, cached, "triton") if i < hits else None))
    return out


def arena_mixed(case: Case, users: Mixed, fuse: bool | None = None) -> Callable[[], torch.Tensor]:
    """``users`` in one step of the served arena (store: arena), steady state as ``arena_hit``: every hit's cached
    rows copied once into an extent of their own, each call grows them in place; each miss's rows allocated per call
    and given back (its entry not kept). ``fuse``: the step's GEMMs (None: the served default, grc's fused Triton
    GEMMs; False: PyTorch's, cuBLAS on a GPU, with the epilogues as kernels of their own)."""
    h, model = case.cfg.hstu, case.model
    layout = KVLayout(h.num_layers, h.num_heads, h.head_qk, h.head_v)
    rows = 2 * sum(u.n for u, _ in users) + len(users) * GROWTH_GAP
    arena = KVArena(layout, rows, ArenaGraphs.scratch_rows(model, len(users)), case.dtype, case.device)
    graphs = ArenaGraphs(model, "triton", GraphStats(), len(users), arena, graphs=case.cuda, fuse=fuse)
    holder = object()  # stands for the store's entries
    step: list[ArenaUser] = []
    tokens, stamps, bounds, candidates = [], [], [0], []
    for user, cache in users:
        cached = 0 if cache is None else cache.length
        step.append(ArenaUser(None, None, False, NOW) if cache is None else held_user(arena, cache, user.n, holder))
        tokens.append(user.tokens[cached:])
        stamps.append(user.host_stamps[cached:])
        bounds.append(bounds[-1] + user.n - cached)
        candidates.append(user.candidates)
    new, host = torch.cat(tokens), np.concatenate(stamps)
    return lambda: graphs.score(step, new, bounds, candidates, host, hand_back(holder))


def full_mixed(case: Case, users: Mixed) -> Callable[[], torch.Tensor]:
    """The same users uncached: their whole sequences in one eager jagged forward through grc's kernels (what
    ``full_forward`` is for one user) -> their candidates' scores in user order, as the arena step returns them."""
    tokens = torch.cat([u.tokens for u, _ in users])
    stamps = torch.cat([u.stamps for u, _ in users])
    lengths = torch.tensor([u.n for u, _ in users])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    nc = torch.tensor([u.candidates for u, _ in users], device=case.device)
    ends = offsets[1:].tolist()
    picked = torch.cat([torch.arange(end - u.candidates, end) for (u, _), end in zip(users, ends, strict=True)])
    offsets, picked = offsets.to(case.device), picked.to(case.device)
    return lambda: case.model.forward_jagged(tokens, offsets, nc, stamps, "triton")[picked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    case_arguments(ap, "mtgr-small")
    ap.add_argument("--paths", help="comma-separated subset of the paths (default: all)")
    ap.add_argument("--mixed", help='"HITS:MISSES": also one served execute\'s users in one step (arena_mixed, '
                    "arena_mixed_unfused) beside their uncached forward (full_forward_mixed)")  # fmt: skip
    ap.add_argument("--mixed-history", type=int, default=1000, help="each mixed user's history events")
    args = ap.parse_args()
    case = one_user(args, "history_cache_profile.py")
    cuda, model, user, repeat = case.cuda, case.model, case.user, case.repeat
    started = time.perf_counter()
    with torch.no_grad():
        cache = user.prefill(model, user.n - case.candidates, "triton")
        graphs = ScoreGraphs(model, "triton", GraphStats(), max_users=1, graphs=cuda)
        paths = {  # each arena path its own arena and graphs
            # the served hit over the device arena (store: arena, session 19): entries read and grown in place
            "arena_score": arena_hit(case, cache),
            # the same with the UVQK GEMM's group norm as its prologue (grc.model.hstu.NORM_PROLOGUE["uvqk_step"]
            # flipped from the default: which is faster at a step's few hundred rows, session 20)
            "arena_score_flipped_prologue": flipped_prologue(arena_hit(case, cache)),
            # the same with the group norm before the UVQK GEMM as PyTorch's five kernels (session 22's kernel off)
            "arena_score_torch_norm": switched(arena_hit(case, cache), "STEP_NORM_KERNEL", False),
            # the served hit with store: copies: the step replayed from a CUDA graph, entries copied in and out
            "graphs_score": lambda: user.score(graphs, cache, "triton", reuse_checked=True),
            "full_forward": lambda: user.full(model, "triton"),
            "cached_score": lambda: user.score(model, cache, "triton"),
            # what a served hit runs: the store checked reuse on the host (UserCaches.score passes reuse_checked)
            "served_score": lambda: user.score(model, cache, "triton", reuse_checked=True),
            "planned_score": user.planned(model, cache, "triton"),
        }
        mixed: Mixed = []
        if args.mixed:  # one served execute's users in one step (issue 18's session: device time per execute)
            mixed = mixed_users(case, args.mixed, args.mixed_history)
            paths |= {
                "arena_mixed": arena_mixed(case, mixed),
                "arena_mixed_unfused": arena_mixed(case, mixed, fuse=False),
                "full_forward_mixed": full_mixed(case, mixed),
            }
        from grc.model.hstu import NORM_PROLOGUE

        result: dict[str, Any] = {
            "spec": args.spec, "dtype": args.dtype, "history": case.history, "candidates": case.candidates,
            "impl": "triton", "repeat": repeat, "norm_prologue": dict(NORM_PROLOGUE), "paths": {},
        }  # fmt: skip
        if mixed:
            history = mixed[0][0].n - len(case.cfg.profile) - case.candidates
            result["mixed"] = {"hits:misses": args.mixed, "history": history, "delta": DELTA}
        outs: dict[str, torch.Tensor] = {}
        for name, run in paths.items():
            if args.paths and name not in args.paths.split(","):
                continue
            outs[name] = run().float()  # compiles and autotunes
            print(f"[+{time.perf_counter() - started:.1f} s] {name}: compiled", flush=True)
            row: dict[str, Any] = {"wall_ms": round(wall_ms(run, repeat, cuda), 4)}
            row |= device_profile(run, repeat, cuda)
            row["python"] = python_profile(run, repeat)
            result["paths"][name] = row
            print(f"  {name}: {row['wall_ms']} ms wall, {row['kernels']:g} kernels ({row['kernel_ms']} ms), "
                  f"{row['syncs']:g} syncs per call", flush=True)  # fmt: skip
            for fn, ms in list(row["python"]["grc"].items())[:8]:
                print(f"    {ms:8.3f} ms  {fn}")
            for kernel, ms in list(row["device_kernels"].items())[:12]:
                print(f"    {ms:8.4f} ms device  {kernel}")
            write_result(Path(args.out), result)
        for full_name in ("full_forward", "full_forward_mixed"):  # each path against its users' uncached forward
            full = outs.get(full_name)
            if full is None:
                continue
            mixed_path = "_mixed" in full_name
            result[f"max_rel_vs_{full_name}"] = {
                name: float((o - full).abs().max() / full.abs().max())
                for name, o in outs.items()
                if ("_mixed" in name) == mixed_path
            }
            print(f"  max relative difference vs {full_name}: {result[f'max_rel_vs_{full_name}']}")
            write_result(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
