"""The history cache's entries as row ranges of one buffer per instance (the device arena): what a step reads in place.

Session 15's profile of the served cached step (bench/results/history-cache-notes.md): every hit's entry was copied
into the step's key buffers and the grown entry copied back out, a fifth of the step's device time at 3,581 cached
rows. Here an entry's K/V are rows [start, start + length) of ``KVArena.rows`` (every layer's K and V of a token in
one row, ``KVLayout``), its keys' timestamps the same rows of ``KVArena.stamps`` (the kernels read a key's stamp
through the same range as its K and V), and a step writes its new rows right after a user's cached ones.

Ownership (the traps of session 18's notes): an extent has ONE owner at a time, held in its ``Lease``: the entry the
store holds, or ``CLAIMED`` while a step writes it. A step that grows a hit in place claims the hit's lease first, so
an eviction of the old entry during the step's allocations (``on_drop``) does not free rows the step is about to
write, and the grown entry takes the lease over when stored (the replaced entry's drop frees nothing). A step that
cannot grow an entry in place (no free run after it, or a second visit of the same user in one step) moves it: a
new extent, the reused rows copied once. Device work is stream-ordered and an instance runs one step at a time (the
one writer), so rows given back after a step may be handed out at once: a later step's writes queue behind this
step's reads.

The store (``HistoryCache``) counts an entry at its extent's capacity (``size_of``) and gives the extent back when it
lets the entry go (``on_drop``); the arena holds the budget's rows plus ``headroom`` (one step's worth, allocated
before the store evicts for the grown entries), plus ``scratch`` rows past the allocator's end where a step's padding
users write their rows (never handed out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from grc.model.kv_cache import KVLayout, UserKV
from grc.serving.common.row_arena import Extent, RowArena

if TYPE_CHECKING:
    from grc.serving.common.history_cache import CachedHistory, HistoryCache

CLAIMED = object()  # a Lease's owner while a step writes its rows
# Rows left free after each entry while the arena has room (RowArena's gap): the candidates' rows come back after
# each step (``entry``), so a visit grows its entry by its new events into the gap, and the entry moves (a copy of its
# rows) once visits have used the gap up: at +10 events a visit, every ~16 visits with 256 rows (every ~4 with 64).
# bench/served_host_profile.py's session (24 users x 5 visits x 3 passes): 205 moves to 83 in-place growths without
# a gap, 54 to 234 with 64 rows, 0 to 288 with 256 (session 20). Not counted against the budget: a gap is free rows,
# handed out first-fit once no run holds a new extent between gaps.
GROWTH_GAP = 256


@dataclass(eq=False)
class Lease:
    """An extent of the arena and its one owner (an entry held by the store, ``CLAIMED``, or None: given back)."""

    extent: Extent
    owner: object | None = None


class ArenaFull(RuntimeError):
    """No free run holds the rows asked for, the store evicted to nothing: the caller splits its step."""


class KVArena:
    """One instance's K/V rows [rows + scratch, width] and key stamps [rows + scratch], and the rows' allocator."""

    def __init__(
        self,
        layout: KVLayout,
        rows: int,
        scratch: int,
        dtype: torch.dtype,
        device: torch.device,
        granule: int = 16,
        gap: int = GROWTH_GAP,
    ):
        """granule: rows an extent's capacity is a multiple of (an entry counts its length rounded up to it); gap:
        rows a new extent leaves free after the held one before it while the arena has room (RowArena)."""
        self.layout = layout
        self.alloc = RowArena(rows, granule, gap)
        self.scratch = self.alloc.rows  # the first scratch row (padding users' rows, then one dump row)
        total = self.alloc.rows + scratch
        self.rows = torch.zeros(total, layout.width, dtype=dtype, device=device)
        self.stamps = torch.zeros(total, dtype=torch.int64, device=device)
        self.keys, self.values = (list(t) for t in layout.split(self.rows))  # per layer views: what a step reads
        self.row_bytes = layout.width * self.rows.element_size() + self.stamps.element_size()
        self.store: HistoryCache | None = None  # evicted from when no free run is long enough (attach)
        self.moves = 0  # entries a step copied to a new extent (no room after them, or a second visit in one step)
        self.in_place = 0  # entries a step grew where they lie

    @classmethod
    def for_budget(
        cls, layout: KVLayout, budget_bytes: int, headroom: int, scratch: int, like: torch.Tensor, granule: int = 16
    ) -> KVArena:
        """Rows for ``budget_bytes`` of entries (counted at their extents' capacity) plus ``headroom`` rows."""
        row = layout.width * like.element_size() + 8
        return cls(layout, budget_bytes // row + headroom, scratch, like.dtype, like.device, granule)

    @property
    def nbytes(self) -> int:
        return self.rows.shape[0] * self.row_bytes

    def attach(self, store: HistoryCache) -> None:
        """Make ``store`` count its entries at their extents' capacity and give extents back as it drops entries."""
        store.size_of = self.size_of
        store.on_drop = self.on_drop
        self.store = store

    def size_of(self, entry: CachedHistory) -> int:
        lease = entry.lease
        return entry.nbytes if lease is None else lease.extent.capacity * self.row_bytes

    def on_drop(self, entry: CachedHistory) -> None:
        """The store let ``entry`` go: its rows go back unless a step claimed them or a newer entry owns them."""
        lease = entry.lease
        if lease is not None and lease.owner is entry:
            self.give_back(lease)

    def give_back(self, lease: Lease) -> None:
        lease.owner = None
        self.alloc.release(lease.extent)

    def allocate(self, rows: int) -> Lease:
        """A claimed extent of at least ``rows`` rows, evicting the store's least recently used entries while no free
        run is long enough; ArenaFull when the store has nothing left to evict."""
        while True:
            extent = self.alloc.allocate(rows)
            if extent is not None:
                return Lease(extent, CLAIMED)
            if self.store is None or not self.store.evict_oldest():
                raise ArenaFull(f"no {rows} free rows in the arena of {self.alloc.rows} (largest free run "
                                f"{self.alloc.largest_free()}), nothing left to evict")  # fmt: skip

    def claim(self, lease: Lease, rows: int) -> bool:
        """Grow a held entry's extent in place to ``rows`` rows and claim it for the step: False (nothing changes)
        when the rows after it are taken."""
        if lease.owner is CLAIMED or lease.owner is None or not self.alloc.grow(lease.extent, rows):
            return False
        lease.owner = CLAIMED
        self.in_place += 1
        return True

    def copy_in(self, dst: Lease, kv: UserKV, src: Lease | None, now: int) -> None:
        """An entry's rows to a new extent: from its old extent where it has one (K/V and stamps, device copies),
        else from its own tensors (stamps from the host, restamped at ``now`` as every step restamps profiles)."""
        n, at = kv.length, dst.extent.start
        if n == 0:
            return
        if src is not None:
            a = src.extent.start
            self.rows[at : at + n].copy_(self.rows[a : a + n])
            self.stamps[at : at + n].copy_(self.stamps[a : a + n])
        else:
            self.rows[at : at + n].copy_(kv.rows)
            self.stamps[at : at + n].copy_(kv.timestamps_at(now), non_blocking=True)
        self.moves += 1

    def entry(self, lease: Lease, length: int, stamps: torch.Tensor, profile: int) -> UserKV:
        """The entry of the first ``length`` rows of ``lease`` (views of the arena; ``stamps`` on the host), its extent
        shrunk to them (the rows after, the step's candidates', go back: the store counts what the entry holds, and
        the next visit grows it in place while they are still free)."""
        self.alloc.shrink(lease.extent, length)
        a = lease.extent.start
        return UserKV(self.rows[a : a + length], stamps, profile, self.layout)
