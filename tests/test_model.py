"""The PyTorch reference: jagged == padded, candidate independence, the mask, group norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grc.model.attention import abs_time_gap, candidate_mask, time_bucket
from grc.model.gr import Batch, GRModel
from grc.model.jagged import lengths_of, to_jagged, to_padded
from grc.model.params import all_params, init_tensor
from grc.model.sample import random_batch
from grc.model.tables import Tables
from grc.spec.loader import load_spec
from tests.conftest import SPECS, TEST_SPECS


def _model(spec_path, seed: int):  # type: ignore[no-untyped-def]
    cfg = load_spec(spec_path).spec.model
    model = GRModel(cfg)
    params = [p for p in all_params(cfg, 1 << 20) if p.kind == "dense"]
    model.load_state_dict({p.name: init_tensor(p, seed, 0.02, torch.float64) for p in params})
    model = model.double().eval()
    gen = torch.Generator().manual_seed(seed)
    tables = Tables.from_tensors(
        {
            t: torch.randn(c.vocab_size, cfg.table_dim(t), generator=gen, dtype=torch.float64)
            for t, c in cfg.tables.items()
        },
        block_rows=100,  # several blocks per table, so lookups cross block boundaries
    )
    return cfg, model, tables


@pytest.fixture(params=[SPECS / "hstu-tiny.yaml", TEST_SPECS / "mtgr-tiny.yaml"], ids=["hstu", "mtgr"])
def setup(request):  # type: ignore[no-untyped-def]
    seed = int(torch.randint(0, 1 << 30, ()).item())  # fresh inputs every run
    return (*_model(request.param, seed), torch.Generator().manual_seed(seed))


def test_jagged_equals_padded(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    batch = random_batch(cfg, 5, 30, 7, gen)
    with torch.no_grad():
        tok = model.projector(batch, tables)
        lengths = lengths_of(tok.offsets)
        n = int(lengths.max()) + 3  # extra padding must not matter
        padded = model.dense.forward_padded(
            to_padded(tok.tokens, tok.offsets, n),
            lengths,
            tok.num_candidates,
            to_padded(tok.timestamps, tok.offsets, n),
        )
        jagged = model.dense.forward_jagged(tok.tokens, tok.offsets, tok.num_candidates, tok.timestamps)
    assert jagged.abs().max() > 0.01
    torch.testing.assert_close(to_jagged(padded, tok.offsets), jagged, rtol=1e-12, atol=1e-12)


def _user(batch: Batch, b: int, keep: list[int] | None = None) -> Batch:
    """User b alone, optionally with only the candidates ``keep`` (in that order)."""
    ho, co = batch.history_offsets, batch.candidate_offsets
    cand = torch.arange(int(co[b]), int(co[b + 1]))
    cand = cand[keep] if keep is not None else cand
    hist = torch.arange(int(ho[b]), int(ho[b + 1]))
    return Batch(
        profile=batch.profile[b : b + 1],
        history={k: v[hist] for k, v in batch.history.items()},
        history_time=batch.history_time[hist],
        history_offsets=torch.tensor([0, hist.numel()]),
        candidates={k: v[cand] for k, v in batch.candidates.items()},
        candidate_offsets=torch.tensor([0, cand.numel()]),
        cross=batch.cross[cand],
        request_time=batch.request_time[b : b + 1],
    )


def test_candidate_scores_do_not_depend_on_other_candidates_or_users(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    batch = random_batch(cfg, 3, 25, 9, gen)
    with torch.no_grad():
        together = model(batch, tables)
        first_user = model(_user(batch, 0), tables)
        n0 = int(batch.candidate_offsets[1])
        torch.testing.assert_close(together[:n0], first_user, rtol=1e-12, atol=1e-12)  # other users absent
        order = torch.randperm(n0, generator=gen).tolist()
        shuffled = model(_user(batch, 0, order), tables)
        torch.testing.assert_close(shuffled, first_user[order], rtol=1e-12, atol=1e-12)  # permuted
        alone = model(_user(batch, 0, [order[0]]), tables)
        torch.testing.assert_close(alone, first_user[order[:1]], rtol=1e-12, atol=1e-12)  # the others removed
    assert first_user.std() > 1e-4  # the scores really vary across candidates


def test_history_does_change_scores(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen = setup
    batch = random_batch(cfg, 1, 10, 3, gen)
    with torch.no_grad():
        before = model(batch, tables)
        batch.history[cfg.history[0]][0] = (batch.history[cfg.history[0]][0] + 1) % cfg.tables[
            cfg.history[0]
        ].vocab_size
        after = model(batch, tables)
    assert (before - after).abs().max() > 1e-9


def test_mask_matches_the_definition() -> None:
    lengths, nc = torch.tensor([7, 4]), torch.tensor([3, 0])
    for causal in (True, False):
        mask = candidate_mask(lengths, nc, 8, causal)
        for b in range(2):
            n_ctx = int(lengths[b] - nc[b])
            for i in range(8):
                for j in range(8):
                    if i >= lengths[b] or j >= lengths[b]:
                        want = False
                    elif i < n_ctx:
                        want = j <= i if causal else j < n_ctx
                    else:
                        want = j < n_ctx or j == i
                    assert bool(mask[b, i, j]) == want, (causal, b, i, j)


def test_time_bucket_is_exact_floor_log2() -> None:
    dt = torch.tensor([0, 1, 2, 3, 7, 8, 1023, 1024, (1 << 25) - 2, (1 << 25) - 1, (1 << 40)], dtype=torch.int64)
    want = [min((int(d) + 1).bit_length() - 1, 29) for d in dt]
    assert time_bucket(dt, 30).tolist() == want
    assert time_bucket(dt.numpy(), 30).tolist() == want  # the host form (the serving store's check)


def test_the_host_time_gap_and_bucket_equal_the_model_ones() -> None:
    """numpy abs_time_gap / time_bucket (grc/serving/common/history_cache.py's host check) vs the torch ones
    the model runs, on random int64 stamps with the extremes and every power-of-two edge."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    edges = [(1 << k) + d for k in range(63) for d in (-2, -1, 0)]
    t = torch.tensor([*edges, -(1 << 63), (1 << 63) - 1, 0, -1], dtype=torch.int64)
    t = torch.cat([t, torch.randint(-(1 << 62), 1 << 62, (500,), generator=gen)])
    u = t[torch.randperm(t.numel(), generator=gen)]
    for buckets in (2, 31, 32, 64, 100):
        gap = abs_time_gap(t, u)
        assert np.array_equal(abs_time_gap(t.numpy(), u.numpy()), gap.numpy())
        assert np.array_equal(time_bucket(gap.numpy(), buckets), time_bucket(gap, buckets).numpy()), buckets


def test_group_norm_separates_token_kinds() -> None:
    cfg, model, tables = _model(TEST_SPECS / "mtgr-tiny.yaml", 5)
    gen = torch.Generator().manual_seed(5)
    batch = random_batch(cfg, 2, 12, 4, gen)
    with torch.no_grad():
        before = model(batch, tables)
        model.dense.final_norm.weight[2] += 0.5  # the candidate group's scale only
        after = model(batch, tables)
        model.dense.final_norm.weight[2] -= 0.5
        model.dense.final_norm.weight[1] += 0.5  # the history group's final norm cannot touch candidate scores
        history_only = model(batch, tables)
    assert (before - after).abs().max() > 1e-6
    torch.testing.assert_close(history_only, before, rtol=0, atol=0)


def test_out_of_range_ids_are_errors() -> None:
    tables = Tables.from_tensors({"item": torch.zeros(10, 2)}, 4)
    with pytest.raises(ValueError, match="table item: id 10 is outside"):
        tables.lookup("item", torch.tensor([1, 10]))
