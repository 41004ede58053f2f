"""A session workload against the served model's scorer, in-process (CPU or CUDA GPU).

Users come back: ``--users`` users make ``--visits`` requests each, in an order drawn by Zipf
popularity (exponent ``--zipf``: a popular user's visits come early and close together); visit k of a
user carries its base history plus ``k * --delta`` new events and ``--candidates`` candidates. The
scorer is ``CachedScorer`` of grc/serving/triton/models/history_cached.py, as an instance builds it
(projection on the host, dense step on the device, the store under the spec's budget), on the spec's
seeded weights with its tables cut to 10,000 rows. Modes, each on a fresh store:

- ``uncached``: no user_id (every request computed whole);
- ``cached``: user_id sent; visits of one user at ``--gap-s`` seconds apart, the new events in between.

Why the gap matters: MTGR's profile tokens carry the request time, and a cached row is exact only while
its event's time bucket against them holds (README, "The contract"); the newest events' buckets move
within about their own age, so a later visit reuses the rows before the first moved event and
recomputes the recent tail. ``--gap-s 0`` (all visits at one request time) reuses every row. One
untimed user (not among the others) warms the scorer up first. Figures per mode: requests, hit ratio
(the store's counters), users/s (requests / wall time), p50 / p99 latency, the most bytes held vs the
budget, errors. A mode stops starting requests after ``budget_s`` seconds (its figures say how many ran).

    python bench/history_cache_session.py --spec specs/mtgr-small.yaml --users 200 --out x.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result
from bench.history_cache_served import bench_spec
from grc.spec.schema import ModelConfig

T0 = 1_750_000_000
YEAR, HOUR = 365 * 86400, 3600


def user_visits(
    cfg: ModelConfig, user: int, base: int, visits: int, delta: int, candidates: int, gap_s: int
) -> list[dict[str, np.ndarray]]:
    """The requests of one user's visits (batch 1): random ids, history oldest first."""
    from grc.model.sample import random_batch
    from grc.serving.common import request as rq

    gen = torch.Generator().manual_seed(user)
    total = base + (visits - 1) * delta
    arrays = rq.user_request(random_batch(cfg, 1, total, candidates, gen, exact=True), 0, cfg)
    old = np.sort(T0 - HOUR - (torch.rand(base, generator=gen).numpy() * (YEAR - HOUR)).astype(np.int64))
    new = []
    for k in range(1, visits):  # visit k's events fall between visit k-1 and visit k
        start = T0 + (k - 1) * gap_s if gap_s else T0 - HOUR + k * delta  # gap 0: all before T0
        new += [start + (i + 1) * max(gap_s, 1) // (delta + 1) for i in range(delta)]
    times = np.concatenate([old, np.array(new, np.int64)])
    history = {rq.history_input(t) for t in cfg.history} | {rq.HISTORY_TIME}
    out = []
    for k in range(visits):
        n = base + k * delta
        visit = {name: a[:, :n] if name in history else a for name, a in arrays.items()}
        visit[rq.HISTORY_TIME] = times[None, :n].copy()
        visit[rq.REQUEST_TIME] = np.array([[T0 + k * gap_s]], np.int64)
        out.append(visit)
    return out


def visit_order(users: int, visits: int, zipf: float, seed: int) -> list[tuple[int, int]]:
    """(user, visit) in arrival order: each step draws a user with visits left, by Zipf weight."""
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, users + 1) ** zipf
    left = np.full(users, visits)
    order = []
    for _ in range(users * visits):
        p = weight * (left > 0)
        u = int(rng.choice(users, p=p / p.sum()))
        order.append((u, visits - left[u]))
        left[u] -= 1
    return order


def run_mode(scorer: Any, requests: list[tuple[int, dict[str, np.ndarray]]], cached: bool, budget_s: float) -> dict:
    from grc.serving.common.validate import parse

    cfg = scorer.cfg
    latencies, errors, most_bytes = [], 0, 0
    started = time.perf_counter()
    for user, arrays in requests:
        if time.perf_counter() - started > budget_s:
            break
        t = time.perf_counter()
        try:
            scorer.score(parse(dict(arrays), cfg, True), np.array([user], np.int64) if cached else None)
        except Exception as err:  # counted and shown, the run goes on
            errors += 1
            if errors == 1:
                print(f"error: {type(err).__name__}: {err}", flush=True)
        latencies.append(time.perf_counter() - t)
        most_bytes = max(most_bytes, scorer.cache.stats().bytes)
    wall = time.perf_counter() - started
    stats = scorer.cache.stats()
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "of": len(requests),
        "errors": errors,
        "hit_ratio": stats.hits / max(stats.hits + stats.misses, 1) if cached else None,
        "hits": stats.hits,
        "misses": stats.misses,
        "evictions": stats.evictions,
        "users_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "most_bytes": most_bytes,
        "budget_bytes": scorer.cache.budget,
    }


def session(args: argparse.Namespace, device: str, dtype: str, budget_s: float) -> dict[str, Any]:
    """All modes on one spec; ``budget_s`` per mode."""
    from grc.serving.common.history_cache import HistoryCache
    from grc.serving.triton.models.history_cached import CachedScorer
    from grc.spec.loader import load_spec
    from grc.weights import write_init

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = load_spec(bench_spec(Path(args.spec), folder)).spec
        cfg = spec.model
        weights = folder / "weights"
        weights.mkdir()
        manifest = write_init(cfg, spec.weights, spec.weights.source, weights)  # type: ignore[arg-type]
        (weights / "manifest.json").write_text(__import__("json").dumps(manifest))
        cache = spec.bundles.triton.history_cache
        budget_mb = args.budget_mb or cache.budget_mb  # --budget-mb: the working set's size, not the spec's
        budget = int(budget_mb * (1 << 20))
        max_user = int((cache.max_user_mb or budget_mb / 8) * (1 << 20))
        scorer = CachedScorer(cfg, weights, budget, max_user, device, "session", dtype)
        out: dict[str, Any] = {"spec": spec.name, "dtype": str(scorer.dtype), "impl": scorer.impl}
        order = visit_order(args.users, args.visits, args.zipf, seed=0)
        warm = user_visits(cfg, args.users, args.base, args.visits, args.delta, args.candidates, args.gap_s)
        run_mode(scorer, [(args.users, v) for v in warm], True, budget_s)  # first calls' costs, untimed
        for mode, gap in (("uncached", args.gap_s), ("cached_gap0", 0), (f"cached_gap{args.gap_s}", args.gap_s)):
            visits = {u: user_visits(cfg, u, args.base, args.visits, args.delta, args.candidates, gap)
                      for u in range(args.users)}  # fmt: skip
            requests = [(u, visits[u][k]) for u, k in order]
            scorer.cache = HistoryCache(budget, max_user)
            out[mode] = run_mode(scorer, requests, mode != "uncached", budget_s)
            print(f"session {mode}: {out[mode]}", flush=True)
        return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="specs/mtgr-small.yaml")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--visits", type=int, default=5)
    ap.add_argument("--base", type=int, default=1000, help="history events at a user's first visit")
    ap.add_argument("--delta", type=int, default=10, help="new history events per later visit")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--gap-s", type=int, default=60, help="seconds between a user's visits (cached mode)")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--budget-mb", type=float, default=None, help="the store's budget (default: the spec's)")
    return ap


def main() -> None:
    ap = parser()
    ap.add_argument("--dtype", default="bfloat16", help="on a GPU (the CPU runs float32)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="per mode")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    result = {"workload": vars(args), **session(args, device, args.dtype, args.budget_s)}
    print(f"wrote {write_result(Path(args.out), result)}")


if __name__ == "__main__":
    main()
