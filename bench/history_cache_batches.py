"""Several users per cached score step (ScoreGraphs), as the fused model scores a dynamic batch of hits.

    python bench/history_cache_batches.py --spec mtgr-base --out $OUT/history-cache-batches-h200.json
    TRITON_INTERPRET=1 python bench/history_cache_batches.py --spec tests/specs/mtgr-tiny.yaml --users 1,2 \
        --history 40 --candidates 8 --repeat 3 --out /tmp/b.json      # the flow on a CPU

Why: served with 16 clients, the session workload's cached mode stalled on the H200 (seconds per request,
bench/results/history-cache-served-h200.json) while one client ran smoothly; the batches of several users
per step are what differs. Per users-per-step k (``--users``), each user a cached history of ``--history``
events minus 0..40 (varied per step: the cached length moves, as in a session) with 10 new events and
``--candidates`` candidates:

- ``warm_up_s``: ``ScoreGraphs.warm_up`` first, as a served model runs it at load (``--no-warm-up``: none, to see
  what the steps pay without it);
- ``first_step_s``: the first k-user step (what a batch of a new size pays: compiles, autotuning, capture);
- ``steps_ms``: every later step's wall time, the device synchronized (host work included), their p50 and
  max, users/s = k / p50, and how many graphs were captured during them (new padded shapes);
- ``uncached_ms``: the same k users' whole sequences through the same kernels (``GRDense.run_plan`` against
  empty caches, planned once) replayed from a CUDA graph, p50 over ``--repeat``;
- ``max_abs_diff_vs_one_user``: the k-user step's scores against each user scored alone (1-user steps).
- ``replay_ms`` / ``enqueue_ms`` (``split``): the last step's graph replayed alone (the device work) and a step's
  host time until it returns unsynchronized (the bench's input slicing, plan, copies, replay launch, grown entries).

Then ``mixed`` (``--mixed-steps``, 0: none): the served session's batches in-process, ``mixed_steps`` steps of 1..max
users (uniform), each user a hit (its cache cut as above) or, one in five, a miss (its whole sequence against an
empty cache), in one seeded order run twice: the first pass meets the padded shapes as a server does, the second
after. Per pass: wall seconds, users/s, step p50 / p99 (ms, synchronized), graphs captured, their host seconds (and
of those the eager warm-up runs'), shapes kept. Served at
16 clients such batches met dozens of shapes and the graphs were captured again and again (ScoreGraphs).

TRITON_PRINT_AUTOTUNING=1 shows each autotuning (key, seconds) as it happens. --deadline-s: no new k after it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result
from bench.history_cache import synced
from bench.history_cache_device import NOW, User, graphed, model_in, spec_path
from bench.history_cache_served import summary
from bench.history_cache_timeline import Clock
from grc.model.kv_cache import UserKV
from grc.serving.common.score_graphs import ScoreGraphs
from grc.serving.ranker.dense import CAPTURE_FIGURES, GraphStats
from grc.spec.loader import load_spec

NEW = 10  # new history events per step (the session workload's +10)
SLIDE = 40  # the cached length moves by up to this many events between steps


Inputs = tuple[list[UserKV], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def step_inputs(users: list[User], caches: list[UserKV], cut: list[int]) -> tuple[Inputs, np.ndarray]:
    """The k users' new rows (their last NEW events before the candidates, and the candidates) against their
    caches cut to ``cut[b]`` cached rows, and the new rows' stamps on the host."""
    parts = [u.tokens[c:] for u, c in zip(users, cut, strict=True)]
    stamps = torch.cat([u.stamps[c:] for u, c in zip(users, cut, strict=True)])
    host = [u.host_stamps[c:] for u, c in zip(users, cut, strict=True)]  # a served layout has them on the host
    offsets = torch.tensor([0, *torch.tensor([p.shape[0] for p in parts]).cumsum(0).tolist()])
    kept = [kv.prefix(c) for kv, c in zip(caches, cut, strict=True)]
    inputs = (kept, torch.cat(parts), offsets, torch.tensor([u.candidates for u in users]), stamps)
    return inputs, np.concatenate(host)


def split(graphs: ScoreGraphs, step: Callable[[int], Any], repeat: int, device: torch.device) -> dict[str, float]:
    """Where a step's wall time goes: ``replay_ms`` the last step's graph replayed alone (its inputs already in
    place: the device work, p50), ``enqueue_ms`` a whole step's host time until ``score`` returns without waiting
    for the device (plan, copies, replay launch, the grown entries; p50). A step's p50 near enqueue_ms and far above
    replay_ms is host-bound."""
    last = next(reversed(graphs.steps.values()))
    if last.graph is None:  # run eagerly (no CUDA): the replay is the step itself
        return {}
    replay = [synced(last.graph.replay, device)[0] * 1e3 for _ in range(repeat)]
    enqueue = []
    for j in range(repeat):
        synced(lambda: None, device)
        start = time.perf_counter()
        step(j + 1)
        enqueue.append((time.perf_counter() - start) * 1e3)
    synced(lambda: None, device)
    return {"replay_ms": statistics.median(replay), "enqueue_ms": statistics.median(enqueue)}


def mixed(
    graphs: ScoreGraphs,
    users: list[User],
    full: list[UserKV],
    cut: Callable[[], int],
    steps: int,
    impl: str,
    device: torch.device,
) -> dict[str, Any]:
    """``steps`` seeded steps of 1..len(users) users, one in five a miss, the other users' caches cut by ``cut()``,
    run twice (module doc, ``mixed``)."""
    rng = np.random.default_rng(0)
    order = []
    for _ in range(steps):
        picked = rng.choice(len(users), int(rng.integers(1, len(users) + 1)), replace=False).tolist()
        order.append((picked, [0 if rng.random() < 0.2 else cut() for _ in picked]))
    out: dict[str, Any] = {"steps": steps, "users": sum(len(p) for p, _ in order),
                           "misses": sum(c == 0 for _, cuts in order for c in cuts)}  # fmt: skip
    for name in ("first_pass", "second_pass"):
        captures, times = graphs.stats.captures, []
        spent = {k: getattr(graphs.stats, k) for k in CAPTURE_FIGURES}
        for picked, cuts in order:
            inputs, host = step_inputs([users[i] for i in picked], [full[i] for i in picked], cuts)
            now = [NOW] * len(picked)
            run = functools.partial(graphs.score, *inputs, now, impl, reuse_checked=True, host_timestamps=host)
            times.append(synced(run, device)[0])
        latency = summary(times)
        out[name] = {
            "wall_s": sum(times), "users_per_s": out["users"] / sum(times),
            "p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"],
            "captures": graphs.stats.captures - captures, "shapes_kept": len(graphs.steps),
            **{k: getattr(graphs.stats, k) - v for k, v in spent.items()},
        }  # fmt: skip
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="mtgr-base")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--users", default="1,2,4,8,16", help="users per step, comma-separated")
    ap.add_argument("--history", type=int, default=1040, help="history events of each user (cached, less 0..40)")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--deadline-s", type=float, default=float("inf"))
    ap.add_argument("--mixed-steps", type=int, default=200, help="steps of the mixed hits-and-misses section")
    ap.add_argument(
        "--warm-up", action=argparse.BooleanOptionalAction, default=True, help="ScoreGraphs.warm_up first, as a server"
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    clock = Clock()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    impl = "triton" if cuda or "TRITON_INTERPRET" in __import__("os").environ else "pytorch"
    cfg = load_spec(spec_path(Path(__file__).resolve().parents[1], args.spec)).spec.model
    model = model_in(cfg, device, args.dtype if cuda else "float32")
    dtype = next(model.parameters()).dtype
    ks = [int(k) for k in args.users.split(",")]
    users = [User(cfg, args.history, args.candidates, seed, device, dtype) for seed in range(max(ks))]
    profile = len(cfg.profile)
    full = [u.prefill(model, profile + args.history - NEW, impl) for u in users]  # the most any step reuses
    result: dict[str, Any] = {"spec": args.spec, "dtype": str(dtype), "impl": impl, "rows": []}
    graphs = ScoreGraphs(model, impl, GraphStats(), max_users=max(ks), graphs=cuda)

    say = clock.say
    if args.warm_up:  # as a served model does at load: then a batch of a new size should pay its capture only
        say("ScoreGraphs.warm_up: the attention kernel tuned for every key, one small step")
        result["warm_up_s"], tuned = synced(lambda: graphs.warm_up(users[0].tokens), device)
        result["warm_up_keys"] = len(tuned)

    for k in ks:
        if clock.elapsed() > args.deadline_s:
            result["rows"].append({"users": k, "skipped": f"past --deadline-s {args.deadline_s}"})
            continue
        group, caches = users[:k], full[:k]
        row: dict[str, Any] = {"users": k}

        def cuts(j: int, k: int = k) -> list[int]:
            return [profile + args.history - NEW - (j * 7 + b * 13) % SLIDE for b in range(k)]

        def step(j: int, group: list[User] = group, caches: list[UserKV] = caches) -> torch.Tensor:
            inputs, host = step_inputs(group, caches, cuts(j))
            now = [NOW] * len(group)
            return graphs.score(*inputs, now, impl, reuse_checked=True, host_timestamps=host)[0]

        say(f"{k} users per step: the first step")
        captures = graphs.stats.captures
        row["first_step_s"], first = synced(lambda: step(0), device)
        row["first_step_captures"] = graphs.stats.captures - captures
        singles = [step_inputs([u], [kv], [c]) for u, kv, c in zip(group, caches, cuts(0), strict=True)]
        alone = torch.cat(
            [graphs.score(*one, [NOW], impl, reuse_checked=True, host_timestamps=host)[0] for one, host in singles]
        )
        row["max_abs_diff_vs_one_user"] = float((first.float() - alone.float()).abs().max())
        say(f"{k} users per step: {args.repeat} steps, cached lengths moving")
        captures = graphs.stats.captures
        times = [synced(functools.partial(step, j), device)[0] * 1e3 for j in range(1, args.repeat + 1)]
        p50 = statistics.median(times)
        row.update(steps_ms=[round(t, 3) for t in times], p50_ms=p50, max_ms=max(times), users_per_s=k / p50 * 1e3,
                   steps_captures=graphs.stats.captures - captures)  # fmt: skip
        row.update(split(graphs, step, args.repeat, device))
        # the whole sequences through the same kernels, planned once, replayed from a CUDA graph (on a GPU)
        tokens = torch.cat([u.tokens for u in group])
        offsets = torch.tensor([0, *[u.n * (b + 1) for b, u in enumerate(group)]])
        empty = [model.empty_cache(profile, tokens) for _ in group]
        stamps = torch.cat([u.stamps for u in group])
        planned = model.plan_score(empty, offsets, torch.tensor([u.candidates for u in group]), stamps, [NOW] * k)

        def whole(p: Any = planned, e: list[UserKV] = empty, t: torch.Tensor = tokens) -> torch.Tensor:
            return model.run_plan(p, e, t, impl)[0]

        replay = graphed(whole) if cuda else whole
        uncached = [synced(replay, device)[0] * 1e3 for _ in range(args.repeat)]
        row["uncached_ms"] = statistics.median(uncached)
        row["uncached_users_per_s"] = k / row["uncached_ms"] * 1e3
        row["cached_vs_uncached_users_per_s"] = row["users_per_s"] / row["uncached_users_per_s"]
        say(f"{k} users per step: { ({key: v for key, v in row.items() if key != 'steps_ms'}) }")
        result["rows"].append(row)
        write_result(Path(args.out), result)
    if args.mixed_steps and clock.elapsed() <= args.deadline_s:
        rng = np.random.default_rng(1)

        def cut() -> int:
            return profile + args.history - NEW - int(rng.integers(0, SLIDE))

        say(f"mixed: {args.mixed_steps} steps of 1..{len(users)} users, one in five a miss, twice")
        result["mixed"] = mixed(graphs, users, full, cut, args.mixed_steps, impl, device)
        say(f"mixed: {result['mixed']}")
    print(f"wrote {write_result(Path(args.out), result)}")


if __name__ == "__main__":
    main()
