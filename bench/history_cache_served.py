"""Served latency of the history cache on a real tritonserver (loopback only), one user at a time.

    python bench/history_cache_served.py [--spec specs/mtgr-small.yaml] [--requests 5]

Builds the spec with its embedding tables cut to 10,000 rows (the dense model, the part the cache
saves, keeps its size; the tables would cost GBs and change nothing measured here) and the history
cache on, starts tritonserver, and per shape (1 user x history {1000, max_seq_len - max_candidates -
profile} x max_candidates candidates) times --requests requests each of: the history-cached model
without user_id (computed whole), the onnxruntime ensemble (the compiled uncached path), and the
history-cached model with user_id after one untimed request that fills the cache (hits, candidates
only). Checks that cached and uncached scores agree and that every timed cached request was a hit
(from the metrics endpoint). Writes bench/results/history-cache-served-<cpu|cuda>.json.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result


def bench_spec(base: Path, folder: Path) -> Path:
    """``base`` with every table cut to at most 10,000 rows and the history cache on."""
    from grc.spec.loader import load_spec

    spec = load_spec(base).spec
    tables = {
        name: {"vocab_size": min(t.vocab_size, 10_000), **({"dim": t.dim} if t.dim else {})}
        for name, t in spec.model.tables.items()
    }
    data = {
        "extends": str(base.resolve()),
        "name": f"{spec.name}-bench",
        "model": {"tables": tables},
        "bundles": {"triton": {"history_cache": {"enabled": True, "budget_mb": 1024}, "intra_op_threads": 1}},
    }
    path = folder / f"{spec.name}-bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed(url: str, model: str, arrays: dict[str, np.ndarray], count: int) -> tuple[list[float], np.ndarray]:
    from grc.serving.triton import check

    times, scores = [], np.zeros(0)
    for _ in range(count):
        start = time.perf_counter()
        scores = check.infer(url, "grpc", model, arrays, timeout_s=600)["scores"]
        times.append(time.perf_counter() - start)
    return times, scores


def hits(metrics_url: str, model: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.search(r'^grc_history_cache_hits_total\{model="' + re.escape(model) + r'"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "requests": len(ordered),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="specs/mtgr-small.yaml")
    ap.add_argument("--requests", type=int, default=5, help="timed requests per shape and mode")
    ap.add_argument("--out", help="result file (default bench/results/history-cache-served-<device>.json)")
    args = ap.parse_args()

    import torch

    from grc.build.runner import build
    from grc.model.sample import random_batch
    from grc.serving.common import request as rq
    from grc.serving.triton import bundle as bd
    from grc.serving.triton.server import TritonServer
    from grc.spec.loader import load_spec

    rows = []
    with tempfile.TemporaryDirectory(prefix="grc-history-bench-") as tmp:
        loaded = load_spec(bench_spec(Path(args.spec), Path(tmp)))
        spec, model = loaded.spec, loaded.spec.model
        root = Path(tmp) / "artifacts" / spec.name
        if build(loaded, root, only=["triton"]) != 0:
            return 1
        names = bd.load_description(root / "triton")
        cached_model, ensemble = names["ensemble"], names["ensembles"]["onnxruntime"]
        candidates = model.max_candidates
        longest = model.hstu.max_seq_len - candidates - len(model.profile)
        with TritonServer(root / "triton" / bd.MODEL_REPOSITORY, startup_timeout_s=300) as server:
            for user, history in enumerate((1000, longest)):
                batch = random_batch(model, 1, history, candidates, torch.Generator().manual_seed(history))
                arrays = rq.user_request(batch, 0, model)
                with_user = {**arrays, "user_id": np.array([[user]], np.int64)}
                whole, plain = timed(server.grpc_url, cached_model, arrays, args.requests)
                onnx, onnx_scores = timed(server.grpc_url, ensemble, arrays, args.requests)
                timed(server.grpc_url, cached_model, with_user, 1)  # fills the cache (a miss)
                before = hits(server.metrics_url, cached_model)
                hit, cached = timed(server.grpc_url, cached_model, with_user, args.requests)
                hit_count = hits(server.metrics_url, cached_model) - before
                row = {
                    "history": history,
                    "candidates": candidates,
                    "uncached_pytorch": summary(whole),
                    "uncached_onnxruntime_ensemble": summary(onnx),
                    "cached_hit": summary(hit),
                    "hits_counted": hit_count,
                    "speedup_p50_vs_pytorch": statistics.median(whole) / statistics.median(hit),
                    "speedup_p50_vs_onnxruntime": statistics.median(onnx) / statistics.median(hit),
                    "max_abs_diff_cached_vs_uncached": float(np.abs(cached - plain).max()),
                    "max_abs_diff_onnx_vs_cached": float(np.abs(onnx_scores - cached).max()),
                }
                print(row, flush=True)
                rows.append(row)
    device = "cuda" if spec.bundles.triton.instance_kind == "KIND_GPU" else "cpu"
    out = args.out or f"history-cache-served-{device}"
    path = write_result(
        Path(out) if args.out else out,
        {"spec": spec.name, "base_spec": args.spec, "requests": args.requests, "cases": rows},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
