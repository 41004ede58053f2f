"""The fused Ranker's cached layout (grc/serving/ranker/layout.py ``build``) from the history cache's visits' own event
arrays: the same packed layout as slicing every request's history inputs per user."""

from __future__ import annotations

import numpy as np
import torch

from grc.model.sample import random_batch
from grc.serving.common import request as rq
from grc.serving.common.history_step import event_inputs, user_events
from grc.serving.ranker import layout as lay
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS


def test_a_layout_from_the_visits_events_equals_the_sliced_one() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    requests = []
    for seed, users in ((1, 1), (2, 3), (3, 2)):  # requests of one and of several users
        batch = random_batch(cfg, users, 12 + seed, 3, torch.Generator().manual_seed(seed), exact=True)
        parts = [rq.user_request(batch, u, cfg) for u in range(users)]
        requests.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    cuts = [(r, u) for r in requests for u in range(r[rq.REQUEST_TIME].shape[0])]
    rng = np.random.default_rng(0)
    skips = np.array([rng.integers(0, r[rq.HISTORY_TIME].shape[1] + 1) for r, _ in cuts], np.int64)
    skips[0] = 0  # a miss: nothing skipped, its profile laid out
    profiled = skips == 0
    inputs = event_inputs(cfg)
    events = np.concatenate([user_events(r, inputs, u)[1][s:] for (r, u), s in zip(cuts, skips, strict=True)])
    sliced = lay.build(requests, cfg, skips, profiled)
    read = lay.build(requests, cfg, skips, profiled, events)
    assert read.fields == sliced.fields and (read.users, read.tokens) == (sliced.users, sliced.tokens)
    assert np.array_equal(read.packed, sliced.packed)
    whole = lay.build(requests, cfg)  # nothing skipped: the uncached layout holds every event
    assert whole.tokens == sliced.tokens + int(skips.sum()) + len(cfg.profile) * int((~profiled).sum())
