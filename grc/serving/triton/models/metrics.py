"""Triton custom metrics of a python model (``pb_utils.MetricFamily``, on the server's metrics port),
written once for the models that export them (fused.py, history_cached.py).

A counter is fed the model's running totals and increments by what is new; a gauge is set when it changes.
Every metric carries the label ``model`` (the model's name). Each change is one synchronous message from
the python backend's stub to the server (measured 30-60 us on a loaded CPU): a family updated every
execute() but read only as totals (the phase seconds of fused.py, the CUDA-graph hits) is sent at most every
``every_s``; a change of an ``urgent`` key (a CUDA-graph miss: a batch that ran outside the captured graphs) is
sent at once, with the totals that waited. With ``trailing``, totals held back are sent by a thread of the model's
once the interval is over, whether or not another execute() comes: a reader of the endpoint sees every change at most
``every_s`` after it happened (what the history cache's counters promise the tests and operators that read them).

The user-history cache's figures are declared and read here once for both models that keep a cache
(``HistoryCacheMetrics``): the store's (``HISTORY_CACHE``) and, where the entries live in the arena, the
arena's (``HISTORY_ARENA``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
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


# The history cache's figures change every execute(): sent each time they cost 0.22-0.33 ms of a served execute on the
# H200 (3-5 messages of 30-60 us; history-cache-served-h200-s22-*.json, grc_phase_metrics) against 0.05 ms uncached.
# Sent as the phase metrics are (fused.PHASE_EVERY_S), with the trailing send that keeps the totals exact once idle.
HISTORY_CACHE_EVERY_S = 0.25

Values = Mapping[str, float]


class Metrics:
    def __init__(
        self,
        model: str,
        declared: Mapping[str, tuple[str, str, bool]],
        every_s: float = 0.0,
        urgent: frozenset[str] = frozenset(),
        trailing: bool = False,
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
        self.trailing = trailing and every_s > 0
        # the values held back (a mapping, or what reads them when sent), for the trailing thread; the lock orders
        # its sends with execute()'s (a counter's increment is the difference to what was reported)
        self.held: Values | Callable[[], Values] | None = None
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def update(self, values: Values | Callable[[], Values]) -> None:
        """``values``: key -> the running total (a counter) or the current value (a gauge), or a function that
        reads them (called only when they are sent: a throttled update then costs no read); with ``every_s``,
        nothing is sent until that long after the last update that was (the totals catch up then, or with
        ``trailing`` from the model's own thread once the interval is over), unless an ``urgent`` key changed."""
        with self.cond:
            if self.every_s:
                now = time.monotonic()
                if now - self.sent_at < self.every_s and not self._urgent(values):
                    if self.trailing:
                        if self.held is None:  # the thread waits for the interval's end
                            self.cond.notify()
                        self.held = values
                        self._start()
                    return
                self.sent_at = now
            self.held = None
            self._send(values)

    def flush(self) -> None:
        """Send what was held back now (the model is unloaded)."""
        with self.cond:
            held, self.held = self.held, None
            if held is not None:
                self.sent_at = time.monotonic()
                self._send(held)

    def _urgent(self, values: Values | Callable[[], Values]) -> bool:
        if not self.urgent:
            return False
        read = values() if callable(values) else values
        return any(read[key] != self.reported[key] for key in self.urgent)

    def _start(self) -> None:  # under the lock
        if self.thread is None:
            self.thread = threading.Thread(target=self._trail, name="grc-metrics", daemon=True)
            self.thread.start()

    def _trail(self) -> None:
        """The trailing sends: what an update held back goes out when its interval is over."""
        with self.cond:
            while True:
                while self.held is None:
                    self.cond.wait()
                wait = self.sent_at + self.every_s - time.monotonic()
                if wait > 0:
                    self.cond.wait(wait)  # an update may send them first (an urgent key): look again
                    continue
                held, self.held = self.held, None
                self.sent_at = time.monotonic()
                self._send(held)

    def _send(self, values: Values | Callable[[], Values]) -> None:  # under the lock
        if callable(values):
            values = values()
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
    Sent at most every HISTORY_CACHE_EVERY_S, read afresh from ``caches`` (its store, and its arena where it has one)
    when sent; what waits is sent by the trailing thread once the interval is over (``flush`` at unload)."""

    def __init__(self, model: str, caches: UserCaches, every_s: float = HISTORY_CACHE_EVERY_S):
        self.caches = caches
        self.metrics = Metrics(model, history_cache_declared(caches), every_s=every_s, trailing=True)

    def update(self) -> None:
        self.metrics.update(self.read)

    def read(self) -> dict[str, float]:
        return history_cache_values(self.caches)

    def flush(self) -> None:
        self.metrics.flush()
