"""The history cache's entries as rows of one arena (grc/serving/common/kv_arena.py, arena_graphs.py), in the fused
model's Ranker on the CPU in float64, the step run eagerly (graphs=False: CUDA graphs need a GPU; the device test is
tests/serving/test_fused_gpu_real.py -k arena).

Every score of a user sent with a user_id equals the fused model's whole path for the same request (no user_id) to
1e-9 relative, through a session of returning users whose histories grow, change and move time buckets, with several
users (and one user twice) per step, in an arena small enough that entries are grown in place, moved and evicted.
After every step the arena's books balance: each held entry owns its extent, no two extents overlap, and the rows
the allocator counts in use are exactly the held entries' capacity (nothing leaked, nothing freed twice)."""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from grc.model.kv_cache import KVLayout
from grc.serving.common import request as rq
from grc.serving.common.arena_graphs import ArenaGraphs
from grc.serving.common.history_step import UserCaches
from grc.serving.common.kv_arena import KVArena
from grc.serving.ranker.dense import GraphStats
from grc.serving.ranker.ranker import Ranker
from grc.spec.schema import Spec
from tests.serving.test_fused_history_cache import EXACT, built, float64_ranker, rel, scores, with_ids
from tests.serving.test_history_cache_real import first_events, user

__all__ = ["built"]  # the module fixture, shared


def arena_ranker(
    spec: Spec, model_dir: Path, rows: int, max_users: int = 4, gap: int = 0
) -> tuple[Ranker, ArenaGraphs]:
    """A float64 cached Ranker whose store keeps its entries in an arena of ``rows`` rows (granule 8), new extents
    placed ``gap`` rows after the held ones while a run holds that (RowArena)."""
    ranker = float64_ranker(spec, model_dir, {"enabled": True})
    assert ranker.history is not None
    caches, dense = ranker.history.caches, ranker.history.dense
    scratch = ArenaGraphs.scratch_rows(dense, max_users)
    h = spec.model.hstu
    kv = KVLayout(h.num_layers, h.num_heads, h.head_qk, h.head_v)
    arena = KVArena(kv, rows, scratch, torch.float64, torch.device("cpu"), granule=8, gap=gap)
    caches.cache.budget = rows * arena.row_bytes  # the store evicts before the arena runs out, mostly
    graphs = ArenaGraphs(dense, "pytorch", GraphStats(), max_users, arena, pad=True, graphs=False)  # padded as on GPUs
    caches.use_arena(graphs)
    return ranker, graphs


def books_balance(caches: UserCaches) -> None:
    assert caches.arena is not None
    arena = caches.arena.arena
    held = caches.cache.held()
    extents = sorted((e.lease.extent.start, e.lease.extent.end) for e in held if e.lease is not None)
    assert all(e.lease is not None and e.lease.owner is e for e in held), "an entry that does not own its rows"
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(extents)), f"overlapping extents {extents}"
    assert arena.alloc.used_rows() == sum(b - a for a, b in extents), "rows in use that no entry owns"
    assert caches.cache.stats().bytes == arena.alloc.used_rows() * arena.row_bytes
    for e in held:  # the entry's rows are the arena's rows
        assert e.lease is not None and e.kv.rows.data_ptr() == arena.rows[e.lease.extent.start].data_ptr()
        # its host stamps (built in numpy by ArenaGraphs._grown): the profile rows at its request time, then its events'
        want = np.concatenate([np.full(len(e.profile_ids), e.stamped_at), e.events[:, -1]])
        assert np.array_equal(e.kv.timestamps.numpy(), want), "an entry's host stamps are not its events'"
        a = e.lease.extent.start  # and the arena's stamps of its rows, where the kernels read them
        assert np.array_equal(arena.stamps[a : a + len(want)].cpu().numpy(), want)


def later(arrays: dict[str, np.ndarray], seconds: int) -> dict[str, np.ndarray]:
    return {**arrays, rq.REQUEST_TIME: arrays[rq.REQUEST_TIME] + seconds}


def session(ranker: Ranker, spec: Spec, seed: int, steps: int, tol: float) -> None:
    """Returning users (1-3 per step, one user twice allowed) whose histories grow, change and move time buckets:
    every cached score within ``tol`` of the whole path's for the same request, the books balanced after each."""
    rng = np.random.default_rng(seed)
    assert ranker.history is not None
    caches = ranker.history.caches
    profile = len(spec.model.profile)
    longest = spec.model.hstu.max_seq_len - profile - 8
    people = {uid: user(spec, longest, int(rng.integers(1, 7)), seed + uid) for uid in range(1, 8)}
    seen = dict.fromkeys(people, 0)  # history events each user has shown so far
    shift = dict.fromkeys(people, 0)  # seconds its request time moved (time buckets: partial reuse)
    table = rq.history_input(spec.model.history[0])
    for step in range(steps):
        ids = [int(i) for i in rng.choice(list(people), size=int(rng.integers(1, 4)))]  # repeats allowed
        requests = []
        for uid in ids:
            seen[uid] = min(longest, max(seen[uid], 4) + int(rng.integers(0, 12)))
            if rng.random() < 0.15:
                shift[uid] += int(rng.integers(1, 40)) * 3600  # a later visit: the newest events' buckets move
            if rng.random() < 0.1:  # the history changed: a miss that replaces the entry
                ids_ = people[uid][table].copy()
                ids_[0, 0] = (ids_[0, 0] + 1) % spec.model.tables[spec.model.history[0]].vocab_size
                people[uid] = {**people[uid], table: ids_}
            requests.append(later(first_events(spec, people[uid], seen[uid]), shift[uid]))
        got = scores(ranker, *[with_ids(r, uid) for r, uid in zip(requests, ids, strict=True)])
        whole = scores(ranker, *requests)
        for g, w in zip(got, whole, strict=True):
            assert rel(g, w) <= tol, f"seed={seed} step {step} users {ids}: {rel(g, w):.2e}"
        books_balance(caches)


@pytest.mark.parametrize("gap", [0, 24])
@pytest.mark.parametrize("seqs", [4, 2])
def test_a_session_in_a_small_arena_scores_exactly_and_keeps_its_books(
    built: tuple[Spec, Path], seqs: int, gap: int
) -> None:
    """``seqs`` max_seq_len of rows: 4, entries grown in place, moved and evicted; 2, steps split too, and now and
    then a user the arena cannot place even alone (the pins of the users after it in the way) scored unkept; new
    extents packed (gap 0) or placed past a growth gap while a run holds it."""
    spec, model_dir = built
    seed = secrets.randbits(31)
    ranker, graphs = arena_ranker(spec, model_dir, rows=seqs * spec.model.hstu.max_seq_len, gap=gap)
    session(ranker, spec, seed, 30, EXACT)
    assert ranker.history is not None
    stats, arena = ranker.history.caches.cache.stats(), graphs.arena
    assert stats.hits > 0 and stats.misses > 0 and stats.evictions > 0, (seed, stats)
    assert arena.in_place > 0 and arena.moves > 0, (seed, arena.in_place, arena.moves)


def test_a_step_the_arena_cannot_place_whole_runs_in_halves(built: tuple[Spec, Path]) -> None:
    """Three long new users in one step, an arena of two users' rows: the step splits, the scores stay exact, the
    store keeps what fits."""
    spec, model_dir = built
    seed = secrets.randbits(31)
    n = spec.model.hstu.max_seq_len
    ranker, graphs = arena_ranker(spec, model_dir, rows=2 * n)
    assert ranker.history is not None
    requests = [user(spec, n - len(spec.model.profile) - 6, 5, seed + i) for i in range(3)]
    got = scores(ranker, *[with_ids(r, i) for i, r in enumerate(requests)])
    for g, w in zip(got, scores(ranker, *requests), strict=True):
        assert rel(g, w) <= EXACT, f"seed={seed}"
    assert graphs.splits >= 1
    books_balance(ranker.history.caches)


def test_a_step_that_fails_lets_its_users_entries_go(built: tuple[Spec, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A hit's step grows the entry in place (rewriting rows the held entry claims when only a prefix is reused):
    a step that raises must leave neither that entry nor its rows behind."""
    spec, model_dir = built
    ranker, _ = arena_ranker(spec, model_dir, rows=4 * spec.model.hstu.max_seq_len)
    assert ranker.history is not None
    caches = ranker.history.caches
    full, other = user(spec, 40, 3, 5), user(spec, 30, 2, 6)
    scores(ranker, with_ids(first_events(spec, full, 30), 1), with_ids(other, 2))
    dense = ranker.history.dense

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a device fault")

    monkeypatch.setattr(dense, "run_scattered", broken)
    with pytest.raises(RuntimeError, match="a device fault"):
        scores(ranker, with_ids(full, 1))
    monkeypatch.undo()
    assert [e.events.shape[0] for e in caches.cache.held()] == [30], "user 2 held, user 1 let go"
    books_balance(caches)
    (again,) = scores(ranker, with_ids(full, 1))  # a miss now, exact
    assert rel(again, scores(ranker, full)[0]) <= EXACT


def test_a_step_whose_tokens_fail_gives_back_what_it_placed(
    built: tuple[Spec, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ranker places and plans the arena's step before computing its tokens (ArenaGraphs.prepare): when the
    lookups or the projector raise, the extents it claimed and allocated go back, its pins go, and its users' entries
    with them (a hit's was claimed, grown in place); the next visit is a miss, exact."""
    spec, model_dir = built
    ranker, graphs = arena_ranker(spec, model_dir, rows=4 * spec.model.hstu.max_seq_len)
    assert ranker.history is not None
    caches = ranker.history.caches
    full, other, new = user(spec, 40, 3, 5), user(spec, 30, 2, 6), user(spec, 20, 2, 7)
    scores(ranker, with_ids(first_events(spec, full, 30), 1), with_ids(other, 2))
    used = graphs.arena.alloc.used_rows()

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("a lookup fault")

    monkeypatch.setattr(ranker, "_tokens", broken)
    with pytest.raises(RuntimeError, match="a lookup fault"):
        scores(ranker, with_ids(full, 1), with_ids(new, 3))  # a hit grown in place and a new user, placed first
    monkeypatch.undo()
    assert [e.events.shape[0] for e in caches.cache.held()] == [30], "user 2 held, users 1 and 3 let go"
    assert graphs.arena.alloc.used_rows() < used, "user 1's rows not given back"
    books_balance(caches)  # a pin left behind would keep released rows counted
    (again,) = scores(ranker, with_ids(full, 1))
    assert rel(again, scores(ranker, full)[0]) <= EXACT


def test_a_step_no_rung_holds_runs_eagerly_at_its_exact_shape(built: tuple[Spec, Path]) -> None:
    spec, model_dir = built
    n = spec.model.hstu.max_seq_len
    ranker, graphs = arena_ranker(spec, model_dir, rows=8 * n, max_users=1)
    assert ranker.history is not None
    requests = [user(spec, n - len(spec.model.profile) - 6, 5, 40 + i) for i in range(2)]  # past a 1-user ladder
    got = scores(ranker, *[with_ids(r, i) for i, r in enumerate(requests)])
    for g, w in zip(got, scores(ranker, *requests), strict=True):
        assert rel(g, w) <= EXACT
    assert graphs.stats.graph_misses == 1 and not graphs.steps
    books_balance(ranker.history.caches)


# (dense dtype, spec overrides, bound on the relative score difference cached vs whole, the step's group norm as the
# UVQK GEMM's prologue): float32 at mtgr-tiny's head dim 16 (the Triton attention kernel), bfloat16 at head dim 128
# (on sm90 the Gluon kernel, inside the graphs), with the norm apart (the default) and as the prologue
D128 = {"model.hstu.attention_dim": 256, "model.hstu.linear_dim": 256}
GPU_CASES: dict[str, tuple[str, dict[str, Any], float, bool]] = {
    "float32": ("float32", {}, 1e-4, False),
    "bfloat16-d128": ("bfloat16", D128, 3e-2, False),
    "bfloat16-d128-step-prologue": ("bfloat16", D128, 3e-2, True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_the_served_arena_step_on_a_gpu(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused model on cuda:0 as a server loads it (pytorch_kernels, CUDA graphs, store: arena by default): the
    arena allocated at load and said, the session above within the case's bound of the whole (bucketed, graphed)
    path, every cached step replayed from a graph (its UVQK GEMM writing the new K/V rows into the arena), and no
    capture on a request's path compiling or tuning a kernel (the warm-up at load ran the arena step's variants)."""
    from grc.model import hstu
    from grc.serving.triton.fused_bundle import fused_config
    from grc.spec.loader import load_spec
    from tests.conftest import TEST_SPECS, run_build, write_spec

    dtype, model, tol, step_prologue = GPU_CASES[case]
    monkeypatch.setitem(hstu.NORM_PROLOGUE, "uvqk_step", step_prologue)
    over: dict[str, Any] = {**model, "bundles.triton": {"pipeline": "fused", "backend": "pytorch_kernels",
                                       "history_cache": {"enabled": True, "budget_mb": 8}}}  # fmt: skip
    path = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", over)
    run_build(path, only=["weights"])
    spec = load_spec(path).spec
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "weights").symlink_to(tmp_path / "artifacts" / "mtgr-tiny" / "weights")
    msg = fused_config(spec, "m", "pytorch_kernels", None, 0)
    params = {k: v.string_value for k, v in msg.parameters.items()} | {"dtype": dtype}
    said: list[str] = []
    ranker = Ranker.from_model_dir(model_dir, "cuda:0", params, log=said.append)
    assert ranker.history is not None and ranker.history.caches.arena is not None, said
    assert any("arena on cuda" in m for m in said), said
    seed = secrets.randbits(31)
    session(ranker, spec, seed, 24, tol)
    graphs = ranker.history.caches.arena
    stats = graphs.stats
    assert stats.graph_hits > 0 and stats.graph_misses == 0, (seed, stats)
    captures = [c for c in graphs.capture_log if c["compiles"] or c["tunings"]]
    assert stats.capture_compiles == 0 and stats.capture_tunings == 0, (seed, captures)
    assert graphs.arena.in_place > 0, seed


def test_what_score_refuses_the_arena_refuses_alike(built: tuple[Spec, Path]) -> None:
    """Past max_seq_len the step's key bound would not hold a user's keys (the kernel would read too few): refused,
    as GRDense.score refuses it, and so is a user without candidates; nothing allocated either way."""
    from grc.serving.common.arena_graphs import ArenaUser

    spec, model_dir = built
    _, graphs = arena_ranker(spec, model_dir, rows=4 * spec.model.hstu.max_seq_len)
    n, d = spec.model.hstu.max_seq_len + 1, spec.model.d_model
    tokens, stamps = torch.zeros(n, d, dtype=torch.float64), np.zeros(n, np.int64)
    for rows, candidates in ((n, 3), (8, 0)):
        user = ArenaUser(None, None, True, 0)
        with pytest.raises(ValueError, match=r"max_seq_len .* at least one candidate"):
            graphs.score([user], tokens[:rows], [0, rows], [candidates], stamps[:rows], lambda *_: None)
    assert graphs.arena.alloc.used_rows() == 0


def test_one_user_twice_across_a_split_step_reads_the_rows_it_reuses(built: tuple[Spec, Path]) -> None:
    """A user twice in one step, split around a long new user: the first visit (a later request time: only a prefix
    reused) runs in the first part; had it grown the entry in place, its new rows would have overwritten rows the
    second visit (the whole entry reused) copies after that part ran. Exact, the books balanced."""
    spec, model_dir = built
    seed = secrets.randbits(31)
    n = spec.model.hstu.max_seq_len
    ranker, graphs = arena_ranker(spec, model_dir, rows=2 * n)
    full, other = user(spec, 60, 4, seed), user(spec, n - len(spec.model.profile) - 6, 5, seed + 1)
    scores(ranker, with_ids(first_events(spec, full, 50), 1))  # the entry: 50 events at the request time
    visits = [with_ids(later(full, 40 * 3600), 1), with_ids(other, 2), with_ids(full, 1)]
    got = scores(ranker, *visits)
    whole = scores(ranker, *[{k: v for k, v in r.items() if k != "user_id"} for r in visits])
    for i, (g, w) in enumerate(zip(got, whole, strict=True)):
        assert rel(g, w) <= EXACT, f"seed={seed} visit {i}: {rel(g, w):.2e}"
    assert graphs.splits >= 1, "the step was placed whole: the case this test is for did not happen"
    assert ranker.history is not None
    books_balance(ranker.history.caches)
