"""The user-history cache store: per user the model's cached K/V, under a byte budget.

Pure Python + numpy + torch (no server): the Triton model ``dense_cached`` holds one store per
instance; tests drive it directly, from many threads.

- Key: (model namespace, user id). The namespace is a digest of the model config, the weights
  and the dtype the K/V are kept in, so two models or two weight versions never share entries.
- Entry: the user's ``UserKV`` plus exactly what was cached (profile ids; per event its ids and
  timestamp) and their digest. A request reuses an entry only when its own profile is the same
  and its history starts with the cached events (same ids, same timestamps, same order), and
  the request time keeps at least the first cached event's time bucket: the cached rows before the
  first event whose bucket moves are reused (``CachedHistory.reusable_rows``, on host copies of the stamps:
  no device read), the rest recomputed.
  Anything else is a miss: the caller computes from scratch and replaces the entry.
- Budget: least-recently-used entries are evicted until the stored bytes fit; an entry larger
  than the per-user bound is not kept (and the user's older entry is dropped with it).
- Threads: one lock guards the map and the counters. Entries are immutable, built outside the
  lock and swapped in whole, so a reader never sees a torn entry and a replaced entry's bytes
  are subtracted exactly once. Two concurrent requests of one user both compute; the later
  store wins (both entries are exact for what they hold).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the bundle writers import this module (weights_digest) without torch
    from grc.model.kv_cache import UserKV
    from grc.serving.common.kv_arena import Lease


@dataclass(frozen=True)
class CachedHistory:
    """One user's entry: K/V of its cached tokens and exactly which tokens those are."""

    kv: UserKV
    profile_ids: np.ndarray  # [n_profile] int64, one per profile table
    events: np.ndarray  # [n_events, history tables + 1] int64: the event's ids, then its timestamp
    stamped_at: int  # the request time the cached profile tokens carry (UserKV.timestamps[:profile])
    lease: Lease | None = None  # where ``kv``'s rows lie in the device arena (kv_arena.py), if they do

    @cached_property
    def digest(self) -> str:
        """sha256 of exactly what was cached (profile ids, events), computed when first read: a hit re-stores its
        entry, and hashing ~4,000 events there cost 0.1-0.3 ms of every served hit (reuse compares the arrays)."""
        return content_digest(self.profile_ids, self.events)

    def reusable_rows(self, now: int, time_buckets: int) -> int:
        """``UserKV.reusable_rows`` from the host copy of the stamps (the events' own, and ``stamped_at``): no
        read of the device where the K/V live."""
        from grc.model.kv_cache import reusable_rows, reusable_rows_sorted

        profile = self.kv.profile
        if profile and len(self.events):  # reusable_rows' common case on the events' column, not a joined copy
            rows = reusable_rows_sorted(self.events[:, -1], self.stamped_at, profile, now, time_buckets)
            if rows is not None:
                return rows
        stamps = np.concatenate([np.full(len(self.profile_ids), self.stamped_at, np.int64), self.events[:, -1]])
        return reusable_rows(stamps, profile, now, time_buckets)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.profile_ids.nbytes + self.events.nbytes


def content_digest(profile_ids: np.ndarray, events: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (profile_ids, events):
        a = np.ascontiguousarray(a, np.int64)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cached_history(
    kv: UserKV,
    profile_ids: np.ndarray,
    events: np.ndarray,
    stamped_at: int | None = None,
    lease: Lease | None = None,
    owned: bool = False,
) -> CachedHistory:
    """The entry of ``kv``, which holds these profile tokens and events; ``stamped_at``: the request time it
    was computed at (None: read from ``kv``, a device read where the K/V live on a GPU); ``lease``: its arena rows;
    ``owned``: the arrays are int64 ones of the caller's own that nothing else holds or writes (kept, not copied:
    UserCaches.visit's)."""
    if not owned:
        profile_ids = np.array(profile_ids, np.int64)  # copies: a request's arrays die with it
        events = np.array(events, np.int64).reshape(len(events), -1)
    if stamped_at is None:
        stamped_at = int(kv.timestamps[0]) if kv.length else 0
    if kv.length != len(profile_ids) + len(events) or kv.profile != len(profile_ids):
        raise ValueError(
            f"cache of {kv.length} tokens ({kv.profile} profile) does not hold "
            f"{len(profile_ids)} profile tokens + {len(events)} events"
        )
    return CachedHistory(kv, profile_ids, events, stamped_at, lease)


_MASK64 = (1 << 64) - 1


def shard_of(user: int, shards: int) -> int:
    """Which of ``shards`` stores holds ``user``'s entry: splitmix64 of the int64 id, mod shards. Stable
    across processes and runs (unlike Python's hash), and spread evenly however the ids are assigned."""
    z = (user + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % shards


def model_namespace(model_json: str, weights_digest: str, dtype: str) -> str:
    """The part of every key that tells models, weight versions and K/V dtypes apart."""
    return hashlib.sha256(f"{model_json}\0{weights_digest}\0{dtype}".encode()).hexdigest()[:32]


def weights_digest(weights_dir: Path) -> str:
    """The weights' identity: the digest of their manifest (which records every shard's sha256)."""
    return hashlib.sha256((weights_dir / "manifest.json").read_bytes()).hexdigest()


def match(entry: CachedHistory, profile_ids: np.ndarray, events: np.ndarray, now: int, time_buckets: int) -> int | str:
    """How many of ``entry``'s cached events a request with these profile ids, events and request time reuses
    (its events past them are new), or why it reuses none (a miss). One pass: the store's lookup calls it once
    per hit."""
    n = len(entry.events)
    if not _same(entry.profile_ids, profile_ids):
        return "profile changed"
    if len(events) < n or not _same(entry.events, events[:n]):
        return "history does not start with the cached events"
    rows = entry.reusable_rows(now, time_buckets)
    if rows <= entry.kv.profile:
        return "request time moves a cached event's time bucket"
    return rows - entry.kv.profile


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """np.array_equal, by bytes where both are int64 (every served lookup's case: a fifth of array_equal's time)."""
    if a.dtype == b.dtype == np.int64:
        return a.shape == b.shape and a.tobytes() == b.tobytes()
    return bool(np.array_equal(a, b))


@dataclass(frozen=True)
class Stats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int


class HistoryCache:
    """LRU map (namespace, user id) -> CachedHistory under ``budget_bytes``; thread-safe.

    ``size_of`` (default: ``CachedHistory.nbytes``) is what an entry counts against the budget, and ``on_drop`` is
    called once for every entry the store lets go (replaced, evicted, or refused as over the per-user bound), after
    the lock is released: the device arena's hooks (grc/serving/common/row_arena.py), where an entry's cost is its
    extent's capacity and dropping it gives the extent back."""

    def __init__(
        self,
        budget_bytes: int,
        max_entry_bytes: int | None = None,
        size_of: Callable[[CachedHistory], int] | None = None,
        on_drop: Callable[[CachedHistory], None] | None = None,
    ):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive (got {budget_bytes})")
        self.budget = budget_bytes
        self.max_entry = min(max_entry_bytes or budget_bytes, budget_bytes)
        self.size_of: Callable[[CachedHistory], int] = size_of or (lambda e: e.nbytes)
        self.on_drop = on_drop
        self._entries: OrderedDict[Hashable, CachedHistory] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}  # what each entry counted when stored (size_of may read live state)
        self._lock = threading.Lock()
        self._bytes = self._hits = self._misses = self._evictions = 0

    def lookup(self, key: Hashable, usable: Callable[[CachedHistory], bool]) -> CachedHistory | None:
        """The entry under ``key`` if ``usable`` accepts it (a hit: it becomes most recent), else
        None (a miss). ``usable`` runs under the lock: keep it cheap (array compares)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and usable(entry):
                self._entries.move_to_end(key)
                self._hits += 1
                return entry
            self._misses += 1
            return None

    def store(self, key: Hashable, entry: CachedHistory) -> bool:
        """Put ``entry`` under ``key`` (replacing the old one), evicting least-recently-used
        entries to stay within the budget. False: larger than the per-user bound, not kept."""
        size = self.size_of(entry)
        dropped: list[CachedHistory] = []
        with self._lock:
            old = self._pop(key)
            if old is not None and old is not entry:
                dropped.append(old)
            if size > self.max_entry:
                dropped.append(entry)
                kept = False
            else:
                self._entries[key] = entry
                self._sizes[key] = size
                self._bytes += size
                while self._bytes > self.budget:
                    dropped.append(self._evict())
                kept = True
        self._drop(dropped)
        return kept

    def discard(self, key: Hashable) -> None:
        """Let the entry under ``key`` go (not counted as an eviction; on_drop called), if there is one: what a
        failed step does with its users' entries, whose rows it may have half rewritten."""
        with self._lock:
            old = self._pop(key)
        self._drop([] if old is None else [old])

    def evict_oldest(self) -> bool:
        """Evict the least-recently-used entry (counted as an eviction; on_drop called): what the arena does when
        no free run is long enough. False when the store is empty."""
        with self._lock:
            if not self._entries:
                return False
            evicted = self._evict()
        self._drop([evicted])
        return True

    def _pop(self, key: Hashable) -> CachedHistory | None:  # under the lock
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self._sizes.pop(key)
        return old

    def _evict(self) -> CachedHistory:  # under the lock
        key, evicted = next(iter(self._entries.items()))
        self._pop(key)
        self._evictions += 1
        return evicted

    def _drop(self, entries: list[CachedHistory]) -> None:
        if self.on_drop is not None:
            for e in entries:
                self.on_drop(e)

    def stats(self) -> Stats:
        with self._lock:
            return Stats(self._hits, self._misses, self._evictions, self._bytes, len(self._entries))

    def held(self) -> list[CachedHistory]:
        """The entries held, least recently used first (a snapshot: tests check the arena's accounting with it)."""
        with self._lock:
            return list(self._entries.values())

    def stored_bytes(self) -> int:
        """The bytes of the entries held, summed afresh (tests compare it with the counter)."""
        with self._lock:
            return sum(self.size_of(e) for e in self._entries.values())
