"""What the history cache keeps per user: every layer's keys and values of the cached tokens.

Under grc's mask (``history_mask: causal``) a history or profile token never attends to a
candidate nor to a later event, so layer l's K/V of the first n tokens depend on those n tokens
alone: they can be computed once (``GRDense.prefill``) and reused by later requests whose
sequence starts with the same tokens (``GRDense.score``), which compute only their new tokens.

One subtlety: MTGR's profile tokens are stamped with the request time (TokenProjector), and a
history event's time-bias bucket against a profile token is bucket(|t_event - t_request|). So at
a later request time a cached row stays exact only while it and every row before it keep their
buckets against the profile tokens: ``reusable_rows`` says how many leading rows do (the newest
events, with the shortest gaps, move first), ``prefix`` keeps those; HSTU models (no profile
tokens) always reuse every row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from grc.model.attention import abs_time_gap, bucket_bounds, time_bucket


class HistoryCacheUnsupported(ValueError):
    """The model's attention makes cached rows depend on later tokens: nothing can be cached."""


def reusable_rows(timestamps: torch.Tensor | np.ndarray, profile: int, now: int, time_buckets: int) -> int:
    """Of cached tokens stamped ``timestamps`` (the first ``profile`` of them profile tokens, stamped with the
    request time they were computed at), how many leading rows equal what a request at ``now`` computes: every
    row before the first cached history event whose time bucket against the (re-stamped) profile tokens moves.
    A row depends only on the rows before it (causal) and their stamps, so those rows are exact; the newest
    events move first (their gaps are the shortest), so a later request keeps most rows. A tensor (where the
    K/V live: on a GPU a device read) or a numpy array (the serving store's host copy)."""
    length = int(timestamps.shape[0])
    if profile == 0 or length <= profile:  # no profile tokens, or no events cached yet
        return length
    if isinstance(timestamps, np.ndarray):
        rows = reusable_rows_sorted(timestamps[profile:], int(timestamps[0]), profile, now, time_buckets)
        if rows is not None:
            return rows
    return _reusable_rows_elementwise(timestamps, profile, now, time_buckets)


def reusable_rows_sorted(events: np.ndarray, then: int, profile: int, now: int, time_buckets: int) -> int | None:
    """``reusable_rows`` of ``profile`` rows stamped ``then`` followed by rows stamped ``events`` (the store's host
    copy, column by column: no concatenated copy), where ``first_moved_sorted`` decides it; else None."""
    first = first_moved_sorted(events, then, now, time_buckets)
    if first is None:
        return None
    return profile + (first if first >= 0 else len(events))


def first_moved_sorted(events: np.ndarray, then: int, now: int, time_buckets: int) -> int | None:
    """``reusable_rows``' answer for the served store's common case, by binary search instead of a bucket per event
    (~95 us per visit of 1,000 events on the host, ~half of a served hit's lookup): events sorted, none after
    ``then`` (the cached profile stamp), ``then <= now``, all within [0, 2**62). There the gaps to ``then`` and to
    ``now`` only grow from one to the other, so event e moves iff a bucket bound B = 2**k - 1 (k = 1..NB-1) has
    then - e < B <= now - e, i.e. then - B < e <= now - B: per bound the first event past then - B (sorted), moved
    iff it is <= now - B. -> the first moved event's index, -1 when none moved, None when the case does not hold
    (the caller computes every event's bucket)."""
    n = len(events)
    if n == 0 or not (int(events[0]) >= 0 and int(events[-1]) <= then <= now < 1 << 62):
        return None
    if n > 1 and not bool((events[1:] >= events[:-1]).all()):
        return None
    bounds = _bounds(time_buckets)
    if bounds.size == 0:  # one bucket: nothing moves
        return -1
    at = np.searchsorted(events, then - bounds, side="right")
    inside = at < n
    moved = at[inside][events[at[inside]] <= (now - bounds)[inside]]
    return int(moved.min()) if moved.size else -1


@functools.lru_cache(maxsize=8)
def _bounds(time_buckets: int) -> np.ndarray:
    """bucket_bounds as a read-only int64 array, made once per bucket count (a served hit asked for it each visit)."""
    bounds = np.array(bucket_bounds(time_buckets), np.int64)
    bounds.flags.writeable = False
    return bounds


def _reusable_rows_elementwise(timestamps: torch.Tensor | np.ndarray, profile: int, now: int, time_buckets: int) -> int:
    """``reusable_rows`` by every event's bucket then and now (any stamps; a tensor or an array)."""
    length = int(timestamps.shape[0])
    events: Any = timestamps[profile:]
    then, later = events * 0 + timestamps[0], events * 0 + now  # the profile stamps then and now, per event
    before = time_bucket(abs_time_gap(events, then), time_buckets)
    moved: Any = before != time_bucket(abs_time_gap(events, later), time_buckets)
    first = int((moved * 1).argmax())  # the first moved event (0 when none moved: told apart below)
    return profile + first if bool(moved[first]) else length


@dataclass(frozen=True)
class KVLayout:
    """How one row of a cache packs every layer's K and V: [K_0 | V_0 | K_1 | V_1 | ...], K_l H x Dqk wide,
    V_l H x Dv. One tensor per user instead of two per layer: a served hit copies its cache into the step's
    buffers, and stores its grown cache, in one op per user (per layer and kind it was 2L ops per user, each
    launched from Python: 16 users per step spent ~4 ms of host time there on the H200,
    bench/results/history-cache-batches-h200-split.json)."""

    layers: int
    heads: int
    head_qk: int
    head_v: int

    @property
    def width(self) -> int:
        return self.layers * self.heads * (self.head_qk + self.head_v)

    def split(self, rows: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """rows [n, width] -> per layer K [n, H, Dqk] and V [n, H, Dv]: views (a write through one writes rows)."""
        h, qk, v = self.heads, self.heads * self.head_qk, self.heads * self.head_v
        starts = [layer * (qk + v) for layer in range(self.layers)]
        keys = tuple(rows[:, a : a + qk].unflatten(1, (h, self.head_qk)) for a in starts)
        values = tuple(rows[:, a + qk : a + qk + v].unflatten(1, (h, self.head_v)) for a in starts)
        return keys, values

    def pack(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per layer K [n, H, Dqk] and V [n, H, Dv] -> rows [n, width] (one copy)."""
        parts = [t.flatten(1) for k, v in zip(keys, values, strict=True) for t in (k, v)]
        return torch.cat(parts, 1)


@dataclass(frozen=True)
class UserKV:
    """One user's cached tokens: ``rows`` [n, width] holding every layer's K and V (``layout``; per layer
    views as ``keys`` [n, H, Dqk] and ``values`` [n, H, Dv]) where the model runs, their timestamps [n] int64 on
    the HOST (profile tokens carry the request time they were computed at: the reuse check and the score step's
    layout are host work, so a step never reads them back from the device) and the profile token count.
    Immutable: a longer cache is a new object (``extended``), so a reader never sees a torn one."""

    rows: torch.Tensor
    timestamps: torch.Tensor
    profile: int
    layout: KVLayout

    @classmethod
    def from_layers(
        cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], timestamps: torch.Tensor, profile: int
    ) -> UserKV:
        """From per layer K [n, H, Dqk] and V [n, H, Dv] (copied into one rows tensor)."""
        _, heads, head_qk = keys[0].shape
        layout = KVLayout(len(keys), heads, head_qk, values[0].shape[-1])
        return cls(layout.pack(keys, values), timestamps.cpu(), profile, layout)

    @cached_property
    def _split(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return self.layout.split(self.rows)

    @property
    def keys(self) -> tuple[torch.Tensor, ...]:
        return self._split[0]

    @property
    def values(self) -> tuple[torch.Tensor, ...]:
        return self._split[1]

    @property
    def length(self) -> int:
        return int(self.timestamps.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.timestamps))

    def timestamps_at(self, now: int) -> torch.Tensor:
        """The cached timestamps as a request at time ``now`` stamps them (profile tokens: now)."""
        out = self.timestamps.clone()
        out[: self.profile] = now
        return out

    def reusable_rows(self, now: int, time_buckets: int) -> int:
        """How many leading rows equal what a request at ``now`` computes (``reusable_rows`` above, on this
        cache's own host timestamps)."""
        return reusable_rows(self.timestamps, self.profile, now, time_buckets)

    def reusable_at(self, now: int, time_buckets: int) -> bool:
        """True when every cached row equals what a request at ``now`` would compute."""
        return self.reusable_rows(now, time_buckets) == self.length

    def prefix(self, rows: int) -> UserKV:
        """The cache of the first ``rows`` tokens (views: no copy)."""
        if rows == self.length:
            return self
        return UserKV(self.rows[:rows], self.timestamps[:rows], self.profile, self.layout)

    def extended(self, rows: torch.Tensor, timestamps: torch.Tensor, now: int) -> UserKV:
        """This cache as computed at request time ``now``, with rows appended (new history events: [m, width]
        as ``layout`` packs them, stamps [m], host or device). The old rows were checked reusable at ``now``, so
        they hold the same values as rows computed at ``now``: the profile tokens take that stamp."""
        if timestamps.numel() == 0:
            return UserKV(self.rows, self.timestamps_at(now), self.profile, self.layout)
        stamps = torch.cat([self.timestamps, timestamps.cpu()])
        stamps[: min(self.profile, self.length)] = now  # the cached profile rows (timestamps_at)
        return UserKV(torch.cat([self.rows, rows]), stamps, self.profile, self.layout)

    @staticmethod
    def empty(layers: int, heads: int, head_qk: int, head_v: int, profile: int, like: torch.Tensor) -> UserKV:
        """No cached tokens yet (what prefill extends); ``profile``: how many of the tokens to come
        are profile tokens."""
        layout = KVLayout(layers, heads, head_qk, head_v)
        stamps = torch.zeros(0, dtype=torch.int64)  # on the host (see the class)
        return UserKV(like.new_zeros((0, layout.width)), stamps, profile, layout)


def grown(
    caches: list[UserKV],
    bounds: list[int],
    candidates: list[int],
    new_k: list[torch.Tensor],
    new_v: list[torch.Tensor],
    timestamps: torch.Tensor,
    now: list[int],
) -> list[UserKV]:
    """Each user's cache extended by its new history rows: of the score step's new rows (per layer ``new_k`` /
    ``new_v`` [Tq, H, D], ``timestamps`` [Tq]; user b's rows ``bounds[b]:bounds[b+1]``) those before its
    ``candidates[b]`` candidates. The rows are copied (packed once, then ``extended`` concatenates): the step's
    buffers may be reused."""
    if not caches:
        return []
    rows, stamps = caches[0].layout.pack(new_k, new_v), timestamps.cpu()  # one read of the new stamps
    out = []
    for b, cache in enumerate(caches):
        events = slice(bounds[b], bounds[b + 1] - candidates[b])
        out.append(cache.extended(rows[events], stamps[events], now[b]))
    return out


@dataclass(frozen=True)
class ScorePlan:
    """One score step's layout, from host integers (``GRDense.plan_score``): B users' new rows
    ``[bounds[b], bounds[b+1])`` of which the last ``candidates[b]`` are candidates, and the device
    tensors the layers read. Built before any device work, so the step itself never waits on the host."""

    bounds: list[int]
    candidates: list[int]
    q_offsets: torch.Tensor  # [B+1] the new rows per user
    kv_offsets: torch.Tensor  # [B+1] cached + new rows per user
    kv_timestamps: torch.Tensor  # [sum(cached + new)] per user: cached stamps (at the request time), new stamps
    num_candidates: torch.Tensor  # [B]
    group: torch.Tensor  # [Tq] token group of each new row (profile / history / candidate)
    candidate_rows: torch.Tensor  # [sum(candidates)] indices of the candidate rows among the new rows


def to_device_once(host: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host int64 tensors -> the same on ``device`` in ONE transfer: concatenated, staged in pinned memory and
    copied without blocking (a pageable copy per tensor waits for the stream each time: five host syncs per
    score step on the H200, bench/results/history-cache-profile-h200.json), then split back into views."""
    if device.type != "cuda":
        return {name: t.to(device) for name, t in host.items()}
    flat = torch.cat([t.reshape(-1) for t in host.values()]).pin_memory().to(device, non_blocking=True)
    return dict(zip(host, flat.split([t.numel() for t in host.values()]), strict=True))
