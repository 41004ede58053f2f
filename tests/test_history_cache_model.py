"""The history cache's model entry points: prefill + score == the full forward, float64 on CPU.

Fresh random users every run (profile tokens and group norms in mtgr-tiny), split at random into
cached tokens and a delta; both attention impls (``triton`` runs the reference off CUDA).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from grc.model.gr import Batch, GRModel, Tokens
from grc.model.kv_cache import HistoryCacheUnsupported, UserKV
from grc.model.sample import random_batch
from grc.model.tables import Tables
from grc.spec.schema import ModelConfig
from tests.conftest import SPECS, TEST_SPECS
from tests.test_model import _model

RTOL = 1e-9


@pytest.fixture(params=[SPECS / "hstu-tiny.yaml", TEST_SPECS / "mtgr-tiny.yaml"], ids=["hstu", "mtgr"])
def setup(request):  # type: ignore[no-untyped-def]
    seed = int(torch.randint(0, 1 << 30, ()).item())
    return (*_model(request.param, seed), torch.Generator().manual_seed(seed))


def project(model: GRModel, tables: Tables, batch: Batch) -> Tokens:
    with torch.no_grad():
        return model.projector(batch, tables)


def full_scores(model: GRModel, tok: Tokens) -> torch.Tensor:
    """Candidate scores [c, tasks] of the plain forward (one user)."""
    with torch.no_grad():
        scores = model.dense.forward_jagged(tok.tokens, tok.offsets, tok.num_candidates, tok.timestamps)
    return scores[-int(tok.num_candidates[0]) :]


def cached_scores(model: GRModel, tok: Tokens, cached: int, now: int, impl: str) -> tuple[torch.Tensor, UserKV, UserKV]:
    """Prefill the first ``cached`` tokens, score the rest: (scores, prefilled cache, extended cache)."""
    profile = len(model.cfg.profile)
    with torch.no_grad():
        cache = model.dense.prefill(tok.tokens[:cached], tok.timestamps[:cached], profile, now, impl)
        rest = tok.tokens.shape[0] - cached
        scores, (grown,) = model.dense.score(
            [cache],
            tok.tokens[cached:],
            torch.tensor([0, rest]),
            tok.num_candidates,
            tok.timestamps[cached:],
            [now],
            impl,
        )
    return scores, cache, grown


def one_user(cfg: ModelConfig, history: int, candidates: int, gen: torch.Generator) -> Batch:
    return random_batch(cfg, 1, history, candidates, gen)


@pytest.mark.parametrize("impl", ["pytorch", "triton"])
def test_prefill_then_score_equals_full_forward(setup, impl: str) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    profile = len(cfg.profile)
    for _ in range(3):
        history = int(torch.randint(2, 40, (1,), generator=gen))
        delta = int(torch.randint(0, history, (1,), generator=gen))  # 0: only candidates are new
        batch = one_user(cfg, history, int(torch.randint(1, cfg.max_candidates + 1, (1,), generator=gen)), gen)
        tok = project(model, tables, batch)
        expected = full_scores(model, tok)
        got, _, grown = cached_scores(model, tok, profile + history - delta, int(batch.request_time[0]), impl)
        assert expected.abs().max() > 0.01
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=0)
        # the extended cache is what a prefill of the whole history gives
        whole = model.dense.prefill(
            tok.tokens[: profile + history],
            tok.timestamps[: profile + history],
            profile,
            int(batch.request_time[0]),
            impl,
        )
        for a, b in zip((*grown.keys, *grown.values), (*whole.keys, *whole.values), strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-15)
        assert torch.equal(grown.timestamps, whole.timestamps)


def test_empty_delta_scores_candidates_only(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    batch = one_user(cfg, 20, 5, gen)
    tok = project(model, tables, batch)
    cached = len(cfg.profile) + 20
    got, cache, grown = cached_scores(model, tok, cached, int(batch.request_time[0]), "pytorch")
    torch.testing.assert_close(got, full_scores(model, tok), rtol=RTOL, atol=0)
    assert grown.length == cache.length == cached  # candidates are never cached


def test_sequence_at_the_length_limit_and_past_it(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    n = cfg.hstu.max_seq_len
    candidates = 4
    history = n - len(cfg.profile) - candidates
    batch = one_user(cfg, history, candidates, gen)
    tok = project(model, tables, batch)
    assert tok.tokens.shape[0] == n
    got, cache, _ = cached_scores(model, tok, n - candidates - 7, int(batch.request_time[0]), "pytorch")
    torch.testing.assert_close(got, full_scores(model, tok), rtol=RTOL, atol=0)
    # one token more than max_seq_len: refused, never silently cut
    longer = torch.cat([tok.tokens[-candidates - 8 :], tok.tokens[-1:]])
    stamps = torch.cat([tok.timestamps[-candidates - 8 :], tok.timestamps[-1:]])
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model.dense.score(
            [cache],
            longer,
            torch.tensor([0, longer.shape[0]]),
            torch.tensor([candidates + 1]),
            stamps,
            [int(batch.request_time[0])],
        )


def test_several_users_in_one_score_call(setup) -> None:  # type: ignore[no-untyped-def]
    from tests.arena_step import users

    _, model, tables, gen = setup
    with torch.no_grad():
        u = users(model, tables, gen)
        scores, _ = model.dense.score(u.caches, u.tokens, u.offsets, u.num_candidates, u.stamps, u.now)
    expected = torch.cat([full_scores(model, t) for t in u.toks])
    torch.testing.assert_close(scores, expected, rtol=RTOL, atol=0)


def test_no_candidates_refused(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    batch = one_user(cfg, 10, 2, gen)
    tok = project(model, tables, batch)
    n = len(cfg.profile) + 10
    cache = model.dense.prefill(tok.tokens[:n], tok.timestamps[:n], len(cfg.profile), int(batch.request_time[0]))
    with pytest.raises(ValueError, match="at least one candidate"):
        model.dense.score(
            [cache],
            tok.tokens[n : n + 0],
            torch.tensor([0, 0]),
            torch.tensor([0]),
            tok.timestamps[n : n + 0],
            [int(batch.request_time[0])],
        )


def test_full_history_mask_refused(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    hstu = cfg.hstu.model_copy(update={"history_mask": "full"})
    full_cfg = cfg.model_copy(update={"hstu": hstu})
    model.dense.cfg = full_cfg
    for layer in model.dense.hstu_layers:
        layer.attention.cfg = hstu
    batch = one_user(cfg, 10, 2, gen)
    tok = project(model, tables, batch)
    with pytest.raises(HistoryCacheUnsupported, match="history_mask full"):
        model.dense.prefill(tok.tokens[:5], tok.timestamps[:5], len(cfg.profile), int(batch.request_time[0]))


def test_a_later_request_reuses_the_cache_only_while_time_buckets_hold(setup) -> None:  # type: ignore[no-untyped-def]
    """Profile tokens carry the request time: the cache of an earlier request is exact at a later
    time exactly when no cached event changes its time bucket; otherwise reusable_at says no, and
    the rows before the first moved event (reusable_rows) still give the full forward's scores."""
    cfg, model, tables, gen = setup
    batch = one_user(cfg, 25, 4, gen)
    then = int(batch.request_time[0])
    tok = project(model, tables, batch)
    cached = len(cfg.profile) + 25
    with torch.no_grad():
        cache = model.dense.prefill(tok.tokens[:cached], tok.timestamps[:cached], len(cfg.profile), then)
    newest = int(batch.history_time.max())
    later_same = then  # by construction valid
    # the first later time where the newest event's bucket moves: 1 + dt reaches the next power of 2
    dt = then - newest
    moved = newest + (1 << (dt + 1).bit_length()) - 1
    assert cache.reusable_at(later_same, cfg.hstu.time_buckets)
    later = dataclasses.replace(batch, request_time=torch.tensor([moved]))
    tok_later = project(model, tables, later)

    def score_later(kv: Any, rows: int, reuse_checked: bool = False) -> tuple[torch.Tensor, list[Any]]:
        """The later request's tokens after the first ``rows`` against ``kv``."""
        with torch.no_grad():
            return model.dense.score(
                [kv],
                tok_later.tokens[rows:],
                torch.tensor([0, tok_later.tokens.shape[0] - rows]),
                tok_later.num_candidates,
                tok_later.timestamps[rows:],
                [moved],
                reuse_checked=reuse_checked,
            )

    if cfg.profile:
        assert not cache.reusable_at(moved, cfg.hstu.time_buckets)
        with pytest.raises(ValueError, match="time buckets"):
            score_later(cache, cached)
        # reuse_checked: the caller vouches (the served store checks its host events): no check, and a
        # cache that was not reusable gives other scores than the full forward (why the check exists)
        vouched, _ = score_later(cache, cached, reuse_checked=True)
        assert not torch.allclose(vouched, full_scores(model, tok_later), rtol=1e-9, atol=0)
        fresh = model.dense.prefill(tok_later.tokens[:cached], tok_later.timestamps[:cached], len(cfg.profile), moved)
        assert not torch.allclose(fresh.keys[-1], cache.keys[-1], rtol=1e-6, atol=0)  # the check matters
        # the rows before the first moved event are still exact: reuse them, recompute the rest
        rows = cache.reusable_rows(moved, cfg.hstu.time_buckets)
        assert len(cfg.profile) <= rows < cached
        scores, (grown,) = score_later(cache.prefix(rows), rows)
        torch.testing.assert_close(scores, full_scores(model, tok_later), rtol=RTOL, atol=0)
        for a, b in zip(grown.keys, fresh.keys, strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-15)
    else:  # no profile tokens: nothing cached depends on the request time
        assert cache.reusable_at(moved, cfg.hstu.time_buckets)
        scores, _ = score_later(cache, cached)
        torch.testing.assert_close(scores, full_scores(model, tok_later), rtol=RTOL, atol=0)


def test_a_planned_step_never_reads_device_values(setup) -> None:  # type: ignore[no-untyped-def]
    """run_plan on fake tensors (shapes, no data): any host read of a device value (.item(), .tolist(),
    a boolean mask, nonzero) raises there. That is what a CUDA graph capture of the step needs. The
    kernel path only (impl "triton": the attention op's fake impl); the PyTorch reference loops over
    users reading their offsets, by design."""
    impl = "triton"
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg, model, tables, gen = setup
    profile = len(cfg.profile)
    users = [one_user(cfg, h, c, gen) for h, c in ((12, 3), (7, 2))]
    toks = [project(model, tables, b) for b in users]
    cached = [profile + 9, profile + 7]
    now = [int(b.request_time[0]) for b in users]
    with torch.no_grad():
        caches = [
            model.dense.prefill(t.tokens[:k], t.timestamps[:k], profile, n)
            for t, k, n in zip(toks, cached, now, strict=True)
        ]
        rest = [t.tokens.shape[0] - k for t, k in zip(toks, cached, strict=True)]
        offsets = torch.tensor([0, rest[0], rest[0] + rest[1]])
        tokens = torch.cat([t.tokens[k:] for t, k in zip(toks, cached, strict=True)])
        stamps = torch.cat([t.timestamps[k:] for t, k in zip(toks, cached, strict=True)])
        nc = torch.cat([t.num_candidates for t in toks])
        plan = model.dense.plan_score(caches, offsets, nc, stamps, now)
        expected, _, _ = model.dense.run_plan(plan, caches, tokens, impl)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_plan = dataclasses.replace(
            plan,
            **{
                f.name: mode.from_tensor(getattr(plan, f.name))
                for f in dataclasses.fields(plan)
                if isinstance(getattr(plan, f.name), torch.Tensor)
            },
        )
        fake_caches = [
            dataclasses.replace(
                c,
                rows=mode.from_tensor(c.rows),
                timestamps=mode.from_tensor(c.timestamps),
            )
            for c in caches
        ]
        with mode:
            scores, new_k, _ = model.dense.run_plan(fake_plan, fake_caches, mode.from_tensor(tokens), impl)
    assert scores.shape == expected.shape == (int(nc.sum()), len(cfg.tasks))
    assert new_k[0].shape[0] == tokens.shape[0]


@pytest.mark.parametrize("impl", ["pytorch", "triton"])
def test_the_step_over_an_arena_equals_score(setup, impl: str) -> None:  # type: ignore[no-untyped-def]
    """The device arena's step (session 18: the model side; the store is not wired yet, tests/arena_step.py lays
    it out): the candidates' scores equal ``GRDense.score``'s, and the arena rows of each user's cached + new
    events are its grown entry (float64; NaN outside the ranges would poison any stray read). The same step
    through the Triton kernel: tests/kernels/test_interpreter.py::test_the_step_over_an_arena_through_the_kernel."""
    from tests.arena_step import score_over_arena, users

    _, model, tables, gen = setup
    with torch.no_grad():
        u = users(model, tables, gen)
        expected, grown = model.dense.score(u.caches, u.tokens, u.offsets, u.num_candidates, u.stamps, u.now, impl)
        run = score_over_arena(model.dense, u, impl)
    torch.testing.assert_close(run.scores, expected, rtol=RTOL, atol=0)
    for extent, entry in zip(run.extents, grown, strict=True):  # cached rows + the new events, in place
        torch.testing.assert_close(run.rows[extent.start : extent.start + entry.length], entry.rows, rtol=RTOL, atol=0)
    assert torch.isnan(run.rows[run.foreign.start : run.foreign.end]).all()  # nothing written outside the extents
