"""grc.serving.common.arena_graphs.arena_plan: the arena step's layout, planned into the kept step's host buffer.

The buffer holds the previous step's layout of the same shape (ArenaGraphs._host_buffer: no fresh array per step), so
every field must be written whole: a plan into a buffer of garbage equals the plan into zeros, field by field, for
random steps (hits and misses, padded to a rung and at their exact shape), and each field says what the step reads."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from grc.serving.common.arena_graphs import ArenaLayout, ArenaShape, arena_plan
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS


@pytest.fixture(scope="module")
def dense() -> Any:
    """What arena_plan reads of the dense model: its config (mtgr-tiny: profile tokens, so restamps)."""
    return SimpleNamespace(cfg=load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model)


def random_step(rng: random.Random, max_seq_len: int) -> tuple[list[tuple[int, int, int, int, int]], list[int]]:
    """1-6 users (cached rows, new rows, candidates, extent start, request time) on disjoint extents, and bounds."""
    users, at = [], 0
    for _ in range(rng.randint(1, 6)):
        past = rng.choice([0, rng.randint(2, max_seq_len // 2)])  # a miss, or a hit with its profile rows cached
        new = rng.randint(1, max_seq_len - past)
        users.append((past, new, rng.randint(1, new), at, 1_750_000_000 + rng.randint(0, 10**6)))
        at += past + new + rng.randint(0, 64)
    return users, [0, *itertools.accumulate(n for _, n, *_ in users)]


def filled(shape: ArenaShape, value: int) -> np.ndarray:
    """A host buffer for ``shape`` holding ``value`` everywhere (an earlier step's layout, as far as a plan knows)."""
    return np.full(shape.length, value, np.int64)


def fields(layout: ArenaLayout) -> dict[str, np.ndarray]:
    return {name: layout.packed[a:b] for name, (a, b) in layout.shape.spans.items()}


@pytest.mark.parametrize("padded", [True, False])
def test_every_field_is_written_whole(dense: Any, padded: bool) -> None:
    seed = random.randrange(1 << 30)
    rng, h = random.Random(seed), dense.cfg.hstu
    profile = len(dense.cfg.profile)
    given: dict[ArenaShape, np.ndarray] = {}
    for _ in range(50):
        users, bounds = random_step(rng, h.max_seq_len)
        stamps = np.array([rng.randint(1, 1 << 40) for _ in range(bounds[-1])], np.int64)
        longest = max(p + n for p, n, *_ in users)
        rows, keys = (bounds[-1] + rng.randint(0, 300), h.max_seq_len) if padded else (bounds[-1], longest)
        scratch = (10_000, 10_000 + rows + 1)
        clean = arena_plan(dense, users, bounds, stamps, rows, keys, scratch, lambda s: filled(s, 0))
        dirty = arena_plan(
            dense, users, bounds, stamps, rows, keys, scratch, lambda s: given.setdefault(s, filled(s, -7))
        )
        assert clean is not None and dirty is not None
        assert dirty.packed is given.pop(dirty.shape), "the plan is not written into the buffer given"
        for name, want in fields(clean).items():
            assert np.array_equal(fields(dirty)[name], want), f"seed={seed}: {name} is not written whole"
        f, real = fields(clean), len(users)
        q = f["q_offsets"]
        assert q[0] == 0 and q[real] == bounds[-1] and q[-1] == rows
        picked = f["candidate_rows"][: clean.candidates]
        assert clean.candidates == sum(c for _, _, c, *_ in users)  # the real users' candidates only
        assert np.array_equal(picked, np.flatnonzero(f["is_candidate"]))
        assert not f["candidate_rows"][clean.candidates :].any() and not f["stamp_val"][bounds[-1] : rows].any()
        restamp_at = f["stamp_at"][rows:].reshape(-1, profile)
        restamp_val = f["stamp_val"][rows:].reshape(-1, profile)
        for (p, _, _, start, now), at, val in zip(users, restamp_at, restamp_val, strict=False):
            cached = np.arange(profile) < p  # a hit's cached profile rows take its request time
            assert np.array_equal(at, np.where(cached, start + np.arange(profile), scratch[1] - 1))
            assert np.array_equal(val, np.where(cached, now, 0))
        assert (restamp_at[real:] == scratch[1] - 1).all() and not restamp_val[real:].any()
