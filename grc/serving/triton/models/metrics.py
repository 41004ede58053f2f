"""Triton custom metrics of a python model (``pb_utils.MetricFamily``, on the server's metrics port),
written once for the models that export them (fused.py, history_cached.py).

A counter is fed the model's running totals and increments by what is new; a gauge is set when it changes.
Every metric carries the label ``model`` (the model's name). Each change is one synchronous message from
the python backend's stub to the server (measured 30-60 us on a loaded CPU): a family updated every
execute() but read only as totals (the phase seconds of fused.py, the CUDA-graph hits) is sent at most every
``every_s``; a change of an ``urgent`` key (a CUDA-graph miss: a batch that ran outside the captured graphs) is
sent at once, with the totals that waited.

The user-history cache's figures are declared and read here once for both models that keep a cache
(``HistoryCacheMetrics``): the store's (``HISTORY_CACHE``) and, where the entries live in the arena, the
arena's (``HISTORY_ARENA``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from grc.serving.triton.models import tensor_io as io

if TYPE_CHECKING:
    from grc.serving.common.history_step import UserCaches

# key -> (metric name, description, is a gauge): the user-history cache's figures (HistoryCache.stats)
HISTORY_CACHE = {
    "hits": ("grc_history_cache_hits_total", "requests (users) served from the history cache", False),
    "misses": ("grc_history_cache_misses_total", "users with user_id whose history had to be computed whole", False),
    "evictions": ("grc_history_cache_evictions_total", "entries evicted to stay within the byte budget", False),
    "bytes": ("grc_history_cache_bytes", "bytes of cached K/V and ids held", True),
}

# key -> (metric name, description, is a gauge): the arena's figures (store arena: UserCaches.arena, an ArenaGraphs
# over a KVArena). Declared only where the store keeps its entries in the arena: a store of copies has no arena,
# and a 0 there would read as an arena that never split a step nor moved an entry. An operator tells the two apart
# by the metric's presence (the same rule as the history cache's figures, absent on a model without the cache).
HISTORY_ARENA = {
    "splits": ("grc_history_cache_splits_total", "cached steps the arena could not place whole (run in halves)", False),
    "unplaced": (
        "grc_history_cache_unplaced_total",
        "users the arena could not place even alone (scored eagerly, not kept)",
        False,
    ),
    "moves": ("grc_history_cache_moves_total", "entries a cached step copied to a new extent of the arena", False),
    "in_place": ("grc_history_cache_in_place_total", "entries a cached step grew where they lie in the arena", False),
    "arena_bytes": (
        "grc_history_cache_arena_bytes",
        "bytes of the arena allocated at load (the budget's rows, one step's headroom, padding scratch)",
        True,
    ),
}


def history_cache_declared(caches: UserCaches) -> dict[str, tuple[str, str, bool]]:
    """The history cache's metrics of a model holding ``caches`` (after ``UserCaches.use_store``): the store's,
    and the arena's where it has one."""
    return {**HISTORY_CACHE, **(HISTORY_ARENA if caches.arena is not None else {})}


def history_cache_values(caches: UserCaches) -> dict[str, float]:
    """The running totals and gauges of ``history_cache_declared(caches)``, read now."""
    values: dict[str, float] = dataclasses.asdict(caches.cache.stats())
    step = caches.arena
    if step is not None:
        arena = step.arena
        values.update(
            splits=step.splits,
            unplaced=step.unplaced,
            moves=arena.moves,
            in_place=arena.in_place,
            arena_bytes=arena.nbytes,
        )
    return values


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
                if value != self.reported[key]:  # a gauge that did not move costs no message (the arena's size)
                    metric.set(value)
                    self.reported[key] = value
            elif value > self.reported[key]:
                metric.increment(value - self.reported[key])
                self.reported[key] = value


class HistoryCacheMetrics:
    """The history cache's figures of one model (fused.py, history_cached.py): ``update()`` after each execute().
    Every update reads the counters afresh from ``caches`` (its store, and its arena where it has one)."""

    def __init__(self, model: str, caches: UserCaches):
        self.caches = caches
        self.metrics = Metrics(model, history_cache_declared(caches))

    def update(self) -> None:
        self.metrics.update(history_cache_values(self.caches))
