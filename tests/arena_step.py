"""Several users of the history cache in one step (``users``, tests/test_history_cache_model.py), and that step over
a device arena, as the store will run it (shared by tests/test_history_cache_model.py, float64, and the
interpreter worker, which runs it through the Triton kernel):
users' cached rows laid out in extents of one NaN-filled arena (grc.serving.common.row_arena, allocated in shuffled
order with a foreign extent between them), the new rows written after each user's cached ones, attention through
[users, 2] key ranges."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grc.model.gr import GRDense, GRModel, Tokens
from grc.model.kv_cache import UserKV
from grc.model.sample import random_batch
from grc.model.tables import Tables
from grc.serving.common.row_arena import Extent, RowArena

# per user: history events, candidates, events new since the cached part (all, some or none of the history)
USERS = ((30, 3, 4), (5, 9, 0), (17, 1, 16))


@dataclass
class Users:
    """B users split into cached tokens (prefilled) and the new rows a step scores."""

    toks: list[Tokens]  # each user's whole sequence (the uncached forward's input)
    caches: list[UserKV]
    tokens: torch.Tensor
    offsets: torch.Tensor
    num_candidates: torch.Tensor
    stamps: torch.Tensor
    now: list[int]

    @property
    def rest(self) -> list[int]:
        return torch.diff(self.offsets).tolist()


def users(model: GRModel, tables: Tables, gen: torch.Generator, impl: str = "pytorch") -> Users:
    """Fresh random users; the cached part ends a few events before the history does (profile tokens included)."""
    cfg, profile = model.cfg, len(model.cfg.profile)
    toks: list[Tokens] = []
    now: list[int] = []
    for history, candidates, _ in USERS:
        batch = random_batch(cfg, 1, history, candidates, gen)
        toks.append(model.projector(batch, tables))
        now.append(int(batch.request_time[0]))
    cached = [profile + history - new for history, _, new in USERS]
    caches = [
        model.dense.prefill(t.tokens[:k], t.timestamps[:k], profile, n, impl)
        for t, k, n in zip(toks, cached, now, strict=True)
    ]
    rest = [t.tokens.shape[0] - k for t, k in zip(toks, cached, strict=True)]
    return Users(
        toks,
        caches,
        torch.cat([t.tokens[k:] for t, k in zip(toks, cached, strict=True)]),
        torch.tensor([0, *torch.tensor(rest).cumsum(0).tolist()]),
        torch.cat([t.num_candidates for t in toks]),
        torch.cat([t.timestamps[k:] for t, k in zip(toks, cached, strict=True)]),
        now,
    )


@dataclass
class ArenaRun:
    scores: torch.Tensor  # the candidates' scores [sum(candidates), tasks]
    rows: torch.Tensor  # the arena after the step
    extents: list[Extent]  # per user
    foreign: Extent  # rows of nobody in this step: must stay NaN


def score_over_arena(dense: GRDense, u: Users, impl: str, fuse: bool = False) -> ArenaRun:
    """fuse: the fused GEMMs (the UVQK epilogue writing the new K/V rows) and heads kernel, as the served step."""
    arena = RowArena(512, granule=8)
    foreign = arena.allocate(20)
    placed = {b: arena.allocate(u.caches[b].length + u.rest[b]) for b in (2, 0, 1)}
    assert foreign is not None and all(e is not None for e in placed.values())
    extents = [placed[b] for b in range(len(u.caches))]
    dtype = u.caches[0].rows.dtype
    rows = torch.full((arena.rows, u.caches[0].layout.width), float("nan"), dtype=dtype)
    kv_stamps = torch.full((arena.rows,), -(1 << 60), dtype=torch.int64)
    slots, ranges = [], []
    for b, (cache, extent) in enumerate(zip(u.caches, extents, strict=True)):
        assert extent is not None
        start, end = extent.start, extent.start + cache.length + u.rest[b]
        rows[start : start + cache.length] = cache.rows
        kv_stamps[start : start + cache.length] = cache.timestamps_at(u.now[b])
        slots.append(torch.arange(start + cache.length, end))
        ranges.append([start, end])
    slot = torch.cat(slots)
    kv_stamps[slot] = u.stamps
    keys, values = u.caches[0].layout.split(rows)
    plan = dense.plan_score(u.caches, u.offsets, u.num_candidates, u.stamps, u.now)
    is_candidate = torch.zeros(u.tokens.shape[0], dtype=torch.bool)
    is_candidate[plan.candidate_rows] = True
    scores, _, _ = dense.run_scattered(
        u.tokens, plan.group, list(keys), list(values), slot, plan.q_offsets, torch.tensor(ranges), kv_stamps,
        plan.num_candidates, is_candidate, impl, fuse, max_user_keys=max(r[1] - r[0] for r in ranges),
    )  # fmt: skip
    return ArenaRun(scores[plan.candidate_rows], rows, [e for e in extents if e is not None], foreign)
