"""Row ranges of one preallocated buffer: where the history cache's K/V rows are to live on a GPU (the arena).

Why: the served cached step copies every hit's entry into the step's key buffers and the grown entry back out
(session 15's profile: a fifth of the step's device time at 3,581 cached rows). Both attention kernels read a user's
keys as any range of k and v (``kv_offsets`` [users, 2], session 17), and ``UserKV.rows`` already packs every
layer's K and V of a token into one row; so one [rows, width] buffer per instance can hold every entry as a range,
and a step can read the entries where they lie and write its new rows right after them.

This module is the allocator: it knows row indices only (no tensors, no bytes), so the cache decides what a row
costs and which entry to evict.

- ``allocate(rows)``: first fit over the free runs, the capacity rounded up to whole granules (slack for the next
  requests' events: growth in place is free, a move copies the entry once); None when no free run is long enough,
  and the caller evicts and tries again. With ``gap``, a new extent leaves the first ``gap`` rows of a run that
  follows a held extent free for that extent to grow into, and keeps ``gap`` free rows after itself, while some run
  is long enough for all three (the last such run: the arena's unused tail first), else plain first fit. Packed
  back to back, an entry whose step gave its candidates' rows back (``shrink``) found them and nothing more after
  it at its next visit, which needs them plus its new events, so it moved (each move copies the entry's rows on the
  device; kv_arena.GROWTH_GAP's figures).
- ``grow(extent, rows)``: in place when the capacity holds them or the free run right after the extent has the
  granules missing (taken from its front); else False and the caller allocates a new extent and copies once.
- ``shrink(extent, rows)``: the whole granules past ``rows`` go back (a step's candidates' rows after an entry).
- ``release(extent)``: its rows go back to the free runs, merged with free neighbours, so a run is never split
  by a freed boundary; a pinned extent (a step is reading it) gives its rows back at its last ``unpin``, so rows a
  running step reads are never handed to another user.
- Thread-safe: one lock guards the runs, the extents' fields and the counters.
- Cost: the free runs are kept in two maps (start -> end, end -> start) and a max-tree of their lengths, so each call is
  O(log rows), whatever the number of entries. A scan over the runs cost ~43 us per allocation + release at ~780
  entries and ~430 us at ~7,800 (`RowArena(1.1M / 11M rows, granule 16, gap 256)`, this repository's 2-core CPU);
  the tree ~20 and ~26 us (session 25, bench/results/history-cache-notes.md).
  The tree takes 16 bytes of host memory per granule (their count rounded up to a power of two): 2 MiB for a 16 GiB
  arena of mtgr-base's 15 KiB rows in 16-row granules, and at most a few percent of any arena's own bytes.
"""

from __future__ import annotations

import threading
from array import array
from dataclasses import dataclass


@dataclass(eq=False)  # identity: two extents of the same rows at different times are different extents
class Extent:
    """Rows [start, start + capacity) of the arena; ``pins`` steps are reading them; ``released``: given back (its
    rows are free, or will be at the last unpin)."""

    start: int
    capacity: int
    pins: int = 0
    released: bool = False

    @property
    def end(self) -> int:
        return self.start + self.capacity


class _MaxTree:
    """The longest free run starting in each granule slot (0: none starts there), kept as a max-tree: the leftmost or
    rightmost slot holding a run of at least x rows in O(log slots). Why: with growth gaps there are about as many
    free runs as entries (~1,000 in a served session), and a Python scan over them cost ~0.1 ms per allocation, most
    of the served cached layout's host time at 240 users (bench/results/history-cache-notes.md, session 25)."""

    def __init__(self, slots: int):
        self.n = 1 << max(0, (slots - 1).bit_length())
        self.t = array("q", bytes(16 * self.n))  # node i's children 2i, 2i + 1; leaves n..2n-1; zeroed

    def set(self, slot: int, value: int) -> None:
        t, i = self.t, slot + self.n
        t[i] = value
        i >>= 1
        while i:
            m = max(t[2 * i], t[2 * i + 1])
            if t[i] == m:  # the ancestors hold what they held
                return
            t[i] = m
            i >>= 1

    def top(self) -> int:
        return self.t[1]

    def find(self, at_least: int, last: bool = False) -> int | None:
        """The leftmost slot holding at least ``at_least`` (``last``: the rightmost), or None."""
        t, n = self.t, self.n
        if t[1] < at_least:
            return None
        i, prefer = 1, int(last)  # the child tried first: 2i (leftmost) or 2i + 1 (rightmost)
        while i < n:
            i = 2 * i + prefer if t[2 * i + prefer] >= at_least else 2 * i + 1 - prefer
        return i - n


class RowArena:
    """First-fit allocator of row ranges in [0, rows), in whole granules."""

    def __init__(self, rows: int, granule: int = 64, gap: int = 0):
        """gap: rows left free after a held extent when a new one is placed in the run after it (module docstring),
        rounded up to whole granules."""
        if granule <= 0 or rows < granule:
            raise ValueError(f"the arena needs rows >= granule > 0 (got rows={rows}, granule={granule})")
        if gap < 0:
            raise ValueError(f"the growth gap cannot be negative (got {gap})")
        self.rows = rows - rows % granule  # whole granules only: a tail shorter than one is never handed out
        self.granule = granule
        self.gap = -(-gap // granule) * granule
        self._lock = threading.Lock()
        # free runs, never adjacent (merged on release): start -> end and end -> start (a release finds its free
        # neighbours, a growth the run after its extent, in O(1)), and each run's length at its start's granule slot
        self._end_of: dict[int, int] = {}
        self._start_of: dict[int, int] = {}
        self._runs = _MaxTree(self.rows // granule)
        self._used = 0  # rows of live extents (released-but-pinned ones included: not yet reusable)
        self._add_run(0, self.rows)

    def _round(self, rows: int) -> int:
        if rows <= 0:
            raise ValueError(f"an extent holds at least one row (got {rows})")
        return -(-rows // self.granule) * self.granule

    def allocate(self, rows: int) -> Extent | None:
        """An extent of at least ``rows`` rows (whole granules), or None when no free run is that long: the last run
        that holds it between gaps (past the one its held neighbour keeps, a run at row 0 following nothing, and one
        of its own after it), else the first run that holds it."""
        size = self._round(rows)
        gap = self.gap
        with self._lock:
            if gap:
                # the last run first: the arena's unused tail while it has one. Runs never touch, so one at start > 0
                # follows an extent and keeps that extent's gap before the new one; the new extent keeps a gap of its
                # own after it (a hole between two extents that only just holds it would not)
                slot = self._runs.find(size + 2 * gap, last=True)
                if slot is not None:
                    start = slot * self.granule
                    return self._take(start, start + (gap if start > 0 else 0), size)
                if self._end_of.get(0, 0) >= size + gap:  # a run at row 0 follows nothing: one gap, its own
                    return self._take(0, 0, size)
            slot = self._runs.find(size)
            return None if slot is None else self._take(slot * self.granule, slot * self.granule, size)

    def _add_run(self, start: int, end: int) -> None:  # under the lock
        self._end_of[start] = end
        self._start_of[end] = start
        self._runs.set(start // self.granule, end - start)

    def _drop_run(self, start: int) -> int:  # under the lock: the run at ``start`` taken out -> its end
        end = self._end_of.pop(start)
        del self._start_of[end]
        self._runs.set(start // self.granule, 0)
        return end

    def _take(self, start: int, at: int, size: int) -> Extent:  # under the lock: rows [at, at + size) of run ``start``
        end = self._drop_run(start)
        if at > start:  # the gap stays free, before the new extent
            self._add_run(start, at)
        if at + size < end:
            self._add_run(at + size, end)
        self._used += size
        return Extent(at, size)

    def grow(self, extent: Extent, rows: int) -> bool:
        """Make ``extent`` hold ``rows`` rows in place: True when its capacity already does, or the free run starting
        at its end has the granules missing (taken from that run's front); False otherwise (nothing changes)."""
        size = self._round(rows)
        with self._lock:
            if extent.released:
                raise ValueError(f"extent at row {extent.start} was released: it cannot grow")
            if size <= extent.capacity:
                return True
            missing = size - extent.capacity
            end = self._end_of.get(extent.end)
            if end is None or end - extent.end < missing:
                return False
            self._take(extent.end, extent.end, missing)
            extent.capacity = size
            return True

    def pin(self, extent: Extent) -> None:
        with self._lock:
            if extent.released:
                raise ValueError(f"extent at row {extent.start} was released: a step cannot start reading it")
            extent.pins += 1

    def unpin(self, extent: Extent) -> None:
        with self._lock:
            if extent.pins <= 0:
                raise ValueError(f"extent at row {extent.start} is not pinned")
            extent.pins -= 1
            if extent.released and extent.pins == 0:
                self._free(extent)

    def release(self, extent: Extent) -> None:
        """Give the extent's rows back (at its last unpin if a step still reads it). Twice is an error: a second
        release of rows another extent may hold by now would corrupt that one."""
        with self._lock:
            if extent.released:
                raise ValueError(f"extent at row {extent.start} was already released")
            extent.released = True
            if extent.pins == 0:
                self._free(extent)

    def _free(self, extent: Extent) -> None:  # under the lock
        self._free_rows(extent.start, extent.end)

    def _free_rows(self, start: int, end: int) -> None:  # under the lock
        self._used -= end - start
        before = self._start_of.get(start)  # a free run ending where these rows start
        if before is not None:
            self._drop_run(before)
            start = before
        if end in self._end_of:  # a free run starting where they end
            end = self._drop_run(end)
        self._add_run(start, end)

    def shrink(self, extent: Extent, rows: int) -> None:
        """Give back the whole granules of ``extent`` past its first ``rows`` rows (at least one granule stays): a
        step's candidates' rows after the grown entry, so that the entry counts what it holds."""
        size = self._round(max(rows, 1))
        with self._lock:
            if extent.released:
                raise ValueError(f"extent at row {extent.start} was released: it cannot shrink")
            if size < extent.capacity:
                self._free_rows(extent.start + size, extent.end)
                extent.capacity = size

    def used_rows(self) -> int:
        """Rows of extents not yet given back (capacity, not what the entries hold: what the budget counts)."""
        with self._lock:
            return self._used

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs as (start, end), sorted (tests and the metrics read it)."""
        with self._lock:
            return sorted(self._end_of.items())

    def largest_free(self) -> int:
        with self._lock:
            return self._runs.top()
