"""Ranking several requests' candidates at once (postprocess.rank_requests, the fused model's rank phase) gives each
request exactly what ranking it alone gives (postprocess.rank_candidates), whatever mix of users per request and
candidate counts the batch holds."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from grc.serving.triton.models.postprocess import rank_candidates, rank_requests


@pytest.mark.parametrize("shapes", [[(1, 256)] * 6, [(2, 5), (1, 5), (3, 7), (1, 7), (1, 5), (2, 1)], [(1, 3)]])
def test_batched_ranking_equals_per_request(shapes: list[tuple[int, int]]) -> None:
    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    tasks, top_k = 3, 4
    weights = rng.uniform(0.1, 2.0, tasks).astype(np.float32)
    ids = [rng.integers(0, 1 << 40, (b, c)) for b, c in shapes]
    rows = sum(b * c for b, c in shapes)
    picked = rng.standard_normal((rows, tasks)).astype(np.float32)
    picked[:2] = picked[2:4]  # ties: the request's candidate order breaks them, batched or not
    got = rank_requests(picked, ids, weights, top_k)
    row = 0
    assert len(got) == len(shapes)
    for (b, c), request_ids, out in zip(shapes, ids, got, strict=True):
        want = rank_candidates(picked[row : row + b * c].reshape(b, c, tasks), request_ids, weights, top_k)
        row += b * c
        assert out.keys() == want.keys(), seed
        for name in want:
            assert out[name].dtype == want[name].dtype and out[name].flags.c_contiguous, (seed, name)
            np.testing.assert_array_equal(out[name], want[name], err_msg=f"seed {seed}: {name}")
