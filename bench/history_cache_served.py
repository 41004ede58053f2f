"""Served latency of the history cache on a real tritonserver (loopback only), one user at a time.

    python bench/history_cache_served.py [--spec specs/mtgr-small.yaml] [--requests 5]
    python bench/history_cache_served.py --spec specs/mtgr-small-gpu.yaml --out $OUT/history-cache-served-h200.json

Builds the spec with its embedding tables cut to 10,000 rows (the dense model, the part the cache
saves, keeps its size; the tables would cost GBs and change nothing measured here) and the history
cache on, starts tritonserver, and per shape (1 user x history {1000, max_seq_len - max_candidates -
profile} x max_candidates candidates) times --requests requests each of: the cached model without
user_id (computed whole), the cached model with user_id after one untimed request that fills the
cache (hits: new events and candidates only), and for an ensemble spec the onnxruntime ensemble (the
compiled uncached path).

Which cached model: with ``pipeline: ensemble`` the python model ``history_cached``; with ``pipeline:
fused`` (the GPU specs, KIND_GPU) the fused model of the spec's backend, whose requests without user_id
run that backend's dense step (aotinductor: the CUDA package in CUDA graphs) and whose hits run
GRDense.score's step, replayed from CUDA graphs (grc/serving/common/score_graphs.py; grc/serving/ranker/history.py
says which implementation, the bundle's README too). A
fused spec is built with history_cache.instances = instance_count (one store per instance behind the
router) and without its extra backends (their models would load their own tables, measuring nothing).

Checks, per shape: every timed cached request was a hit (the metrics endpoint, summed over the stores),
cached and uncached scores agree, and both pass the bundle's served tolerance against the float64
PyTorch model (check.check_response). Writes the result (rewritten after every shape: a cut run keeps
what it measured) to --out or bench/results/history-cache-served-<cpu|cuda>.json. --deadline: no new
shape after that many seconds from the start (the build included), said in the result. Each phase (the
build, the server's start, per shape its first request, the uncached, filling and cached requests, the
float64 check) prints a timestamped line as it starts: a run cut by its time limit shows where it was.
``--session-users N`` adds the session workload served (bench/history_cache_served_session.py) after the
shapes, under the result's ``session``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result
from bench.history_cache_timeline import Clock


def bench_spec(
    base: Path, folder: Path, budget_mb: float = 1024, instances: int | None = None, threads: int = 1
) -> Path:
    """``base`` with every table cut to at most 10,000 rows and the history cache on with ``budget_mb`` per
    store (a fused spec: one store per instance, the spec's backend only; ``instances``: that many instances
    and stores instead of the spec's instance_count, behind the router); ``threads``: intra_op_threads."""
    from grc.spec.loader import load_spec

    spec = load_spec(base).spec
    tables = {
        name: {"vocab_size": min(t.vocab_size, 10_000), **({"dim": t.dim} if t.dim else {})}
        for name, t in spec.model.tables.items()
    }
    triton = spec.bundles.triton
    cache: dict[str, Any] = {"enabled": True, "budget_mb": budget_mb}
    over: dict[str, Any] = {"history_cache": cache, "intra_op_threads": threads}
    if triton.pipeline == "fused":
        cache["instances"] = instances or triton.instance_count
        over["extra_backends"] = []
        if instances:
            over["instance_count"] = instances
    data = {
        "extends": str(base.resolve()),
        "name": f"{spec.name}-bench",
        "model": {"tables": tables},
        "bundles": {"triton": over},
    }
    path = folder / f"{spec.name}-bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed(url: str, model: str, arrays: dict[str, np.ndarray], count: int) -> tuple[list[float], dict[str, np.ndarray]]:
    """``count`` requests one after another over ONE gRPC connection, as a serving client keeps it (a channel per
    request added ~8 ms of connection set-up to every request of the session-8 H200 run, both modes alike): their
    latencies (building the request included) and the last response."""
    import tritonclient.grpc as grpc

    from grc.serving.common import request as rq
    from grc.serving.triton import check

    times, result = [], None
    with grpc.InferenceServerClient(url) as client:
        for _ in range(count):
            start = time.perf_counter()
            result = client.infer(model, check.infer_inputs(grpc, arrays), client_timeout=600)
            times.append(time.perf_counter() - start)
    return times, ({} if result is None else {name: result.as_numpy(name) for name in rq.OUTPUTS})


# the session workload's cost beyond its two timed modes (warm-up, float64 checks), and how long after --deadline the
# device script kills the bench (bench/gpu_run_history_served.sh: at BUDGET - 10 s, --deadline BUDGET - 90 s)
SESSION_EXTRA_S, DEADLINE_SLACK_S = 30.0, 80.0
PHASE_FLUSH_S = 0.3  # the fused model sends its phase counters at most every 0.25 s (models/fused.py)
TRITON_COUNTERS = ("nv_inference_exec_count", "nv_inference_compute_infer_duration_us",
                   "nv_inference_queue_duration_us", "nv_inference_request_duration_us")  # fmt: skip


def counters(metrics_url: str, stores: list[str]) -> dict[str, float]:
    """The fused model's phase counters (grc_phase_*, grc_dense_device_seconds_total) and Triton's own per-model
    counters, summed over the stores; names a model does not export are absent."""
    from grc.serving.ranker.phases import PHASES
    from grc.serving.triton import check

    text = check.metrics_text(metrics_url, timeout_s=10)
    names = [f"grc_phase_{p}_seconds_total" for p in PHASES]
    names += ["grc_phase_executes_total", "grc_dense_device_seconds_total", *TRITON_COUNTERS]
    out = {}
    for name in names:
        found = [v for m in stores if (v := check.metric(text, name, m)) is not None]
        if found:
            out[name] = sum(found)
    return out


def phased(
    server: Any, model: str, stores: list[str], arrays: dict[str, np.ndarray], count: int
) -> tuple[list[float], dict[str, np.ndarray], dict[str, float]]:
    """``timed`` with where the server spent it: the counters read before and after, each read after one more
    request of the same kind sent PHASE_FLUSH_S after the last (the fused model sends its phase counters only
    from an execute, at most every 0.25 s), so the delta covers the timed requests and one flushing request,
    all of one kind. -> latencies, the last response, ms per execute of each phase / Triton counter."""

    def flushed() -> dict[str, float]:
        time.sleep(PHASE_FLUSH_S)
        timed(server.grpc_url, model, arrays, 1)
        return counters(server.metrics_url, stores)

    before = flushed()
    times, response = timed(server.grpc_url, model, arrays, count)
    return times, response, per_execute(before, flushed())


def per_execute(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Two ``counters`` reads -> ms per execute of each phase / Triton counter between them: grc's counters
    over the executes they cover (their own count), Triton's over Triton's; the execute counts themselves."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    executes = {"grc": delta("grc_phase_executes_total"), "nv": delta("nv_inference_exec_count")}
    split: dict[str, float] = {"executes": executes["nv"], "grc_executes": executes["grc"]}
    for name in after.keys() & before.keys():
        n = executes["nv" if name.startswith("nv_") else "grc"]
        if n > 0 and not name.endswith(("exec_count", "executes_total")):
            split[name] = delta(name) * (1e-3 if name.endswith("_us") else 1e3) / n  # ms per execute
    return split


# the cache's counters, and the graphs the fused model captured while serving (0 where a model exports none)
CACHE_FIGURES = {"hits": "grc_history_cache_hits_total", "misses": "grc_history_cache_misses_total",
                 "evictions": "grc_history_cache_evictions_total", "bytes": "grc_history_cache_bytes",
                 # the arena's (store: arena; 0 from a store of copies): entries grown where they lie vs moved
                 "in_place": "grc_history_cache_in_place_total", "moves": "grc_history_cache_moves_total",
                 "splits": "grc_history_cache_splits_total", "unplaced": "grc_history_cache_unplaced_total",
                 "graph_captures": "grc_cuda_graph_captures_total",
                 "graph_capture_s": "grc_cuda_graph_capture_seconds_total",
                 "graph_capture_warmup_s": "grc_cuda_graph_capture_warmup_seconds_total",
                 "graph_capture_first_run_s": "grc_cuda_graph_capture_first_run_seconds_total",
                 "graph_capture_wait_s": "grc_cuda_graph_capture_wait_seconds_total",
                 "graph_capture_compiles": "grc_cuda_graph_capture_compiles_total",
                 "graph_capture_tunings": "grc_cuda_graph_capture_tunings_total",
                 "graph_capture_device_allocs": "grc_cuda_graph_capture_device_allocs_total"}  # fmt: skip


def cache_figures(metrics_url: str, stores: list[str]) -> dict[str, float]:
    """The stores' cache figures (CACHE_FIGURES), each summed over every store (one model per store; labelled
    with its name)."""
    from grc.serving.triton import check

    text = check.metrics_text(metrics_url, timeout_s=10)
    return {key: sum(check.metric(text, name, m) or 0.0 for m in stores) for key, name in CACHE_FIGURES.items()}


def hits(metrics_url: str, stores: list[str]) -> float:
    return cache_figures(metrics_url, stores)["hits"]


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "requests": len(ordered),
    }


def session_args(ap: argparse.ArgumentParser) -> None:
    """The served session workload's options (bench/history_cache_served_session.py), after the shapes."""
    g = ap.add_argument_group("session workload (after the shapes; --session-users 0: none)")
    g.add_argument("--session-users", type=int, default=0, help="users, 5 visits each, Zipf popularity")
    g.add_argument("--session-s", type=float, default=60.0, help="seconds per mode (uncached, cached), at most")
    g.add_argument(
        "--session-concurrency", type=int, nargs="+", default=[1], help="clients, one gRPC connection each (a run each)"
    )
    g.add_argument("--session-base", type=int, default=1000, help="history events at a user's first visit")
    g.add_argument("--session-delta", type=int, default=10, help="new history events per later visit")
    g.add_argument("--session-candidates", type=int, default=256)
    g.add_argument("--session-gap-s", type=int, default=60, help="seconds between a user's visits")
    g.add_argument("--session-zipf", type=float, default=1.1)
    g.add_argument(
        "--session-warm",
        action="store_true",
        help="before each run's timed modes, both modes once untimed at the same concurrency under user ids of "
        "their own: the cached step's shapes captured, the store filled (a server in steady state)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="specs/mtgr-small.yaml")
    ap.add_argument("--requests", type=int, default=5, help="timed requests per shape and mode")
    ap.add_argument("--out", help="result file (default bench/results/history-cache-served-<device>.json)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds from the start after which no shape starts")
    ap.add_argument("--startup-timeout", type=float, default=300, help="seconds the server may take to load")
    ap.add_argument("--budget-mb", type=float, default=1024, help="the history cache's budget per store")
    ap.add_argument("--skip-shapes", action="store_true", help="no per-shape latencies (the session workload only)")
    ap.add_argument(
        "--instances",
        type=int,
        default=None,
        help="a fused spec's instances (one store each, behind the router; requests without user_id go to them in "
        "turn): both modes run on them (default: the spec's instance_count)",
    )
    ap.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="bundles.triton.intra_op_threads of the bench's bundle (torch's host threads per instance; 0: every core)",
    )
    session_args(ap)
    args = ap.parse_args()
    started = time.perf_counter()
    clock = Clock()
    clock.say(f"history_cache_served.py: {args.spec}, {args.requests} requests per shape and mode")

    import torch

    from grc.build.runner import build
    from grc.model.sample import random_batch
    from grc.serving.common import request as rq
    from grc.serving.triton import bundle as bd
    from grc.serving.triton import check
    from grc.serving.triton.server import TritonServer
    from grc.spec.loader import load_spec

    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"base_spec": args.spec, "requests": args.requests, "cases": rows}
    result["instances"] = args.instances  # None: the spec's instance_count (the built spec's, in the bundle)
    result["intra_op_threads"] = args.intra_op_threads
    with tempfile.TemporaryDirectory(prefix="grc-history-bench-") as tmp:
        loaded = load_spec(
            bench_spec(Path(args.spec), Path(tmp), args.budget_mb, args.instances, args.intra_op_threads)
        )
        spec, model = loaded.spec, loaded.spec.model
        device = "cuda" if spec.bundles.triton.instance_kind == "KIND_GPU" else "cpu"
        out: Path | str = Path(args.out) if args.out else f"history-cache-served-{device}"

        def save() -> None:
            write_result(out, result)

        root = Path(tmp) / "artifacts" / spec.name
        result.update(spec=spec.name, pipeline=spec.bundles.triton.pipeline, backend=spec.bundles.triton.backend)
        clock.say(f"build: the triton bundle of {spec.name} (tables cut to 10,000 rows, the cache on)")
        if build(loaded, root, only=["triton"]) != 0:
            result["error"] = "grc build of the triton bundle failed (its log above)"
            save()
            return 2  # bench/gpu_run_history_served.sh tells a failed build from a failed check
        result["build_s"] = round(time.perf_counter() - started, 1)
        folder = root / "triton"
        description = bd.load_description(folder)
        cache = description["history_cache"]
        cached_model, stores = description["ensemble"], cache["models"]
        ensemble = description["ensembles"].get("onnxruntime") if spec.bundles.triton.pipeline == "ensemble" else None
        # what the cached model computes a request without user_id with: the fused model's backend, or
        # history_cached's GRDense (the names bench/report.py reads for an ensemble spec)
        via: str = spec.bundles.triton.backend if spec.bundles.triton.pipeline == "fused" else "pytorch"
        result.update(cached_model=cached_model, stores=stores, scoring=cache["scoring"], uncached_path=via)
        tolerance = bd.served_tolerance(description, spec)
        result["tolerance"] = tolerance.model_dump()
        reference = check.Reference(model, bd.bundle_model(folder)[1])
        weights = rq.rank_weights(model, spec.bundles.triton)
        candidates = model.max_candidates
        longest = model.hstu.max_seq_len - candidates - len(model.profile)
        save()
        clock.say(f"tritonserver: starting ({cached_model}, stores {stores}; at most {args.startup_timeout:.0f} s)")
        with TritonServer(folder / bd.MODEL_REPOSITORY, startup_timeout_s=args.startup_timeout) as server:
            result["server_ready_s"] = round(time.perf_counter() - started, 1)
            clock.say(f"tritonserver: ready after {result['server_ready_s']} s")
            # the longest history first: the target shape, measured before a --deadline can cut the run
            lengths = [] if args.skip_shapes else sorted({min(1000, longest), longest}, reverse=True)
            for user, history in enumerate(lengths):
                if args.deadline is not None and time.perf_counter() - started > args.deadline:
                    rows.append({"history": history, "skipped": f"past --deadline {args.deadline} s"})
                    clock.say(f"history {history}: skipped (past --deadline {args.deadline} s)")
                    save()
                    continue
                batch = random_batch(model, 1, history, candidates, torch.Generator().manual_seed(history))
                arrays = rq.user_request(batch, 0, model)
                with_user = {**arrays, "user_id": np.array([[user]], np.int64)}
                label = f"history {history} x {candidates}"
                clock.say(f"{label}: first request without user_id (untimed: allocations, kernels compiled)")
                timed(server.grpc_url, cached_model, arrays, 1)
                clock.say(f"{label}: {args.requests} uncached requests (+ 2 that flush the phase counters)")
                whole, plain, plain_phases = phased(server, cached_model, stores, arrays, args.requests)
                clock.say(f"{label}: the request with user_id that fills the cache (a miss, untimed)")
                timed(server.grpc_url, cached_model, with_user, 1)
                before = hits(server.metrics_url, stores)
                clock.say(f"{label}: the first hit (timed apart: its padded shape's CUDA graph is captured here)")
                first_hit, _ = timed(server.grpc_url, cached_model, with_user, 1)
                clock.say(f"{label}: {args.requests} cached requests (hits; + 2 that flush the phase counters)")
                hit, cached, hit_phases = phased(server, cached_model, stores, with_user, args.requests)
                hits_counted = hits(server.metrics_url, stores) - before - 2  # less the two flushing requests
                clock.say(f"{label}: the float64 PyTorch model, the checks")
                expected = reference.scores(arrays)
                top_k = spec.bundles.triton.top_k
                problems = {
                    name: check.check_response(response, expected, arrays, model, weights, top_k, tolerance).problems
                    for name, response in (("uncached", plain), ("cached", cached))
                }
                plain_s, cached_s = plain["scores"], cached["scores"]
                row: dict[str, Any] = {
                    "history": history,
                    "candidates": candidates,
                    f"uncached_{via}": summary(whole),
                    "cached_hit": summary(hit),
                    "first_hit_ms": first_hit[0] * 1e3,
                    "phases_ms_per_execute": {"uncached": plain_phases, "cached_hit": hit_phases},
                    "hits_counted": hits_counted,
                    f"speedup_p50_vs_{via}": statistics.median(whole) / statistics.median(hit),
                    "max_abs_diff_cached_vs_uncached": float(np.abs(cached_s - plain_s).max()),
                    "max_abs_diff_cached_vs_float64": float(np.abs(cached_s - expected).max()),
                    "max_abs_diff_uncached_vs_float64": float(np.abs(plain_s - expected).max()),
                    "problems_vs_float64": problems,
                }
                if ensemble is not None:
                    onnx, onnx_scores = timed(server.grpc_url, ensemble, arrays, args.requests)
                    row["uncached_onnxruntime_ensemble"] = summary(onnx)
                    row["speedup_p50_vs_onnxruntime"] = statistics.median(onnx) / statistics.median(hit)
                    row["max_abs_diff_onnx_vs_cached"] = float(np.abs(onnx_scores["scores"] - cached_s).max())
                clean = row["hits_counted"] == args.requests + 1 and not any(problems.values())  # the first hit too
                row["clean"] = clean
                print(("" if clean else "NOT CLEAN: ") + str(row), flush=True)
                rows.append(row)
                save()
            if args.session_users > 0:
                runs = len(args.session_concurrency)
                passes = 4 if args.session_warm else 2  # (the warm passes and) the timed modes, at most session_s each
                ends = time.perf_counter() - started + runs * (passes * args.session_s + SESSION_EXTRA_S)
                if args.deadline is not None and ends > args.deadline + DEADLINE_SLACK_S:
                    result["session"] = {"skipped": f"would end at {ends:.0f} s, past --deadline {args.deadline} s"}
                    clock.say(f"session workload: skipped ({result['session']['skipped']})")
                else:
                    from bench.history_cache_served_session import session

                    result["session"] = session(
                        server, cached_model, stores, loaded, reference, tolerance, args, clock.say
                    )
                save()
    result["total_s"] = round(time.perf_counter() - started, 1)
    path = write_result(out, result)
    print(f"wrote {path}")
    clean = (rows or args.skip_shapes) and all(r.get("clean", True) for r in rows)
    clean = clean and result.get("session", {}).get("clean", True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
