"""Triton custom metrics of a python model (``pb_utils.MetricFamily``, on the server's metrics port),
written once for the models that export them (fused.py, history_cached.py).

A counter is fed the model's running totals and increments by what is new; a gauge is set.
Every metric carries the label ``model`` (the model's name). Each change is one synchronous message from
the python backend's stub to the server (measured 30-60 us on a loaded CPU): a family updated every
execute() but read only as totals (the phase seconds of fused.py, the CUDA-graph hits) is sent at most every
``every_s``; a change of an ``urgent`` key (a CUDA-graph miss: a batch that ran outside the captured graphs) is
sent at once, with the totals that waited.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from grc.serving.triton.models import tensor_io as io

# key -> (metric name, description, is a gauge): the user-history cache's figures (HistoryCache.stats)
HISTORY_CACHE = {
    "hits": ("grc_history_cache_hits_total", "requests (users) served from the history cache", False),
    "misses": ("grc_history_cache_misses_total", "users with user_id whose history had to be computed whole", False),
    "evictions": ("grc_history_cache_evictions_total", "entries evicted to stay within the byte budget", False),
    "bytes": ("grc_history_cache_bytes", "bytes of cached K/V and ids held", True),
}


class Metrics:
    def __init__(
        self,
        model: str,
        declared: Mapping[str, tuple[str, str, bool]],
        every_s: float = 0.0,
        urgent: frozenset[str] = frozenset(),
    ):
        pb = io.pb()
        self.families, self.metrics, self.gauges = [], {}, set()  # a Metric needs its MetricFamily alive
        for key, (name, description, gauge) in declared.items():
            kind = pb.MetricFamily.GAUGE if gauge else pb.MetricFamily.COUNTER
            family = pb.MetricFamily(name=name, description=description, kind=kind)
            self.families.append(family)
            self.metrics[key] = family.Metric(labels={"model": model})
            if gauge:
                self.gauges.add(key)
        self.reported: dict[str, float] = dict.fromkeys(declared, 0.0)
        self.every_s, self.sent_at, self.urgent = every_s, float("-inf"), urgent

    def update(self, values: Mapping[str, float]) -> None:
        """``values``: key -> the running total (a counter) or the current value (a gauge); with ``every_s``,
        nothing is sent until that long after the last update that was (the totals catch up then), unless
        an ``urgent`` key changed."""
        if self.every_s:
            now = time.monotonic()
            changed = any(values[key] != self.reported[key] for key in self.urgent)
            if now - self.sent_at < self.every_s and not changed:
                return
            self.sent_at = now
        for key, metric in self.metrics.items():
            value = values[key]
            if key in self.gauges:
                metric.set(value)
            elif value > self.reported[key]:
                metric.increment(value - self.reported[key])
                self.reported[key] = value
