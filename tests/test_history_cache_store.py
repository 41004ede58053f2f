"""The history cache store: matching, keys, LRU eviction under a byte budget, the per-user
bound, and many threads on the same users (exact byte accounting, no torn entry)."""

from __future__ import annotations

import random
import secrets
import threading

import numpy as np
import pytest
import torch

from grc.model.kv_cache import KVLayout, UserKV
from grc.serving.common.history_cache import (
    CachedHistory,
    HistoryCache,
    cached_history,
    content_digest,
    match,
    model_namespace,
)

NOW = 1_750_000_000
BUCKETS = 20


def entry(events: int, profile: int = 1, seed: int = 0, now: int = NOW, layers: int = 2) -> CachedHistory:
    """A synthetic entry: ``profile`` profile tokens + ``events`` events, K/V rows filled with the
    seed so a torn mix of two entries would show."""
    n = profile + events
    stamps = torch.cat([torch.full((profile,), now), now - 1000 - torch.arange(events, 0, -1) * 60])
    kv = UserKV.from_layers(
        keys=tuple(torch.full((n, 2, 4), float(seed)) for _ in range(layers)),
        values=tuple(torch.full((n, 2, 4), float(seed)) for _ in range(layers)),
        timestamps=stamps.to(torch.int64),
        profile=profile,
    )
    ids = np.arange(events, dtype=np.int64)[:, None] + np.array([[0, 100]])
    return cached_history(kv, np.arange(profile, dtype=np.int64), np.concatenate([ids, stamps[profile:, None]], 1))


def test_a_request_matches_only_its_exact_cached_prefix() -> None:
    e = entry(10)
    longer = np.concatenate([e.events, [[99, 199, NOW - 5]]])
    assert match(e, e.profile_ids, e.events, NOW, BUCKETS) == 10  # a hit reusing all 10 events
    assert match(e, e.profile_ids, longer, NOW, BUCKETS) == 10
    changed = longer.copy()
    changed[3, 0] += 1  # another item in the middle
    assert match(e, e.profile_ids, changed, NOW, BUCKETS) == "history does not start with the cached events"
    moved = longer.copy()
    moved[0, 2] -= 1  # same ids, another timestamp
    assert isinstance(match(e, e.profile_ids, moved, NOW, BUCKETS), str)  # a miss, with its reason
    slid = longer[1:]  # truncated at the length limit: the positions moved
    assert isinstance(match(e, e.profile_ids, slid, NOW, BUCKETS), str)
    assert isinstance(match(e, e.profile_ids, e.events[:5], NOW, BUCKETS), str)  # shorter than cached
    assert match(e, e.profile_ids + 1, e.events, NOW, BUCKETS) == "profile changed"
    # events are 1060..1600 s old, all in bucket 10 (1 + dt in [1024, 2048)); 450 s later the
    # oldest reaches bucket 11
    assert match(e, e.profile_ids, e.events, NOW + 440, BUCKETS) == 10
    assert match(e, e.profile_ids, e.events, NOW + 450, BUCKETS) == ("request time moves a cached event's time bucket")


def test_a_later_request_reuses_the_events_before_the_first_moved_bucket() -> None:
    """A session: the newest cached events are seconds old, so a visit a minute later moves their
    buckets; the older events keep theirs and stay reusable (the rows before the first moved one)."""
    e = entry(10)  # events 1060..1600 s old: bucket 10
    kv = e.kv
    fresh = UserKV.from_layers(  # plus two events 5 and 3 s old (buckets 2)
        keys=tuple(torch.cat([k, k[-2:]]) for k in kv.keys),
        values=tuple(torch.cat([v, v[-2:]]) for v in kv.values),
        timestamps=torch.cat([kv.timestamps, torch.tensor([NOW - 5, NOW - 3])]),
        profile=1,
    )
    events = np.concatenate([e.events, [[50, 150, NOW - 5], [51, 151, NOW - 3]]])
    session = cached_history(fresh, e.profile_ids, events)
    assert match(session, e.profile_ids, events, NOW, BUCKETS) == 12  # same request time: all
    later = NOW + 60  # 5 -> 65 s: bucket 2 -> 6; the old events stay in bucket 10
    assert match(session, e.profile_ids, events, later, BUCKETS) == 10  # a hit on the events before them
    # the store's host copy of the stamps answers as the K/V's own (the serving path never reads those)
    for when in (NOW, NOW + 1, later, NOW + 3600, NOW + 86_400 * 400):
        assert session.reusable_rows(when, BUCKETS) == fresh.reusable_rows(when, BUCKETS), when
        assert cached_history(fresh, e.profile_ids, events, NOW).reusable_rows(when, BUCKETS) == (
            fresh.reusable_rows(when, BUCKETS)
        )
    assert match(session, e.profile_ids, events, NOW + 86_400 * 400, BUCKETS) == (  # every bucket moved
        "request time moves a cached event's time bucket"
    )
    # the entry's digest is its content's
    assert session.digest == content_digest(e.profile_ids, events) != e.digest
    kept = session.kv.prefix(1 + 10)
    assert kept.length == 11 and kept.reusable_at(later, BUCKETS)
    assert all(torch.equal(a, b[:11]) for a, b in zip(kept.keys, session.kv.keys, strict=True))


def test_models_and_weight_versions_never_share_entries() -> None:
    cache = HistoryCache(1 << 20)
    a, b = model_namespace('{"d": 1}', "w1", "float32"), model_namespace('{"d": 1}', "w2", "float32")
    assert len({a, b, model_namespace('{"d": 2}', "w1", "float32"), model_namespace('{"d": 1}', "w1", "float64")}) == 4
    cache.store((a, 7), entry(5))
    assert cache.lookup((b, 7), lambda e: True) is None
    assert cache.lookup((a, 7), lambda e: True) is not None
    assert cache.stats().hits == 1 and cache.stats().misses == 1


def test_least_recently_used_entries_are_evicted_to_fit_the_budget() -> None:
    size = entry(10).nbytes
    cache = HistoryCache(budget_bytes=3 * size)
    for user in range(3):
        assert cache.store(("m", user), entry(10, seed=user))
    assert cache.lookup(("m", 0), lambda e: True) is not None  # 0 is now the most recent
    cache.store(("m", 3), entry(10, seed=3))
    stats = cache.stats()
    assert stats.evictions == 1 and stats.entries == 3 and stats.bytes == 3 * size
    assert cache.lookup(("m", 1), lambda e: True) is None  # 1 was least recently used
    assert cache.lookup(("m", 0), lambda e: True) is not None
    cache.store(("m", 5), entry(18, seed=5))  # 1.7 slots: two go
    assert cache.stats().bytes == cache.stored_bytes() <= cache.budget
    assert cache.stats().evictions == 1 + 2


def test_an_entry_over_the_per_user_bound_is_not_kept() -> None:
    small = entry(4)
    cache = HistoryCache(budget_bytes=100 * small.nbytes, max_entry_bytes=2 * small.nbytes)
    assert cache.store(("m", 1), small)
    assert not cache.store(("m", 1), entry(40))  # the user's history outgrew the bound
    assert cache.lookup(("m", 1), lambda e: True) is None  # and its stale entry went with it
    assert cache.stats().bytes == 0


def test_replacing_an_entry_counts_its_bytes_once() -> None:
    cache = HistoryCache(1 << 20)
    cache.store(("m", 1), entry(4))
    cache.store(("m", 1), entry(9))
    assert cache.stats().bytes == entry(9).nbytes == cache.stored_bytes()


def test_entry_must_describe_its_tokens() -> None:
    e = entry(3)
    with pytest.raises(ValueError, match="does not hold"):
        cached_history(e.kv, e.profile_ids, e.events[:2])


def test_many_threads_on_the_same_users() -> None:
    """8 threads x 400 operations over 5 users: lookups, stores of entries of varied lengths,
    under a budget that forces evictions. Every entry read is whole (its K/V rows all carry one
    seed and its length matches its events); the byte counter equals the bytes held."""
    sizes = {n: entry(n).nbytes for n in (2, 8, 16, 32)}
    cache = HistoryCache(budget_bytes=3 * sizes[32], max_entry_bytes=2 * sizes[32])
    problems: list[str] = []
    lookups = [0] * 8

    def worker(t: int) -> None:
        rng = random.Random(t)
        for i in range(400):
            key = ("m", rng.randrange(5))
            if rng.random() < 0.5:
                found = cache.lookup(key, lambda e: len(e.events) >= 2)
                lookups[t] += 1
                if found is not None:
                    seeds = {float(x.flatten()[0]) for x in (*found.kv.keys, *found.kv.values)}
                    whole = all(bool((x == x.flatten()[0]).all()) for x in (*found.kv.keys, *found.kv.values))
                    if len(seeds) != 1 or not whole or found.kv.length != 1 + len(found.events):
                        problems.append(f"torn entry under {key}")
            else:
                cache.store(key, entry(rng.choice(list(sizes)), seed=t * 1000 + i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stats = cache.stats()
    assert not problems, problems[:3]
    assert stats.hits + stats.misses == sum(lookups)
    assert stats.bytes == cache.stored_bytes() <= cache.budget
    assert stats.evictions > 0 and stats.hits > 0


def test_reusable_rows_by_binary_search_equals_every_events_bucket() -> None:
    """The store's host check (kv_cache.first_moved_sorted: one binary search per bucket bound, for sorted stamps
    before the profile stamp) answers as computing every event's bucket then and now does, on the torch path too;
    stamps outside its case (unsorted, after the profile stamp, negative) take the element-wise path. Fresh
    random stamps, gaps placed on and around the bucket bounds 2**k - 1. An entry of those stamps
    (CachedHistory.reusable_rows, what the store's lookup asks) answers the same."""
    from grc.model.kv_cache import _reusable_rows_elementwise, first_moved_sorted, reusable_rows

    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    checked = fast = 0
    for trial in range(400):
        buckets = int(rng.choice([1, 2, 3, 8, 32, 64, 100]))
        then = int(rng.integers(1 << 20, 1 << 40))
        n = int(rng.integers(1, 300))
        near = (1 << rng.integers(1, 40, n)) - 1 + rng.integers(-2, 3, n)  # gaps on and around bucket bounds
        gaps = np.where(rng.random(n) < 0.5, near, rng.integers(0, 1 << 36, n)).clip(0, then)
        events = np.sort(then - gaps)
        if trial % 5 == 0:  # outside the fast case: unsorted, after the profile stamp, or negative
            events = [rng.permutation(events), events + (1 << 37), events - then - 1][trial % 3]
        profile = int(rng.integers(1, 4))
        stamps = np.concatenate([np.full(profile, then), events]).astype(np.int64)
        kv = UserKV(torch.zeros(len(stamps), 1), torch.from_numpy(stamps), profile, KVLayout(1, 1, 0, 1))
        ids = np.arange(len(events), dtype=np.int64)[:, None]
        held = cached_history(kv, np.arange(profile), np.concatenate([ids, stamps[profile:, None]], 1), then)
        for now in (then, then + 1, then + int(rng.integers(1, 1 << 12)), then + int(rng.integers(1, 1 << 38))):
            want = _reusable_rows_elementwise(stamps, profile, now, buckets)
            assert reusable_rows(stamps, profile, now, buckets) == want, (seed, trial, now)
            assert reusable_rows(torch.from_numpy(stamps), profile, now, buckets) == want, (seed, trial, now)
            # the store's entry answers on its events' column (no concatenated copy of the stamps), the same
            assert held.reusable_rows(now, buckets) == want, (seed, trial, now)
            fast += first_moved_sorted(stamps[profile:], then, now, buckets) is not None
            checked += 1
    assert fast > checked // 2, (seed, fast, checked)  # the fast case is the common one here, as in the store


def test_the_arena_hooks_count_capacity_and_drop_each_entry_once() -> None:
    """size_of and on_drop (the device arena's hooks): the budget counts what size_of says, and every entry the
    store lets go (replaced, evicted, refused over the per-user bound, evicted on demand) reaches on_drop once,
    outside the store's lock; storing the entry already held (a hit re-storing it) drops nothing."""
    dropped: list[CachedHistory] = []

    def drop(e: CachedHistory) -> None:
        assert cache._lock.acquire(blocking=False), "on_drop called under the store's lock"
        cache._lock.release()
        dropped.append(e)

    capacity = lambda e: 64 * -(-e.kv.length // 64)  # noqa: E731  (rows rounded up to granules of 64)
    cache = HistoryCache(budget_bytes=3 * 64, max_entry_bytes=2 * 64, size_of=capacity, on_drop=drop)
    a, b, c, d = entry(10, seed=1), entry(70, seed=2), entry(3, seed=3), entry(5, seed=4)
    assert cache.store("a", a) and cache.store("b", b)  # 64 + 128 rows of capacity: full
    assert cache.stats().bytes == 192 and dropped == []
    assert cache.store("a", a) and dropped == []  # the same entry again: nothing let go
    assert cache.store("c", c)  # over budget: b (least recently used) goes
    assert dropped == [b] and cache.stats().evictions == 1 and cache.stats().bytes == 128
    a2 = entry(11, seed=5)
    assert cache.store("a", a2) and dropped == [b, a]  # replaced
    assert not cache.store("c", entry(200, seed=6))  # over the per-user bound: it and the old c go
    assert dropped[2] is c and dropped[3].kv.length == 201 and cache.stats().bytes == 64
    assert cache.store("d", d) and cache.evict_oldest() and dropped[-1] is a2
    assert cache.evict_oldest() and dropped[-1] is d and not cache.evict_oldest()
    assert cache.stats().evictions == 3 and cache.stats().bytes == 0 == cache.stored_bytes()


def test_threads_drop_every_entry_they_stored_exactly_once() -> None:
    """8 threads storing fresh entries over 5 users under a budget that evicts: at the end every entry ever stored
    is either held or was dropped, exactly once (an arena extent is never released twice, nor leaked)."""
    dropped: list[int] = []
    lock = threading.Lock()

    def drop(e: CachedHistory) -> None:
        with lock:
            dropped.append(id(e))

    cache = HistoryCache(budget_bytes=3 * entry(32).nbytes, on_drop=drop)
    stored: list[CachedHistory] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        for i in range(300):
            e = entry(rng.choice([2, 8, 16, 32]), seed=t * 1000 + i)
            with lock:
                stored.append(e)
            cache.store(("m", rng.randrange(5)), e)
            if rng.random() < 0.05:
                cache.evict_oldest()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    held = [id(e) for e in cache._entries.values()]
    assert len(dropped) == len(set(dropped)), "an entry was dropped twice"
    assert sorted(dropped + held) == sorted(id(e) for e in stored)
    assert cache.stats().bytes == cache.stored_bytes() <= cache.budget
