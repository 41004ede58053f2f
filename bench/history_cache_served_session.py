"""The session workload SERVED: users coming back to a real tritonserver, uncached vs cached.

bench/history_cache_session.py's workload (``--users`` users x ``--visits`` visits in Zipf order, visit k
carrying the base history plus k x ``--delta`` new events and ``--candidates`` candidates, visits ``--gap-s``
seconds apart) sent to the bundle's client-facing model by ``concurrency`` clients, one gRPC connection
each (one run per ``--session-concurrency`` value, each under user ids of its own):

- ``uncached``: no user_id, so every request runs the model's uncached path (for a fused GPU spec: its
  AOTInductor package in CUDA graphs, what the server runs without the cache);
- ``cached``: the same requests with user_id: a user's first visit fills the store (a miss), later ones
  reuse it.

Per mode: requests sent, errors, users/s (responses / wall time), p50 / p99 latency, and from the metrics
endpoint the stores' hits, misses, evictions and bytes (vs the budget). Exactness: the cached answers of
the first ``CHECKED`` (user, visit) pairs that both modes sent are compared with the uncached ones, and
the first few hits are checked against the float64 PyTorch model (check.check_response). Called by
bench/history_cache_served.py's ``--session-users``; a mode stops starting requests after ``budget_s``.
``--session-warm``: before each run's timed modes, both modes once untimed at the same concurrency under ids of
their own, so the timed run meets a server in steady state (the cached step's CUDA graphs captured at first use:
~0.1 s each on a loaded H200, 4.96 s of a 12.7 s cached run in session 12; the store full, evicting).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.history_cache_served import CACHE_FIGURES, PHASE_FLUSH_S, cache_figures, counters, per_execute, summary
from bench.history_cache_session import user_visits, visit_order

CHECKED = 32  # (user, visit) pairs whose scores are kept in both modes and compared
FLOAT64_CHECKS = 3  # hits checked against the float64 model
WARM_USER = 10**9  # the untimed warm-up's user id
RUN_IDS = 10**6  # run k of a session sends user ids k * RUN_IDS + user
Arrays = dict[str, np.ndarray]


class Visits:
    """Each user's requests, drawn when the user first comes and dropped after its last visit (1,000 users'
    histories at once would hold GBs of request arrays)."""

    def __init__(self, cfg: Any, base: int, visits: int, delta: int, candidates: int, gap_s: int):
        self.cfg, self.base, self.visits, self.delta, self.candidates, self.gap_s = (
            cfg, base, visits, delta, candidates, gap_s,
        )  # fmt: skip
        self.held: dict[int, list[dict[str, np.ndarray]]] = {}

    def request(self, user: int, visit: int) -> dict[str, np.ndarray]:
        if user not in self.held:
            self.held[user] = user_visits(
                self.cfg, user, self.base, self.visits, self.delta, self.candidates, self.gap_s
            )
        arrays = self.held[user][visit]
        if visit == self.visits - 1:
            del self.held[user]
        return arrays


def run_mode(
    grpc_url: str,
    model: str,
    requests: Callable[[], tuple[int, int, Arrays] | None],
    cached: bool,
    concurrency: int,
    budget_s: float,
) -> tuple[dict[str, Any], dict[tuple[int, int], dict[str, np.ndarray]]]:
    """``concurrency`` clients take the next request until none is left or ``budget_s`` has passed ->
    figures, and the responses of the first CHECKED (user, visit) pairs."""
    import tritonclient.grpc as grpc

    from grc.serving.common import request as rq
    from grc.serving.triton import check

    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    kept: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    started = time.perf_counter()

    def client() -> None:
        with grpc.InferenceServerClient(grpc_url) as conn:
            while time.perf_counter() - started < budget_s:
                with lock:
                    item = requests()
                if item is None:
                    return
                user, visit, arrays = item
                if cached:
                    arrays = {**arrays, "user_id": np.array([[user]], np.int64)}
                t = time.perf_counter()
                try:
                    result = conn.infer(model, check.infer_inputs(grpc, arrays), client_timeout=600)
                    response = {name: result.as_numpy(name) for name in rq.OUTPUTS}
                except Exception as err:  # counted and shown; the run goes on
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
                    continue
                elapsed = time.perf_counter() - t
                with lock:
                    latencies.append(elapsed)
                    if len(kept) < CHECKED:
                        kept[(user, visit)] = response

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    percentiles = summary(latencies or [float("nan")])  # the shapes' p50 / p99 (NaN: nothing answered)
    figures = {
        "responses": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 2),
        "users_per_s": len(latencies) / wall,
        "p50_ms": percentiles["p50_ms"],
        "p99_ms": percentiles["p99_ms"],
    }
    return figures, kept


def session(
    server: Any,
    model: str,
    stores: list[str],
    loaded: Any,
    reference: Any,
    tolerance: Any,
    args: Any,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Both modes at each of --session-concurrency on the running server -> the result's ``session`` entry."""
    from grc.serving.common import request as rq

    weights, top_k = rq.rank_weights(loaded.spec.model, loaded.spec.bundles.triton), loaded.spec.bundles.triton.top_k

    spec, cfg = loaded.spec, loaded.spec.model
    users, visits, gap = args.session_users, 5, args.session_gap_s
    candidates = min(args.session_candidates, cfg.max_candidates)
    order = visit_order(users, visits, args.session_zipf, seed=0)
    budget = spec.bundles.triton.history_cache.budget_mb * (1 << 20) * len(stores)
    out: dict[str, Any] = {
        "users": users,
        "visits": visits,
        "base_history": args.session_base,
        "delta": args.session_delta,
        "candidates": candidates,
        "gap_s": gap,
        "zipf": args.session_zipf,
        "concurrency": args.session_concurrency,
        "budget_mb_per_store": spec.bundles.triton.history_cache.budget_mb,
        "budget_s_per_mode": args.session_s,
        "budget_bytes": budget,
    }

    def feeder(pairs: list[tuple[int, int]], id_base: int) -> Callable[[], tuple[int, int, Arrays] | None]:
        """The requests of ``pairs`` (user, visit) in order, sent under user id ``id_base + user``."""
        source = Visits(cfg, args.session_base, visits, args.session_delta, candidates, gap)
        it = iter(pairs)

        def take() -> tuple[int, int, Arrays] | None:
            nxt = next(it, None)
            return None if nxt is None else (id_base + nxt[0], nxt[1], source.request(*nxt))

        return take

    def flushed(cached: bool) -> dict[str, float]:
        """The phase counters, after one more request of the warm-up user (the fused model sends its counters
        from an execute, at most every PHASE_FLUSH_S)."""
        time.sleep(PHASE_FLUSH_S)
        run_mode(server.grpc_url, model, feeder([(0, visits - 1)], WARM_USER), cached, 1, 600)
        return counters(server.metrics_url, stores)

    # untimed: one user's visits through both paths (kernels, CUDA graphs of the shapes a session meets), under
    # an id no timed request uses
    for cached in (False, True):
        run_mode(server.grpc_url, model, feeder([(0, v) for v in range(visits)], WARM_USER), cached, 1, 600)
    out["runs"] = []
    for run, concurrency in enumerate(args.session_concurrency):
        # each run under its own user ids: no entry of the warm-up or of an earlier run is ever reused
        kept, row = {}, {"concurrency": concurrency, "warm_pass": args.session_warm}
        if args.session_warm:  # untimed, the same order under ids no timed request uses: captures and fills first
            warm_ids = (len(args.session_concurrency) + run) * RUN_IDS
            for mode, cached in (("uncached", False), ("cached", True)):
                say(f"session {mode}: the warm pass ({concurrency} client(s), untimed)")
                run_mode(server.grpc_url, model, feeder(order, warm_ids), cached, concurrency, args.session_s)
        for mode, cached in (("uncached", False), ("cached", True)):
            say(f"session {mode}: {users} users x {visits} visits, {concurrency} client(s), "
                f"at most {args.session_s:.0f} s")  # fmt: skip
            before, phases_before = cache_figures(server.metrics_url, stores), flushed(cached)
            figures, kept[mode] = run_mode(
                server.grpc_url, model, feeder(order, run * RUN_IDS), cached, concurrency, args.session_s
            )
            # where the executes spent it (the served shapes' split: Triton's queue / compute, the fused model's
            # phases); the flushing requests are one execute each among thousands
            figures["phases_ms_per_execute"] = per_execute(phases_before, flushed(cached))
            after = cache_figures(server.metrics_url, stores)
            # graphs captured during the mode (and its flushing requests): each stalls the instance
            captured = [k for k in CACHE_FIGURES if k.startswith("graph_")]
            figures.update({k: after[k] - before[k] for k in captured})
            if cached:
                kinds = ("hits", "misses", "evictions", "in_place", "moves", "splits", "unplaced")
                counted = {k: after[k] - before[k] for k in kinds}
                figures.update(counted, hit_ratio=counted["hits"] / max(counted["hits"] + counted["misses"], 1))
                figures.update(bytes_held=after["bytes"], within_budget=after["bytes"] <= budget)
            row[mode] = figures
            say(f"session {mode}: {figures}")
        row.update(exactness(kept, cfg, args, candidates, reference, tolerance, weights, top_k))
        row["users_per_s_ratio"] = row["cached"]["users_per_s"] / row["uncached"]["users_per_s"]
        row["clean"] = not row["problems_vs_float64"] and row["uncached"]["errors"] == row["cached"]["errors"] == 0
        out["runs"].append(row)
    out["clean"] = all(r["clean"] for r in out["runs"])
    return out


def exactness(
    kept: dict[str, dict[tuple[int, int], dict[str, np.ndarray]]],
    cfg: Any,
    args: Any,
    candidates: int,
    reference: Any,
    tolerance: Any,
    weights: np.ndarray,
    top_k: int,
) -> dict[str, Any]:
    """The cached answers of the (user, visit) pairs both modes kept vs the uncached ones, and the first
    FLOAT64_CHECKS hits vs the float64 model."""
    from grc.serving.triton import check

    common = [key for key in kept["cached"] if key in kept["uncached"]]
    diffs = [float(np.abs(kept["cached"][k]["scores"] - kept["uncached"][k]["scores"]).max()) for k in common]
    hit_pairs = [k for k in common if k[1] > 0][:FLOAT64_CHECKS]  # visits after the first: hits
    problems = []
    for user, visit in hit_pairs:
        request = user_visits(  # the workload's user, whichever run's id it was sent under
            cfg, user % RUN_IDS, args.session_base, 5, args.session_delta, candidates, args.session_gap_s
        )
        found = check.check_response(
            kept["cached"][(user, visit)], reference.scores(request[visit]), request[visit], cfg, weights, top_k,
            tolerance,
        )  # fmt: skip
        problems += [f"user {user} visit {visit}: {p}" for p in found.problems]
    return {
        "compared_pairs": len(common),
        "max_abs_diff_cached_vs_uncached": max(diffs, default=None),
        "float64_checked": len(hit_pairs),
        "problems_vs_float64": problems,
    }
