"""bench/history_cache_session.py's workload: what it sends is what it says (no model runs here)."""

from __future__ import annotations

import collections

import numpy as np

from bench.history_cache_session import T0, user_visits, visit_order
from grc.serving.common import request as rq
from grc.serving.common.validate import parse
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS


def test_every_user_visits_in_order_and_popular_users_come_first() -> None:
    order = visit_order(50, 5, 1.1, seed=3)
    assert len(order) == 250
    seen: dict[int, list[int]] = collections.defaultdict(list)
    for user, visit in order:
        seen[user].append(visit)
    assert all(v == [0, 1, 2, 3, 4] for v in seen.values()) and len(seen) == 50
    first_half = [u for u, _ in order[:125]]
    assert first_half.count(0) > first_half.count(49)  # Zipf: user 0 is the most popular


def test_each_visit_extends_the_previous_history_at_its_gap() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    for gap in (0, 60):
        visits = user_visits(cfg, 7, base=20, visits=4, delta=3, candidates=4, gap_s=gap)
        times = [int(v[rq.REQUEST_TIME][0, 0]) for v in visits]
        assert times == [T0 + k * gap for k in range(4)]
        for k, visit in enumerate(visits):
            parse(dict(visit), cfg, True)  # a valid request
            stamps = visit[rq.HISTORY_TIME][0]
            assert len(stamps) == 20 + 3 * k and np.all(np.diff(stamps) >= 0) and stamps[-1] <= times[k]
            if k:
                before = visits[k - 1]
                for name in [rq.history_input(t) for t in cfg.history] + [rq.HISTORY_TIME]:
                    assert np.array_equal(visit[name][:, : 20 + 3 * (k - 1)], before[name])


def test_the_session_runs_each_mode_on_a_fresh_store() -> None:
    """The whole workload on mtgr-tiny, a few users: every mode runs without errors, each cached mode on a
    store of its own (it replaces the scorer's store: CachedScorer.cache is assignable), a visit after a
    user's first a hit at gap 0."""
    from bench.history_cache_session import parser, session

    # the bench's own parser (its defaults, --budget-mb included), so the test cannot drift from the options
    argv = ["--spec", str(TEST_SPECS / "mtgr-tiny.yaml"), "--users", "4", "--visits", "3", "--base", "20"]
    args = parser().parse_args([*argv, "--delta", "3", "--candidates", "4", "--gap-s", "60", "--zipf", "1.1"])
    out = session(args, "cpu", "float32", budget_s=60.0)
    for mode in ("uncached", "cached_gap0", "cached_gap60"):
        assert out[mode]["errors"] == 0 and out[mode]["requests"] == 12, (mode, out[mode])
    assert out["cached_gap0"]["misses"] == 4 and out["cached_gap0"]["hits"] == 8  # a fresh store: 4 first visits
