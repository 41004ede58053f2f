"""Bounded load test of the triton bundle on a real tritonserver (loopback only).

    python bench/triton_load.py [--spec specs/hstu-tiny.yaml] [--requests 2000] [--concurrency 8]

Builds the spec's bundle (into a temporary folder unless --artifacts names a built one), starts
tritonserver on 127.0.0.1, checks a few answers against PyTorch, then sends --requests requests
from --concurrency gRPC clients (closed loop, random requests of varied lengths, --time-limit
bound). Prints requests/s, latency percentiles and the batch sizes the dynamic batcher formed,
then the same with max_batch_size 1 (batching off) for comparison, and writes
bench/results/triton-load.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_test_parser, write_result


def main() -> int:
    parser = load_test_parser(__doc__, "<spec>/triton", 300.0, "triton-load")
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the max_batch_size 1 run (same bundle, batching off)",
    )
    args = parser.parse_args()

    from grc.build.runner import build
    from grc.serving.triton import bundle as bd
    from grc.serving.triton import load
    from grc.spec.loader import load_spec

    loaded = load_spec(args.spec)
    spec = loaded.spec
    runs = {}
    with tempfile.TemporaryDirectory(prefix="grc-triton-load-") as tmp:
        artifacts = args.artifacts or Path(tmp)
        root = artifacts / spec.name
        if not (root / "triton" / "manifest.json").is_file() and build(loaded, root, only=["triton"]) != 0:
            return 1
        pool = load.request_pool(spec.model, 64, seed=1)
        runs["dynamic batching"] = measure(spec, root / "triton", pool, args)
        if args.baseline:  # the same bundle with max_batch_size 1: what batching buys
            one = spec.bundles.triton.model_copy(update={"max_batch_size": 1, "preferred_batch_sizes": [1]})
            unbatched = spec.model_copy(update={"bundles": spec.bundles.model_copy(update={"triton": one})})
            folder = Path(tmp) / "unbatched"
            bd.write_bundle(unbatched, root / "weights", root / "onnx", folder, log=lambda _: None)
            runs["max_batch_size 1"] = measure(unbatched, folder, pool, args)
    print(
        f"{spec.name}: {args.requests} requests per round at concurrency {args.concurrency} (loopback gRPC), "
        f"median of {args.rounds} rounds"
    )
    print(
        f"{'run':<18} {'errors':>6} {'requests/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8}  dense_onnx batch sizes (executions)"
    )
    for name, s in runs.items():
        lat = s["latency_ms"]
        sizes = ", ".join(f"{b}: {n}" for b, n in s["batch_sizes"]["dense_onnx"].items())
        print(
            f"{name:<18} {s['errors']:>6} {s['requests_per_s']:>10.1f} {lat['p50']:>8.2f} {lat['p90']:>8.2f} "
            f"{lat['p99']:>8.2f} {lat['max']:>8.2f}  {sizes} (mean {s['mean_batch']['dense_onnx']})"
        )
        print(f"{'':<18} rounds (requests/s): {', '.join(str(r['requests_per_s']) for r in s['rounds'])}")
    main_run = runs["dynamic batching"]
    for model, m in main_run["metrics"].items():
        print(f"prometheus {model:<12} " + ", ".join(f"{k} +{v:g}" for k, v in m.items()))
    path = write_result(
        args.out,
        {
            "what": "grc's triton bundle on tritonserver 2.51 (nvidia-pytriton 0.7.0), CPU, loopback gRPC, "
            "closed loop: each client thread sends its next request when the last one is answered; "
            "client and server share the machine's cores",
            "spec": spec.name,
            "bundle": {
                k: getattr(spec.bundles.triton, k)
                for k in (
                    "max_batch_size",
                    "preferred_batch_sizes",
                    "max_queue_delay_us",
                    "instance_count",
                    "intra_op_threads",
                )
            },
            "request_pool": "64 random users, history 1..32 events, 1..16 candidates",
            **main_run,
            "baseline_max_batch_size_1": runs.get("max_batch_size 1"),
        },
    )
    print(f"wrote {path}")
    clean = all(r["errors"] == 0 for run in runs.values() for r in run["rounds"])
    return 0 if clean and not any(r["timed_out"] for r in runs.values()) else 1


def measure(spec, folder: Path, pool: list, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """Start the server on ``folder``, check answers against PyTorch, warm up, run the load."""
    from grc.serving.triton import bundle as bd
    from grc.serving.triton import check, load
    from grc.serving.triton.server import TritonServer, ensure_tritonserver

    ensemble = bd.load_description(folder)["ensemble"]
    weights = folder / bd.MODEL_REPOSITORY / bd.PREPROCESS / str(spec.bundles.triton.model_version) / "weights"
    reference = check.Reference(spec.model, weights, spec.bundles.triton.truncate_history)
    with TritonServer(folder / bd.MODEL_REPOSITORY, install=ensure_tritonserver(), startup_timeout_s=180) as server:
        worst = 0.0
        for arrays in pool[:16]:  # answers are right before they are fast
            result = check.spec_check(
                spec, check.infer(server.grpc_url, "grpc", ensemble, arrays), reference.scores(arrays), arrays
            )
            if not result.ok:
                raise SystemExit(f"wrong answer: {result.problems}")
            worst = max(worst, result.max_abs)
        load.run_load(server.grpc_url, None, ensemble, pool, requests=100, concurrency=args.concurrency)  # warm
        rounds = [
            load.run_load(
                server.grpc_url,
                server.metrics_url,
                ensemble,
                pool,
                requests=args.requests,
                concurrency=args.concurrency,
                time_limit_s=args.time_limit,
                models=("preprocess", "dense_onnx", "postprocess"),
            ).summary()
            for _ in range(args.rounds)
        ]
    # the machine is shared: report the median round by throughput, list them all
    median = sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]
    return {
        **median,
        "rounds": [
            {"requests_per_s": r["requests_per_s"], "errors": r["errors"], "latency_ms": r["latency_ms"]}
            for r in rounds
        ],
        "checked_vs_pytorch": {"requests": 16, "max_abs": worst},
    }


if __name__ == "__main__":
    sys.exit(main())
