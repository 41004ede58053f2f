"""grc.serving.common.row_arena: the device arena's allocator of row ranges. Pure Python: first fit in whole
granules, growth in place into the free run after an extent, release merging free neighbours, pins deferring a
release, and random operation sequences (and threads) checked against an occupancy map of every row."""

from __future__ import annotations

import itertools
import random
import threading

import numpy as np
import pytest

from grc.serving.common.row_arena import Extent, RowArena


def _check(arena: RowArena, live: list[Extent]) -> None:
    """Every row is in exactly one place: a live (or released-but-pinned) extent or a free run; free runs sorted and
    never touching (merged); the used count is the live extents' capacity."""
    owner = np.zeros(arena.rows, np.int64)
    for e in live:
        assert e.start >= 0 and e.end <= arena.rows and e.capacity % arena.granule == 0
        owner[e.start : e.end] += 1
    runs = arena.free_runs()
    for (_, e0), (s1, _) in itertools.pairwise(runs):
        assert e0 < s1, f"free runs {runs} overlap or touch (not merged)"
    for lo, hi in runs:
        assert lo < hi
        owner[lo:hi] += 1
    assert (owner == 1).all(), "a row is in no place or in two"
    assert arena.largest_free() == max((hi - lo for lo, hi in runs), default=0), "the run tree lost a run's length"
    assert arena.used_rows() == sum(e.capacity for e in live)


def test_first_fit_in_whole_granules_and_none_when_full() -> None:
    arena = RowArena(1000, granule=64)  # 15 granules: the 40-row tail is never handed out
    assert arena.rows == 960
    a = arena.allocate(1)
    b = arena.allocate(65)
    assert a is not None and b is not None
    assert (a.start, a.capacity, b.start, b.capacity) == (0, 64, 64, 128)
    assert arena.allocate(960) is None and arena.allocate(768) is not None
    assert arena.allocate(1) is None and arena.largest_free() == 0
    arena.release(a)
    c = arena.allocate(10)
    assert c is not None and c.start == 0  # the first run that fits
    with pytest.raises(ValueError, match="at least one row"):
        arena.allocate(0)
    with pytest.raises(ValueError, match="rows >= granule"):
        RowArena(10, granule=64)


def test_release_merges_free_neighbours() -> None:
    arena = RowArena(64 * 5, granule=64)
    ext = [arena.allocate(64) for _ in range(5)]
    assert all(e is not None for e in ext) and arena.free_runs() == []
    live = [e for e in ext if e is not None]
    for i in (1, 3, 2, 0, 4):  # alone, alone, both sides, right side, left side
        arena.release(live[i])
        _check(arena, [e for e in live if not e.released])
    assert arena.free_runs() == [(0, 320)] and arena.used_rows() == 0


def test_grow_in_place_into_the_free_run_after_it_else_refuse() -> None:
    arena = RowArena(64 * 8, granule=64)
    a, b = arena.allocate(100), arena.allocate(64)  # a: [0, 128), b: [128, 192)
    assert a is not None and b is not None
    assert arena.grow(a, 128) and a.capacity == 128  # within its capacity
    assert not arena.grow(a, 129) and a.capacity == 128  # b sits right after it
    assert arena.grow(b, 200) and (b.start, b.capacity) == (128, 256)  # the free run after b, from its front
    assert arena.free_runs() == [(384, 512)]
    assert not arena.grow(b, 64 * 6 + 1)  # the run after it is two granules long
    assert arena.grow(b, 64 * 6) and arena.free_runs() == []
    _check(arena, [a, b])
    arena.release(b)
    with pytest.raises(ValueError, match="was released: it cannot grow"):
        arena.grow(b, 1)


def test_shrink_gives_the_whole_granules_past_its_rows_back() -> None:
    arena = RowArena(64 * 8, granule=64)
    a, b = arena.allocate(64 * 3), arena.allocate(64)  # a: [0, 192), b: [192, 256)
    assert a is not None and b is not None
    arena.shrink(a, 65)  # two granules hold 65 rows: the third goes back
    assert a.capacity == 128 and arena.free_runs() == [(128, 192), (256, 512)]
    arena.shrink(b, 0)  # at least one granule stays
    assert b.capacity == 64
    arena.release(b)  # the freed tail of a, b's rows and the run after b merge
    assert arena.free_runs() == [(128, 512)] and arena.used_rows() == 128
    assert arena.grow(a, 64 * 4) and a.capacity == 256  # the next visit grows into the tail
    _check(arena, [a])
    arena.release(a)
    with pytest.raises(ValueError, match="was released: it cannot shrink"):
        arena.shrink(a, 1)


def test_a_pinned_extent_gives_its_rows_back_at_the_last_unpin() -> None:
    arena = RowArena(128, granule=64)
    a = arena.allocate(128)
    assert a is not None
    arena.pin(a)
    arena.pin(a)
    arena.release(a)  # evicted while two steps read it
    assert arena.allocate(64) is None and arena.used_rows() == 128
    arena.unpin(a)
    assert arena.allocate(64) is None
    arena.unpin(a)
    assert arena.free_runs() == [(0, 128)] and arena.used_rows() == 0
    with pytest.raises(ValueError, match="already released"):
        arena.release(a)
    with pytest.raises(ValueError, match="not pinned"):
        arena.unpin(a)
    with pytest.raises(ValueError, match="cannot start reading"):
        arena.pin(a)


def test_a_new_extent_leaves_the_held_one_before_it_room_to_grow() -> None:
    """gap: placed past the gap while a run holds it with a gap of its own after it, the held extent before it grows
    in place into the gap (its candidates' rows given back, then those rows plus new events asked); plain first fit
    once no run holds all three."""
    arena = RowArena(64 * 12, granule=16, gap=20)  # 20 rows: 2 granules
    assert arena.gap == 32
    a = arena.allocate(100)  # row 0 follows nothing: no gap
    b = arena.allocate(64)
    assert a is not None and b is not None
    assert (a.start, a.capacity, b.start) == (0, 112, 112 + 32)
    _check(arena, [a, b])
    arena.shrink(a, 48)  # a step's candidates' rows go back: 64 rows before b
    assert arena.grow(a, 48 + 64 + 10)  # the next visit: its rows, the candidates again and 10 events, in place
    _check(arena, [a, b])
    c = arena.allocate(64 * 12 - 112 - 32 - 64 - 64)  # the rest but a gap after b and one after itself
    assert c is not None and c.start == b.end + 32 and arena.free_runs()[-1] == (c.end, c.end + 32)
    d = arena.allocate(32)  # no run holds 32 rows between two gaps: first fit takes b's gap
    assert d is not None and d.start == b.end
    _check(arena, [a, b, c, d])
    with pytest.raises(ValueError, match="gap cannot be negative"):
        RowArena(64, granule=16, gap=-1)


def _scanned(arena: RowArena, rows: int) -> int | None:
    """Where ``allocate(rows)`` must place an extent, by a plain scan over the free runs (the rule of its docstring,
    as the allocator computed it before its run tree): the last run that holds it between gaps, else the first run
    that holds it."""
    size = -(-rows // arena.granule) * arena.granule
    runs = arena.free_runs()
    if arena.gap:
        for start, end in reversed(runs):
            skip = arena.gap if start > 0 else 0
            if end - start - skip >= size + arena.gap:
                return start + skip
    return next((start for start, end in runs if end - start >= size), None)


@pytest.mark.parametrize("gap", [0, 100])
def test_random_operations_keep_every_row_in_exactly_one_place(gap: int) -> None:
    seed = random.getrandbits(31)
    rng = random.Random(seed)
    arena = RowArena(64 * 200 + 17, granule=64, gap=gap)
    live: list[Extent] = []
    pinned: list[Extent] = []
    for _ in range(3000):
        op = rng.random()
        held = [x for x in live if not x.released]  # released-but-pinned extents only wait for their last unpin
        if op < 0.4:
            want = rng.randint(1, 64 * 12)
            expected = _scanned(arena, want)
            e = arena.allocate(want)
            assert (None if e is None else e.start) == expected, f"seed={seed}"
            if e is not None:
                live.append(e)
        elif op < 0.55 and held:
            e = rng.choice(held)
            before = e.capacity
            grown = arena.grow(e, rng.randint(1, 64 * 20))
            assert grown or e.capacity == before
        elif op < 0.6 and held:
            e = rng.choice(held)
            before = e.capacity
            arena.shrink(e, rng.randint(0, 64 * 12))
            assert 64 <= e.capacity <= before
        elif op < 0.7 and held:
            e = rng.choice(held)
            arena.pin(e)
            pinned.append(e)
        elif op < 0.8 and pinned:
            e = pinned.pop(rng.randrange(len(pinned)))
            arena.unpin(e)
            if e.released and e.pins == 0:
                live.remove(e)
        elif held:
            e = rng.choice(held)
            arena.release(e)
            if e.pins == 0:
                live.remove(e)
        _check(arena, live)
    for e in pinned:
        arena.unpin(e)
    for e in live:
        if not e.released:
            arena.release(e)
    assert arena.free_runs() == [(0, arena.rows)] and arena.used_rows() == 0, f"seed={seed}"


def test_threads_never_share_a_row() -> None:
    """Eight threads allocate, write their id into their rows, grow, check nobody else wrote there, release."""
    arena = RowArena(64 * 64, granule=64)
    rows = np.zeros(arena.rows, np.int64)
    errors: list[str] = []

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        for _ in range(400):
            e = arena.allocate(rng.randint(1, 64 * 4))
            if e is None:
                continue
            rows[e.start : e.end] = tid
            if arena.grow(e, e.capacity + rng.randint(1, 128)):
                rows[e.start : e.end] = tid
            if not (rows[e.start : e.end] == tid).all():
                errors.append(f"thread {tid}: rows {e.start}..{e.end} written by another thread")
            arena.release(e)

    threads = [threading.Thread(target=worker, args=(t + 1,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert arena.free_runs() == [(0, arena.rows)] and arena.used_rows() == 0
