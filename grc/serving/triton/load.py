"""A bounded load test of a served bundle: a fixed number of requests, a fixed concurrency, a time limit.

``concurrency`` threads each hold one gRPC connection and send requests back to back (closed
loop), cycling through a pool of random requests of varied lengths. Reports requests/s, latency
percentiles, errors, and the batch sizes Triton's dynamic batcher formed meanwhile (per model,
from the statistics extension) plus the Prometheus counters that show the same.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grc.serving.common import request as rq
from grc.serving.common.loop import closed_loop
from grc.serving.triton import check
from grc.spec.schema import ModelConfig


def request_pool(
    cfg: ModelConfig, count: int, seed: int = 0, max_history: int = 32, max_candidates: int = 16
) -> list[dict[str, np.ndarray]]:
    """``count`` single-user requests, history and candidate counts varied (1..max)."""
    import torch

    from grc.model.sample import random_batch

    gen = torch.Generator().manual_seed(seed)
    h = max(1, min(max_history, rq.max_history(cfg)))
    c = max(1, min(max_candidates, cfg.max_candidates))
    batch = random_batch(cfg, count, h, c, gen)
    return [rq.user_request(batch, u, cfg) for u in range(count)]


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    batch_sizes: dict[str, dict[int, int]] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)
    first_error: str | None = None
    timed_out: bool = False

    @property
    def completed(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def mean_batch(self, model: str) -> float:
        sizes = self.batch_sizes.get(model, {})
        executions = sum(sizes.values())
        return sum(b * n for b, n in sizes.items()) / executions if executions else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "errors": self.errors,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.throughput, 1),
            "latency_ms": {
                "p50": round(self.percentile(50), 2),
                "p90": round(self.percentile(90), 2),
                "p99": round(self.percentile(99), 2),
                "max": round(max(self.latencies_ms, default=0), 2),
            },
            "batch_sizes": {m: {str(b): n for b, n in sorted(s.items())} for m, s in self.batch_sizes.items()},
            "mean_batch": {m: round(self.mean_batch(m), 2) for m in self.batch_sizes},
            "metrics": self.metrics,
            "timing": self.timing,
            "first_error": self.first_error,
            "timed_out": self.timed_out,
        }


PROMETHEUS = (
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_success",
    "nv_inference_request_failure",
)
# grc's own counters of a python model (pb_utils.MetricFamily, label model): CUDA-graph hits, misses, padding
GRC_METRIC = re.compile(r"^(?P<name>grc_\w+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)
# Triton's per-model statistics: cumulative (count, ns) per phase of a request
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")

Validate = Callable[[int, Any], None]


def run_load(
    grpc_url: str,
    metrics_url: str | None,
    model: str,
    pool: list[dict[str, np.ndarray]],
    requests: int = 2000,
    concurrency: int = 8,
    time_limit_s: float = 120.0,
    models: tuple[str, ...] = (),
    validate: Validate | None = None,
) -> LoadResult:
    """Send ``requests`` requests from ``concurrency`` threads; stop early past ``time_limit_s``.
    ``validate(pool_index, result)`` sees every answer and raises on a wrong one: counted as an error."""
    import tritonclient.grpc as grpcclient

    watched = (model, *models)
    before = {m: check.batch_sizes(grpc_url, m) for m in watched}
    timing_before = statistics(grpc_url, watched)
    prom_before = _prometheus(metrics_url, watched)
    prepared = [check.infer_inputs(grpcclient, r) for r in pool]

    class Grpc:
        def __init__(self) -> None:
            self.client = grpcclient.InferenceServerClient(grpc_url)

        def send(self, index: int) -> Any:
            result = self.client.infer(model, prepared[index % len(prepared)], client_timeout=30)
            if validate is not None:
                validate(index % len(prepared), result)
            return result

        def close(self) -> None:
            self.client.close()

    loop = closed_loop(Grpc, requests, concurrency, time_limit_s)
    after = {m: check.batch_sizes(grpc_url, m) for m in watched}
    sizes = {
        m: {b: n - before[m].get(b, 0) for b, n in after[m].items() if n - before[m].get(b, 0) > 0} for m in watched
    }
    prom_after = _prometheus(metrics_url, watched)
    metrics = {m: {k: prom_after[m][k] - prom_before[m].get(k, 0.0) for k in prom_after[m]} for m in prom_after}
    timing = {m: per_request_ms(timing_before[m], t) for m, t in statistics(grpc_url, watched).items()}
    return LoadResult(
        requests=requests,
        concurrency=concurrency,
        errors=len(loop.errors),
        seconds=loop.seconds,
        latencies_ms=loop.latencies_ms,
        batch_sizes=sizes,
        metrics=metrics,
        timing=timing,
        first_error=loop.errors[0] if loop.errors else None,
        timed_out=loop.issued < requests,
    )


def _prometheus(url: str | None, models: tuple[str, ...]) -> dict[str, dict[str, float]]:
    if url is None:
        return {}
    # counters are bumped as responses are sent; give the last ones a moment
    time.sleep(0.5)
    text = check.metrics_text(url)
    out: dict[str, dict[str, float]] = {}
    for model in models:
        values = {name: check.metric(text, name, model) for name in PROMETHEUS}
        out[model] = {k: v for k, v in values.items() if v is not None}
        for found in GRC_METRIC.finditer(text):
            if f'model="{model}"' in found["labels"]:
                # a counter per label set (a bucket, a GPU): summed, so the row shows the model's total
                out[model][found["name"]] = out[model].get(found["name"], 0.0) + float(found["value"])
    return out


def statistics(grpc_url: str, models: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Cumulative counters of each model (all its versions): requests, executions, and (count, ns) per phase."""
    import tritonclient.grpc as grpcclient

    out: dict[str, dict[str, float]] = {}
    with grpcclient.InferenceServerClient(grpc_url) as client:
        for model in models:
            totals = dict.fromkeys(("inference_count", "execution_count"), 0.0)
            for s in client.get_inference_statistics(model).model_stats:
                totals["inference_count"] += s.inference_count
                totals["execution_count"] += s.execution_count
                for phase in PHASES:
                    duration = getattr(s.inference_stats, phase)
                    totals[f"{phase}_count"] = totals.get(f"{phase}_count", 0.0) + duration.count
                    totals[f"{phase}_ns"] = totals.get(f"{phase}_ns", 0.0) + duration.ns
            out[model] = totals
    return out


def per_request_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What happened between two ``statistics`` readings: requests, executions, mean batch, and the mean
    milliseconds per request of each phase (queue: waiting for an instance; compute_*: inside the model)."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out = {
        "requests": delta["inference_count"],
        "executions": delta["execution_count"],
        "mean_batch": round(delta["inference_count"] / delta["execution_count"], 2)
        if delta["execution_count"]
        else 0.0,
    }
    for phase in PHASES:
        count = delta.get(f"{phase}_count", 0.0)
        out[f"{phase}_ms"] = round(delta.get(f"{phase}_ns", 0.0) / count / 1e6, 3) if count else 0.0
    return out
