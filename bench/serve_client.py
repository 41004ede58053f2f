"""One more client process of a bench/serve.py row (--client-processes): Python's gRPC client holds the GIL, so
one process cannot issue as many requests as a GPU server answers; each extra process runs its share of the
row's connections on the same pool (rebuilt from the spec and seed), every answer's form checked, and writes
what it measured as JSON for the bench to add up. Started by bench/serve.py, not by hand."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("grpc-url", "model", "spec", "out"):
        p.add_argument(f"--{name}", required=True)
    for name in ("pool", "seed", "concurrency", "max-requests"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--go", required=True, help="a file whose appearance starts the load (all processes at once)")
    args = p.parse_args()

    from serve_modes import AnswerCheck
    from serve_pool import request_pool

    from grc.build.atomic import write_file
    from grc.serving.triton import load
    from grc.spec.loader import load_spec

    spec = load_spec(args.spec).spec
    pool = request_pool(spec.model, args.pool, args.seed)
    check = AnswerCheck(spec, pool, sample=0)
    Path(f"{args.out}.ready").touch()  # imports and pool done: the bench starts every process together
    while not Path(args.go).exists():
        time.sleep(0.002)
    result = load.run_load(
        args.grpc_url,
        None,
        args.model,
        pool,
        requests=args.max_requests,
        concurrency=args.concurrency,
        time_limit_s=args.seconds,
        validate=check.grpc,
    )
    figures = {
        "latencies_ms": result.latencies_ms,
        "errors": result.errors,
        "seconds": result.seconds,
        "first_error": result.first_error,
    }
    write_file(Path(args.out), json.dumps(figures).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
