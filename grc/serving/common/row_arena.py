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
"""

from __future__ import annotations

import bisect
import threading
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
        self._starts: list[int] = [0]  # free runs, sorted by start, never adjacent (merged on release)
        self._ends: list[int] = [self.rows]
        self._used = 0  # rows of live extents (released-but-pinned ones included: not yet reusable)
        # a bound on the longest free run (>= it; exact after a scan that found nothing): a request longer is refused
        # without a scan (the store's evict-and-retry loop asks once per eviction, and with growth gaps there are
        # about as many free runs as entries), and the gapped pass is skipped when no run can hold it
        self._bound = self.rows

    def _round(self, rows: int) -> int:
        if rows <= 0:
            raise ValueError(f"an extent holds at least one row (got {rows})")
        return -(-rows // self.granule) * self.granule

    def allocate(self, rows: int) -> Extent | None:
        """An extent of at least ``rows`` rows (whole granules), or None when no free run is that long: the last run
        that holds it between gaps (past the one its held neighbour keeps, a run at row 0 following nothing, and one
        of its own after it), else the first run that holds it."""
        size = self._round(rows)
        with self._lock:
            if self._bound < size:
                return None
            passes = (True, False) if self.gap and self._bound >= size + self.gap else (False,)
            for gapped in passes:
                # gapped, the last run first: the arena's unused tail while it has one, found at once (with growth
                # gaps there are about as many free runs as entries, each too short to take a new extent between gaps)
                order = range(len(self._starts) - 1, -1, -1) if gapped else range(len(self._starts))
                for i in order:
                    start, end = self._starts[i], self._ends[i]
                    # runs never touch, so one at start > 0 follows an extent; gapped, the new extent also keeps a
                    # gap of its own after it (a hole between two extents that only just holds it would not)
                    skip = self.gap if gapped and start > 0 else 0
                    if end - start - skip >= size + (self.gap if gapped else 0):
                        return self._take(i, start + skip, size)
            self._bound = self._longest()  # no run held it: the bound made exact
        return None

    def _longest(self) -> int:  # under the lock
        return max((e - s for s, e in zip(self._starts, self._ends, strict=True)), default=0)

    def _take(self, i: int, at: int, size: int) -> Extent:  # under the lock: rows [at, at + size) of free run i
        start, end = self._starts[i], self._ends[i]
        if at > start:  # the gap stays free, before the new extent
            self._ends[i] = at
            if at + size < end:
                self._starts.insert(i + 1, at + size)
                self._ends.insert(i + 1, end)
        elif at + size == end:
            del self._starts[i], self._ends[i]
        else:
            self._starts[i] = at + size
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
            i = bisect.bisect_left(self._starts, extent.end)
            if i == len(self._starts) or self._starts[i] != extent.end:
                return False
            missing = size - extent.capacity
            if self._ends[i] - self._starts[i] < missing:
                return False
            if self._ends[i] - self._starts[i] == missing:
                del self._starts[i], self._ends[i]
            else:
                self._starts[i] += missing
            extent.capacity = size
            self._used += missing
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
        i = bisect.bisect_left(self._starts, start)
        merge_left = i > 0 and self._ends[i - 1] == start
        merge_right = i < len(self._starts) and self._starts[i] == end
        if merge_left and merge_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif merge_left:
            self._ends[i - 1] = end
        elif merge_right:
            self._starts[i] = start
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
        self._used -= end - start
        j = i - 1 if merge_left else i  # the run these rows joined (merged or alone): the bound holds it
        self._bound = max(self._bound, self._ends[j] - self._starts[j])

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
            return list(zip(self._starts, self._ends, strict=True))

    def largest_free(self) -> int:
        with self._lock:
            self._bound = self._longest()
            return self._bound
