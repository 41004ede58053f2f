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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from grc.model.attention import abs_time_gap, time_bucket


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
    events: Any = timestamps[profile:]
    then, later = events * 0 + timestamps[0], events * 0 + now  # the profile stamps then and now, per event
    before = time_bucket(abs_time_gap(events, then), time_buckets)
    moved: Any = before != time_bucket(abs_time_gap(events, later), time_buckets)
    first = int((moved * 1).argmax())  # the first moved event (0 when none moved: told apart below)
    return profile + first if bool(moved[first]) else length


@dataclass(frozen=True)
class UserKV:
    """One user's cached tokens: per layer K [n, H, Dqk] and V [n, H, Dv], their timestamps [n]
    (profile tokens carry the request time they were computed at) and the profile token count.
    Immutable: a longer cache is a new object (``extended``), so a reader never sees a torn one."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    timestamps: torch.Tensor
    profile: int

    @property
    def length(self) -> int:
        return int(self.timestamps.numel())

    @property
    def nbytes(self) -> int:
        tensors = (*self.keys, *self.values, self.timestamps)
        return sum(t.numel() * t.element_size() for t in tensors)

    def timestamps_at(self, now: int) -> torch.Tensor:
        """The cached timestamps as a request at time ``now`` stamps them (profile tokens: now)."""
        out = self.timestamps.clone()
        out[: self.profile] = now
        return out

    def reusable_rows(self, now: int, time_buckets: int) -> int:
        """How many leading rows equal what a request at ``now`` computes (``reusable_rows`` below, on this
        cache's own timestamps: on a GPU that reads the device; the serving store asks its host copy)."""
        return reusable_rows(self.timestamps, self.profile, now, time_buckets)

    def reusable_at(self, now: int, time_buckets: int) -> bool:
        """True when every cached row equals what a request at ``now`` would compute."""
        return self.reusable_rows(now, time_buckets) == self.length

    def prefix(self, rows: int) -> UserKV:
        """The cache of the first ``rows`` tokens (views: no copy)."""
        if rows == self.length:
            return self
        return UserKV(
            keys=tuple(k[:rows] for k in self.keys),
            values=tuple(v[:rows] for v in self.values),
            timestamps=self.timestamps[:rows],
            profile=self.profile,
        )

    def extended(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], timestamps: torch.Tensor, now: int
    ) -> UserKV:
        """This cache as computed at request time ``now``, with rows appended (new history events:
        per layer [m, H, D], stamps [m]). The old rows were checked reusable at ``now``, so they
        hold the same values as rows computed at ``now``: the profile tokens take that stamp."""
        if timestamps.numel() == 0:
            return UserKV(self.keys, self.values, self.timestamps_at(now), self.profile)
        return UserKV(
            keys=tuple(torch.cat([old, new]) for old, new in zip(self.keys, keys, strict=True)),
            values=tuple(torch.cat([old, new]) for old, new in zip(self.values, values, strict=True)),
            timestamps=torch.cat([self.timestamps_at(now), timestamps]),
            profile=self.profile,
        )

    @staticmethod
    def empty(layers: int, heads: int, head_qk: int, head_v: int, profile: int, like: torch.Tensor) -> UserKV:
        """No cached tokens yet (what prefill extends); ``profile``: how many of the tokens to come
        are profile tokens."""
        return UserKV(
            keys=tuple(like.new_zeros((0, heads, head_qk)) for _ in range(layers)),
            values=tuple(like.new_zeros((0, heads, head_v)) for _ in range(layers)),
            timestamps=torch.zeros(0, dtype=torch.int64, device=like.device),
            profile=profile,
        )


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
    ``candidates[b]`` candidates. The rows are copied (``extended`` concatenates): the step's buffers may be reused."""
    out = []
    for b, cache in enumerate(caches):
        events = slice(bounds[b], bounds[b + 1] - candidates[b])
        out.append(cache.extended([k[events] for k in new_k], [v[events] for v in new_v], timestamps[events], now[b]))
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
