"""The history cache's graph-shaped score step (grc/serving/common/score_graphs.py) on the CPU: the padded
layout, and its scores and grown entries against ``GRDense.score`` in float64 (run eagerly: CUDA graphs
themselves need a GPU, tests/serving/test_fused_gpu_real.py and the device bench replay them)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from grc.model.gr import GRModel
from grc.model.kv_cache import KVLayout, UserKV
from grc.model.sample import random_batch
from grc.serving.common.score_graphs import ScoreGraphs, pad_users, plan
from grc.serving.ranker.buckets import ladder
from grc.serving.ranker.dense import GraphStats
from kernels.hstu_attention import seq_bucket, tuning_buckets
from tests.conftest import SPECS, TEST_SPECS
from tests.test_model import _model

RTOL = 1e-9


@pytest.fixture(params=[SPECS / "hstu-tiny.yaml", TEST_SPECS / "mtgr-tiny.yaml"], ids=["hstu", "mtgr"])
def setup(request):  # type: ignore[no-untyped-def]
    seed = int(torch.randint(0, 1 << 30, ()).item())
    return (*_model(request.param, seed), torch.Generator().manual_seed(seed), seed)


def visits(model: GRModel, tables, gen: torch.Generator, shapes: list[tuple[int, int, int]]):  # type: ignore[no-untyped-def]
    """Per (history, candidates, new history events) a user: its cache (empty when every event is new: a
    miss), its new tokens and stamps, candidates and request time."""
    cfg, profile = model.cfg, len(model.cfg.profile)
    out = []
    for history, candidates, delta in shapes:
        batch = random_batch(cfg, 1, history, candidates, gen)
        with torch.no_grad():
            tok = model.projector(batch, tables)
        now = int(batch.request_time[0])
        cached = 0 if delta == history else profile + history - delta
        cache = (
            model.dense.prefill(tok.tokens[:cached], tok.timestamps[:cached], profile, now)
            if cached
            else model.dense.empty_cache(profile, tok.tokens)
        )
        out.append((cache, tok.tokens[cached:], tok.timestamps[cached:], candidates, now))
    return out


def score(step, users, impl: str = "pytorch"):  # type: ignore[no-untyped-def]
    sizes = [t.shape[0] for _, t, _, _, _ in users]
    with torch.no_grad():
        return step(
            [u[0] for u in users],
            torch.cat([u[1] for u in users]),
            torch.tensor([0, *itertools.accumulate(sizes)]),
            torch.tensor([u[3] for u in users]),
            torch.cat([u[2] for u in users]),
            [u[4] for u in users],
            impl,
            reuse_checked=True,
        )


def assert_same_caches(got: list[UserKV], expected: list[UserKV]) -> None:
    for a, b in zip(got, expected, strict=True):
        assert a.length == b.length and a.profile == b.profile
        assert torch.equal(a.timestamps, b.timestamps)
        for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values), strict=True):
            torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("impl", ["pytorch", "triton"])
def test_padded_step_scores_and_grows_entries_like_the_model(setup, impl: str) -> None:  # type: ignore[no-untyped-def]
    """Hits (with and without new events) and a miss in one step, then other users in the same shapes: the
    buffers keep the earlier step's values in their padding, which must not reach a real user. impl "triton"
    (fused GEMMs and heads: here their PyTorch twins, the CPU having no GPU) against the unfused model."""
    _, model, tables, gen, seed = setup
    stats = GraphStats()
    graphs = ScoreGraphs(model.dense, impl, stats, max_users=4, graphs=False)
    assert graphs.fuse == (impl == "triton")
    first = visits(model, tables, gen, [(30, 3, 0), (12, 5, 12), (20, 2, 4)])
    second = visits(model, tables, gen, [(25, 4, 2), (9, 6, 9), (31, 1, 0)])
    shapes = []
    for users in (first, second, first[::-1]):
        expected, expected_kv = score(model.dense.score, users)
        got, got_kv = score(graphs.score, users, impl)
        assert expected.abs().max() > 0.01
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=0, msg=f"seed {seed}")
        assert_same_caches(got_kv, expected_kv)
        shapes.append(next(reversed(graphs.steps)))
    assert stats.padded_tokens > 0 and stats.graph_misses == 0
    assert len(set(shapes)) < len(shapes), shapes  # a shape's buffers were reused


def test_a_step_no_rung_holds_runs_the_model_and_is_counted(setup) -> None:  # type: ignore[no-untyped-def]
    cfg, model, tables, gen, _ = setup
    stats = GraphStats()
    graphs = ScoreGraphs(model.dense, "pytorch", stats, max_users=1, graphs=False)
    long = cfg.hstu.max_seq_len - len(cfg.profile) - 4
    users = visits(model, tables, gen, [(long, 4, long), (long, 4, long)])  # two whole sequences: past the ladder
    expected, _ = score(model.dense.score, users)
    got, _ = score(graphs.score, users)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=0)
    assert stats.graph_misses == 1 and not graphs.steps


def test_shapes_share_one_key_buffer_and_the_oldest_go_past_max_graphs(setup) -> None:  # type: ignore[no-untyped-def]
    """Every shape reads its key rows from one buffer (served, per-shape buffers under a byte cap were dropped and
    recaptured over and over); it grows when a shape needs more rows, which drops the kept shapes; past max_graphs
    the least recently used shape goes. Scores stay exact throughout."""
    _, model, tables, gen, seed = setup
    sizes = [(5, 2, 0), (30, 3, 30), (20, 4, 20)]  # new rows 2, ~36, ~27 (+ profile): different row rungs
    users = [visits(model, tables, gen, [s]) for s in sizes]
    shared = ScoreGraphs(model.dense, "pytorch", GraphStats(), max_users=4, graphs=False)
    bounded = ScoreGraphs(model.dense, "pytorch", GraphStats(), max_users=4, graphs=False, max_graphs=1)
    for u in users:
        expected, _ = score(model.dense.score, u)
        for graphs in (shared, bounded):
            got, _ = score(graphs.score, u)
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=0, msg=f"seed {seed}")
        assert len(bounded.steps) == 1 and next(reversed(bounded.steps)) == next(reversed(shared.steps))
    assert len(shared.steps) >= 2 and shared.rows is not None
    for step in shared.steps.values():  # views of the one buffer, as many rows as the shape's key rung
        assert step.rows.data_ptr() == shared.rows.data_ptr() and step.rows.shape[0] == step.shape.keys
    kept = shared.nbytes
    assert kept == shared.rows.numel() * shared.rows.element_size() + sum(s.nbytes for s in shared.steps.values())
    held = shared.rows.shape[0]
    more = shared._key_rows(held + 1, shared.rows)  # a shape past the buffer: it grows (x4, to the top), steps go
    assert more.shape[0] == max(held + 1, min(4 * held, shared.keys_ladder[-1])) and not shared.steps
    assert shared.nbytes == more.numel() * more.element_size()
    got, _ = score(shared.score, users[0])  # scored again against the new buffer
    torch.testing.assert_close(got, score(model.dense.score, users[0])[0], rtol=RTOL, atol=0, msg=f"seed {seed}")


def test_what_score_refuses_the_graphs_refuse_alike(setup) -> None:  # type: ignore[no-untyped-def]
    _, model, tables, gen, _ = setup
    graphs = ScoreGraphs(model.dense, "pytorch", GraphStats(), max_users=2, graphs=False)
    (cache, tokens, stamps, _, now), = visits(model, tables, gen, [(10, 2, 3)])  # fmt: skip
    with pytest.raises(ValueError, match="at least one candidate"):
        score(graphs.score, [(cache, tokens, stamps, 0, now)])


@pytest.mark.parametrize("max_seq_len", [64, 100])
def test_the_padded_layout(max_seq_len: int) -> None:
    """Random steps: every new row owned by one user whose queries are a suffix of its keys, slots distinct
    and inside the key buffer, pad users within max_seq_len, the real users' rows first and unchanged."""
    from grc.spec.loader import load_spec

    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    cfg = cfg.model_copy(update={"hstu": cfg.hstu.model_copy(update={"max_seq_len": max_seq_len})})
    dense = GRModel(cfg).dense
    rng = np.random.default_rng(int(torch.randint(0, 1 << 30, ())))
    rows, keys = ladder(16, 4 * max_seq_len), ladder(256, 8 * max_seq_len)
    for _ in range(50):
        b = int(rng.integers(1, 5))
        new = rng.integers(1, max_seq_len // 2, b)
        past = [int(rng.integers(0, max_seq_len - n + 1)) for n in new]
        candidates = [int(rng.integers(1, n + 1)) for n in new]
        bounds = [0, *itertools.accumulate(int(n) for n in new)]
        profile = len(cfg.profile)
        caches = [  # the stamps are what the layout reads of a cache (rows: one packed row per token, unread here)
            UserKV(torch.zeros(p, 1), torch.from_numpy(rng.integers(0, 1 << 40, p)), profile, KVLayout(1, 1, 1, 1))
            for p in past
        ]
        stamps, now = rng.integers(0, 1 << 40, bounds[-1]), [int(t) for t in rng.integers(1 << 40, 1 << 41, b)]
        layout = plan(dense, caches, bounds, candidates, stamps, now, rows, keys)
        assert layout is not None
        shape, packed = layout.shape, layout.packed
        spans = shape.spans
        assert packed.size == shape.length == max(end for _, end in spans.values())
        fields = {name: packed[start:end] for name, (start, end) in spans.items()}
        for name, size in shape.sizes().items():  # each field its size, 16-byte aligned, none overlapping
            start, end = spans[name]
            assert end - start == size and start % 2 == 0
        assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(spans.values()))
        q_off, kv_off, slots = fields["q_offsets"], fields["kv_offsets"], fields["slots"]
        assert q_off[-1] == shape.rows >= bounds[-1] and kv_off[-1] <= shape.keys
        assert list(q_off[: b + 1]) == bounds and np.all(np.diff(q_off) <= np.diff(kv_off))
        assert len(set(slots.tolist())) == shape.rows and slots.max() < shape.keys
        assert np.all(np.diff(kv_off)[b:] <= max_seq_len)
        assert layout.candidates == sum(candidates)
        # the attention kernel's autotuning key of this step is one the warm-up tunes (ScoreGraphs.warm_up)
        assert seq_bucket(shape.keys, shape.users) in tuning_buckets(max_seq_len)
        for u in range(b):  # the real users' new rows fill the last slots of their sequences
            n_kv = past[u] + int(new[u])
            assert list(slots[bounds[u] : bounds[u + 1]]) == list(range(kv_off[u] + past[u], kv_off[u] + n_kv))
            # the key rows' stamps: the cached ones (profile rows at the request time), then the new rows'
            cached = caches[u].timestamps.numpy().copy()
            cached[: min(profile, past[u])] = now[u]
            expected = np.concatenate([cached, stamps[bounds[u] : bounds[u + 1]]])
            assert np.array_equal(fields["stamps"][kv_off[u] : kv_off[u] + n_kv], expected)
    assert pad_users(0, 0, 8) == [] and pad_users(5, 20, 8) == [(5, 8), (0, 8), (0, 4)]
