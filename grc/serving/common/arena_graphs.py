"""The history cache's score step over the device arena (grc/serving/common/kv_arena.py), replayed from CUDA graphs.

ScoreGraphs (score_graphs.py) copies every hit's entry into the step's key rows and the grown entry back out; at one
user of mtgr-base with 3,581 cached rows those copies were a fifth of the step's device time (session 15). Here the
entries ARE rows of the arena: a user's keys are the range [start, start + cached + new) of the arena's rows, read by
the attention kernels through [users, 2] ranges (session 17) with ``max_user_keys`` the shape's bound, and the step
writes its new rows' K/V at start + cached + i (``GRDense.run_scattered``'s slots). Nothing is copied in or out; the
grown entry is a view of the rows the step wrote (history events), the candidates' rows after it left in the
extent's slack for the next visit's events to overwrite.

Per call, on the host: each user placed (a hit grown in place and claimed, else a new extent, the reused rows copied
once: ``KVArena``), the layout packed (offsets, ranges, groups, slots, candidate rows, and the stamps to write: the new
rows' and every hit's profile rows restamped at its request time), then one copy of the layout and one of the new
tokens, one replay, the candidates' scores gathered. Padding as in ScoreGraphs: the new rows padded to a rung of the
same ladder by pad users whose rows are all candidates, living in the arena's scratch rows; the key bound padded to a
power of two (at most max_seq_len). The graph of a shape (user slots, new rows, key bound) is captured once at its
first use and never invalidated: the arena's tensors never move.

A step the arena cannot place (no free run long enough with the store evicted empty: the step's own entries and pins
fragment it) is split in halves, each placed and run alone; a step no rung holds runs the same step eagerly at its
exact shape (``GraphStats.graph_misses``). Either way: the same scores.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from grc.model.gr import GRDense, token_groups
from grc.model.kv_cache import UserKV
from grc.serving.common.kv_arena import CLAIMED, ArenaFull, KVArena, Lease
from grc.serving.common.score_graphs import GraphedSteps, PackedStep, packed_spans, pad_users
from grc.serving.ranker.dense import GraphStats

FIELDS = ("q_offsets", "kv_ranges", "num_candidates", "group", "slots", "is_candidate", "candidate_rows", "stamp_at",
          "stamp_val")  # fmt: skip


@dataclass(frozen=True)
class ArenaShape:
    users: int  # user slots (a power of two; pad users and empty slots included)
    rows: int  # new rows (queries)
    keys: int  # the bound on one user's keys (max_user_keys)
    profile: int  # profile rows restamped per user slot (the model's)

    def sizes(self) -> dict[str, int]:
        u, r, restamps = self.users, self.rows, self.rows + self.users * self.profile
        return dict(zip(FIELDS, (u + 1, 2 * u, u, r, r, r, r, restamps, restamps), strict=True))

    @cached_property
    def spans(self) -> dict[str, tuple[int, int]]:
        return packed_spans(self.sizes())

    @property
    def length(self) -> int:
        return self.spans[FIELDS[-1]][1]


# one instance per shape (its spans worked out once, not at every step of the shape)
arena_shape = functools.lru_cache(maxsize=1024)(ArenaShape)


@dataclass
class ArenaUser:
    """One user of a step: ``kv`` its cached rows (None: nothing cached), of which the leading ``rows`` are reused
    (None: all; the store's hit passes its whole entry, not a prefix of it: two torch slices per hit the step never
    reads), ``lease`` where they lie in the arena (None: they are not arena rows), ``keep``: its grown entry is to
    be stored (else its rows go back). ``events``: the host stamps of its history events, reused and new (its grown
    entry's rows after the profile rows), where the caller has them (the store's visit: no read of ``kv``'s host
    stamps, a torch op per hit); None: ``kv``'s then the step's."""

    kv: UserKV | None
    lease: Lease | None
    keep: bool
    now: int
    rows: int | None = None
    events: np.ndarray | None = None
    past: int = field(init=False, default=0)  # the rows reused (0: nothing cached), worked out once for every stage

    def __post_init__(self) -> None:
        self.past = 0 if self.kv is None else self.kv.length if self.rows is None else self.rows

    @property
    def reused(self) -> UserKV | None:
        """The reused rows as a cache of their own (views): what a move copies and an unkept user is scored on."""
        return None if self.kv is None else self.kv.prefix(self.past)


@dataclass
class ArenaLayout:
    shape: ArenaShape
    packed: np.ndarray
    candidates: int  # candidate rows of the real users (the first entries of candidate_rows)


# A step placed whole: its users' claimed extents and its plan (ArenaGraphs._plan: the layout, and whether padded)
Placed = tuple[list[Lease], tuple[ArenaLayout, bool]]


@dataclass
class Prepared:
    """A step ``ArenaGraphs.prepare`` placed and planned before its tokens exist: its users, their rows, their pins,
    and ``ready`` when placed whole (else None: ``finish`` splits it); ``finish`` runs it, ``abandon`` lets it go."""

    users: list[ArenaUser]
    bounds: list[int]
    candidates: list[int]
    stamps: np.ndarray
    pins: list[Lease | None]
    ready: Placed | None = None


def key_rung(longest: int, max_seq_len: int) -> int:
    """The step's bound on one user's keys: a power of two >= 256 (kernels.hstu_attention.seq_bucket's rungs: each
    is autotuned at load), at most max_seq_len."""
    return min(max(256, 1 << (max(longest, 1) - 1).bit_length()), max_seq_len)


def arena_plan(
    dense: GRDense,
    users: list[tuple[int, int, int, int, int]],
    bounds: list[int],
    stamps: np.ndarray,
    rows: int,
    keys: int,
    scratch: tuple[int, int],
    buffer: Callable[[ArenaShape], np.ndarray] | None = None,
) -> ArenaLayout | None:
    """The padded layout of real ``users`` (per user: cached rows, new rows, candidates, extent start, request time)
    for ``rows`` new rows and a key bound ``keys`` (None when the padding does not fit the scratch rows
    [scratch[0], scratch[1] - 1); the last scratch row takes the writes that go nowhere). ``stamps``: the new rows'
    [Tq] on the host. ``buffer``: where a shape's layout is written (its kept step's host buffer: a fresh array per
    step page-faulted ~100 us of a served step's host time on the CPU); default a new array. Every field is written
    whole, so the buffer may hold an earlier step's layout."""
    cfg, profile = dense.cfg, len(dense.cfg.profile)
    total_q = bounds[-1]
    pad = pad_users(rows - total_q, rows - total_q, keys)  # (q, k) with q == k: each row its own candidate
    first, dump = scratch[0], scratch[1] - 1
    if first + rows - total_q > dump:
        return None
    layout: list[tuple[int, int, int, int, int]] = [(n, p + n, c, start, now) for p, n, c, start, now in users]
    at = first
    for q, _ in pad:
        layout.append((q, q, q, at, 0))
        at += q
    slots = 1 << (len(layout) - 1).bit_length()
    layout += [(0, 0, 0, 0, 0)] * (slots - len(layout))
    shape = arena_shape(slots, rows, keys, profile)
    packed = np.empty(shape.length, np.int64) if buffer is None else buffer(shape)
    q_off, ranges, n_c, group, slot, mask, picked, stamp_at, stamp_val = (packed[a:b] for a, b in shape.spans.values())
    n_q, n_kv, n_c[:], start, now = np.array(layout, np.int64).T
    q_off[0] = 0
    np.cumsum(n_q, out=q_off[1:])
    ranges[0::2], ranges[1::2] = start, start + n_kv
    # per user slot, then per new row (one repeat): its place in its sequence and its key row, each less the row's
    # index, and its user's context length
    per = np.empty((3, slots), np.int64)
    np.subtract(n_kv - n_q, q_off[:-1], out=per[0])
    np.add(per[0], start, out=per[1])
    np.subtract(n_kv, n_c, out=per[2])
    shift, reach, n_ctx = np.repeat(per, n_q, axis=1)
    row = np.arange(rows)
    position = row + shift
    group[:] = token_groups(cfg, position, n_ctx)
    np.add(row, reach, out=slot)
    candidate = position >= n_ctx
    candidate[total_q:] = False  # the pad users' rows (after the real users'): no real user's candidates
    mask[:] = candidate
    chosen = candidate.nonzero()[0]  # (np.flatnonzero: a ravel and a Python wrapper around the same)
    picked[: chosen.size] = chosen
    picked[chosen.size :] = 0
    stamp_at[:rows] = slot
    stamp_val[:total_q] = stamps
    stamp_val[total_q:rows] = 0  # the pad rows'
    restamp_at, restamp_val = stamp_at[rows:].reshape(slots, profile), stamp_val[rows:].reshape(slots, profile)
    real, column = len(users), np.arange(profile)
    cached = column < (n_kv - n_q)[:real, None]  # a hit's cached profile rows take its request time
    restamp_at[:real] = np.where(cached, start[:real, None] + column, dump)
    restamp_at[real:] = dump
    restamp_val[:real] = np.where(cached, now[:real, None], 0)
    restamp_val[real:] = 0
    return ArenaLayout(shape, packed, int(chosen.size))


class _ArenaStep(PackedStep):
    """One shape of the arena step; every shape reads and writes the arena's rows and stamps."""

    def __init__(self, dense: GRDense, shape: ArenaShape, impl: str, fuse: bool, arena: KVArena):
        super().__init__(shape, dense.cfg.d_model, arena.rows.dtype, arena.rows.device)
        self.dense, self.impl, self.fuse, self.arena = dense, impl, fuse, arena
        self.ranges = self.fields["kv_ranges"].view(-1, 2)  # made once: a view is a torch op per run

    def run(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        f, arena = self.fields, self.arena
        arena.stamps.index_copy_(0, f["stamp_at"], f["stamp_val"])
        return self.dense.run_scattered(
            self.tokens, f["group"], arena.keys, arena.values, f["slots"], f["q_offsets"], self.ranges,
            arena.stamps, f["num_candidates"], f["is_candidate"] != 0, self.impl, self.fuse, self.shape.keys,
        )  # fmt: skip

    def load(self, layout: ArenaLayout, tokens: torch.Tensor) -> None:
        """The layout and the new tokens into this shape's buffers (tokens computed there already stay: the fused
        Ranker projects them into ``ArenaGraphs.token_buffer``)."""
        self.upload(layout.packed)
        if tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens[: tokens.shape[0]].copy_(tokens)


class ArenaGraphs(GraphedSteps):
    """The store's cached step over ``arena``: users' entries read and grown where they lie."""

    RANGES = True

    def __init__(
        self,
        dense: GRDense,
        impl: str,
        stats: GraphStats,
        max_users: int,
        arena: KVArena,
        pad: bool | None = None,
        **kw: Any,
    ):
        """pad (default: with graphs): steps padded to the ladders' shapes, as graphs need; without, each step runs
        eagerly at its exact shape (a CPU instance: padding would only add work)."""
        super().__init__(dense, impl, stats, max_users, **kw)
        self.pad = self.graphs if pad is None else pad
        self.arena = arena
        self.splits = 0  # steps the arena could not place whole (run in halves)
        self.unplaced = 0  # users the arena could not place even alone (scored eagerly, not kept)
        need, held = self.scratch_rows(dense, max_users), arena.rows.shape[0] - arena.scratch
        if held < need:
            raise ValueError(f"the arena's {held} scratch rows cannot hold the padding of {max_users}-user steps "
                             f"({need}: ArenaGraphs.scratch_rows)")  # fmt: skip

    @staticmethod
    def scratch_rows(dense: GRDense, max_users: int) -> int:
        """The scratch rows an arena needs for steps of up to ``max_users`` users (the ladder's largest padding
        plus the dump row)."""
        from grc.serving.ranker.buckets import ladder

        rungs = ladder(16, max_users * dense.cfg.hstu.max_seq_len)
        return max(b - a - 1 for a, b in itertools.pairwise([0, *rungs])) + 1

    def _warm_step(self, tokens: torch.Tensor, stamps: torch.Tensor, candidates: int, now: int) -> None:
        user = ArenaUser(None, None, False, now)
        self.score([user], tokens, [0, tokens.shape[0]], [candidates], stamps.numpy(), lambda *_: None)

    def score(
        self,
        users: list[ArenaUser],
        tokens: torch.Tensor,
        bounds: list[int],
        candidates: list[int],
        stamps: np.ndarray,
        keep: Callable[[int, UserKV, Lease], None],
    ) -> torch.Tensor:
        """B users' new tokens [Tq, D] (user b's rows ``bounds[b]:bounds[b+1]``, its last ``candidates[b]``
        candidates; ``stamps`` their [Tq] on the host) against their cached rows -> the candidates' scores
        [sum(candidates), tasks]. ``keep(b, entry, lease)`` is called for each user b with ``keep`` once its part
        of the step ran: its grown entry (views of the arena) and its claimed lease, which the caller stores (making
        the entry its owner) before the step goes on, so that a split step's later part may evict it; the rows of
        users without ``keep`` go back. Every hit's extent stays pinned until its user's part ran (an eviction then
        frees nothing a later part copies from). One user twice in a step: the first visit claims the entry (grown in
        place), the second finds it claimed and copies the rows it reuses before the step runs. A step split in parts
        moves every hit: the placement that failed gave back what it claimed, with the store evicted empty, so no hit
        is claimed in place after it (and no part's new rows overwrite rows a later part copies from)."""
        return self.finish(self.prepare(users, bounds, candidates, stamps), tokens, keep)

    def prepare(self, users: list[ArenaUser], bounds: list[int], candidates: list[int], stamps: np.ndarray) -> Prepared:
        """``score``'s host part that needs no tokens, done before they are computed (the fused Ranker: in its
        layout phase, before the lookups and the projector): the hits pinned, the step placed whole (the hits
        claimed, the new extents allocated) and its layout planned; a step the arena cannot place whole is left to
        ``finish`` (split in parts, as ``score`` splits it). Then ``finish`` with the tokens, or ``abandon``."""
        h = self.dense.cfg.hstu
        pairs = zip(users, itertools.pairwise(bounds), strict=True)
        total = [u.past + b - a for u, (a, b) in pairs]
        if any(t > h.max_seq_len for t in total) or min(candidates, default=0) < 1:
            raise ValueError(  # what GRDense.score refuses, refused alike: the key bound would not hold them
                f"arena step: cached + new tokens {total} must be <= max_seq_len {h.max_seq_len}, and every user needs "
                f"at least one candidate ({candidates})"
            )
        alloc = self.arena.alloc
        pins = [u.lease if u.lease is not None and u.kv is not None else None for u in users]
        for lease in pins:
            if lease is not None:
                alloc.pin(lease.extent)
        prepared = Prepared(users, bounds, candidates, stamps, pins)
        try:
            prepared.ready = self._placed(users, bounds, candidates, stamps)  # None: split by finish
        except BaseException:
            self.abandon(prepared)
            raise
        return prepared

    def token_buffer(self, prepared: Prepared, dtype: torch.dtype) -> torch.Tensor | None:
        """Where a prepared step's new tokens [Tq, D] may be computed in place: the first rows of its padded shape's
        token buffer, which ``finish`` then leaves as they are (a copy into the buffer per step, on a GPU a launch);
        None where the step was not placed whole, runs at its exact shape, or keeps its tokens in another dtype."""
        if prepared.ready is None or not prepared.ready[1][1]:
            return None
        step = self._step(prepared.ready[1][0].shape)
        return step.tokens[: prepared.bounds[-1]] if step.tokens.dtype == dtype else None

    def finish(
        self, prepared: Prepared, tokens: torch.Tensor, keep: Callable[[int, UserKV, Lease], None]
    ) -> torch.Tensor:
        """A prepared step run on its tokens [Tq, D]: ``score``'s result, ``keep`` called as there."""
        p = prepared
        # placed whole, else split (the failed placement gave back what it claimed); from here on the step gives
        # the leases back or keeps them
        ready, p.ready = p.ready, None
        try:
            return self._score(p.users, tokens, p.bounds, p.candidates, p.stamps, keep, 0, p.pins, ready, ready is None)
        finally:
            self._unpin(p.pins, 0, len(p.pins))  # those whose part did not run

    def abandon(self, prepared: Prepared) -> None:
        """A prepared step that will not run (what computes its tokens failed): its claimed extents go back, its
        pins go."""
        if prepared.ready is not None:
            for lease in prepared.ready[0]:
                self.arena.give_back(lease)
            prepared.ready = None
        self._unpin(prepared.pins, 0, len(prepared.pins))

    def _score(
        self,
        users: list[ArenaUser],
        tokens: torch.Tensor,
        bounds: list[int],
        candidates: list[int],
        stamps: np.ndarray,
        keep: Callable[[int, UserKV, Lease], None],
        first: int,
        pins: list[Lease | None],
        ready: Placed | None = None,
        split: bool = False,
    ) -> torch.Tensor:
        """``score`` of users[first:first + len(users)] of the step, split in halves while the arena cannot place
        them whole; each user's pin goes as soon as its part ran (the pins of users still to come fragment the
        arena, not those of users done). One user the arena cannot place even so (the pins of the users after it in
        the way) is scored eagerly against its cached rows where they lie, and kept nowhere (``unplaced``). ``ready``:
        the claimed leases and the plan ``prepare`` made, ``split``: its placement failed (neither: placed here)."""
        if ready is None and not split:
            ready = self._placed(users, bounds, candidates, stamps)
        if ready is None:  # the arena could not place them whole
            if len(users) == 1:
                self.unplaced += 1
                scores = self._unkept(users[0], tokens, bounds, candidates, stamps)
                self._unpin(pins, first, 1)
                return scores
            self.splits += 1
            half = len(users) // 2
            cut = bounds[half]
            head = self._score(users[:half], tokens[:cut], bounds[: half + 1], candidates[:half], stamps[:cut], keep,
                               first, pins)  # fmt: skip
            rest = [b - cut for b in bounds[half:]]
            tail = self._score(users[half:], tokens[cut:], rest, candidates[half:], stamps[cut:], keep, first + half,
                               pins)  # fmt: skip
            return torch.cat([head, tail])
        leases, plan = ready
        try:
            scores = self._run(plan, tokens)
        except BaseException:
            for lease in leases:
                self.arena.give_back(lease)
            raise
        self._grown(users, leases, bounds, candidates, stamps, keep, first)
        self._unpin(pins, first, len(users))
        return scores

    def _unpin(self, pins: list[Lease | None], first: int, count: int) -> None:
        for i in range(first, first + count):
            lease, pins[i] = pins[i], None
            if lease is not None:
                self.arena.alloc.unpin(lease.extent)

    def _unkept(
        self, user: ArenaUser, tokens: torch.Tensor, bounds: list[int], candidates: list[int], stamps: np.ndarray
    ) -> torch.Tensor:
        """One user scored by ``GRDense.score`` eagerly, its cached rows read where they lie (pinned), nothing kept."""
        reused = user.reused
        cache = reused if reused is not None else self.dense.empty_cache(len(self.dense.cfg.profile), tokens)
        times = torch.from_numpy(stamps).to(tokens.device)
        scores, _ = self.dense.score([cache], tokens, torch.tensor(bounds), torch.tensor(candidates), times,
                                     [user.now], self.impl, reuse_checked=True)  # fmt: skip
        return scores

    def _place(self, users: list[ArenaUser], bounds: list[int]) -> list[Lease]:
        """Each user's claimed extent, holding its cached rows followed by room for its new ones; on ArenaFull
        every extent this call claimed goes back (the store is empty by then: no entry owns them)."""
        arena, leases = self.arena, []
        try:
            for u, (a, b) in zip(users, itertools.pairwise(bounds), strict=True):
                need = u.past + b - a
                lease = u.lease
                if u.kv is not None and lease is not None and arena.claim(lease, need):
                    leases.append(lease)
                    continue
                fresh = arena.allocate(need)
                leases.append(fresh)
                reused = u.reused
                if reused is not None:
                    arena.copy_in(fresh, reused, lease, u.now)
        except ArenaFull:
            for lease in leases:
                arena.give_back(lease)
            raise
        return leases

    def _placed(
        self, users: list[ArenaUser], bounds: list[int], candidates: list[int], stamps: np.ndarray
    ) -> Placed | None:
        """The users placed whole (their extents claimed) and planned; None when the arena cannot place them whole
        (``_place`` gave back what it claimed). A plan that raises gives the claimed extents back."""
        try:
            leases = self._place(users, bounds)
        except ArenaFull:
            return None
        try:
            return leases, self._plan(users, leases, bounds, candidates, stamps)
        except BaseException:
            for lease in leases:
                self.arena.give_back(lease)
            raise

    def _plan(
        self, users: list[ArenaUser], leases: list[Lease], bounds: list[int], candidates: list[int], stamps: np.ndarray
    ) -> tuple[ArenaLayout, bool]:
        """The placed users' layout (host numpy, no tokens needed) and whether it is padded to a kept shape (else
        the step's exact shape, run eagerly)."""
        h = self.dense.cfg.hstu
        placed = [
            (u.past, b - a, c, lease.extent.start, u.now)
            for u, (a, b), c, lease in zip(users, itertools.pairwise(bounds), candidates, leases, strict=True)
        ]
        longest = max(p + n for p, n, *_ in placed)
        scratch = (self.arena.scratch, self.arena.rows.shape[0])
        rows = next((r for r in self.rows_ladder if r >= bounds[-1]), None) if self.pad else None
        if rows is not None:
            keys = key_rung(longest, h.max_seq_len)
            layout = arena_plan(self.dense, placed, bounds, stamps, rows, keys, scratch, self._host_buffer)
            if layout is not None:
                return layout, True
        layout = arena_plan(self.dense, placed, bounds, stamps, bounds[-1], longest, scratch)
        assert layout is not None  # no padding
        return layout, False

    def _run(self, plan: tuple[ArenaLayout, bool], tokens: torch.Tensor) -> torch.Tensor:
        """A planned step on its tokens -> the real users' candidates' scores."""
        layout, padded = plan
        if not padded:  # unpadded, or no rung holds it: the same step at its exact shape, eagerly
            self.stats.graph_misses += self.pad
            step = _ArenaStep(self.dense, layout.shape, self.impl, self.fuse, self.arena)
            step.load(layout, tokens)
            out = step.run()[0]
        else:
            step = self._step(layout.shape)
            step.load(layout, tokens)
            out = self._replay(step)[0]
            self.stats.padded_tokens += layout.shape.rows - tokens.shape[0]
        return out[step.fields["candidate_rows"][: layout.candidates]]

    def _step(self, shape: ArenaShape) -> _ArenaStep:
        """The kept step of a padded shape (made at its first use)."""
        step: _ArenaStep = self._kept(shape, lambda: _ArenaStep(self.dense, shape, self.impl, self.fuse, self.arena))
        return step

    def _host_buffer(self, shape: ArenaShape) -> np.ndarray:
        """Where a padded step's layout is planned: its kept step's host buffer, which ``_run`` then uploads as is."""
        return self._step(shape).host_buffer()

    def _grown(
        self,
        users: list[ArenaUser],
        leases: list[Lease],
        bounds: list[int],
        candidates: list[int],
        stamps: np.ndarray,
        keep: Callable[[int, UserKV, Lease], None],
        first: int,
    ) -> None:
        """Per user its grown entry (views of the arena: its cached rows and new history events, the candidates'
        rows after them left out; the stamps from the host, restamped) handed to ``keep`` with its lease, or its
        rows given back."""
        profile = len(self.dense.cfg.profile)
        for i, (u, lease, (a, b), c) in enumerate(
            zip(users, leases, itertools.pairwise(bounds), candidates, strict=True)
        ):
            if not u.keep:
                self.arena.give_back(lease)
                continue
            # the entry's host stamps built in numpy, one tensor made at the end: the events' (the caller's, else the
            # cached rows' host copy and then the new rows'), the profile rows restamped at the request time
            # (UserKV.timestamps_at; a miss's carry it already). Four small torch ops per user before (from_numpy,
            # clone, cat, fill).
            past = u.past
            held = np.empty(past + b - c - a, np.int64)
            if u.events is not None:  # a length that does not match fails here
                held[profile:] = u.events
            else:
                if u.kv is not None:
                    held[:past] = u.kv.timestamps.numpy()[:past]
                held[past:] = stamps[a : b - c]
            held[: min(profile, held.size)] = u.now
            assert lease.owner is CLAIMED
            keep(first + i, self.arena.entry(lease, held.size, torch.from_numpy(held), profile), lease)
