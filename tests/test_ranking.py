"""Ranking figures on hand-checkable cases, and Kendall's tau against scipy's."""

from __future__ import annotations

import numpy as np
import pytest

from grc.verify.ranking import Gates, format_rank_figures, kendall_tau, rank_figures, top_k_overlap

GATES = Gates(top_k=2, min_top_k_overlap=0.9, min_kendall_tau=0.9, max_mean_abs=0.1, max_abs=0.2)


def test_top_k_overlap_by_hand() -> None:
    expected = np.array([0.9, 0.8, 0.1, 0.0])
    assert top_k_overlap(expected, expected, 2) == 1.0
    assert top_k_overlap(np.array([0.9, 0.0, 0.8, 0.1]), expected, 2) == 0.5  # {0, 2} vs {0, 1}
    assert top_k_overlap(np.array([0.0, 0.1, 0.8, 0.9]), expected, 2) == 0.0


def test_kendall_tau_by_hand() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(x, x) == 1.0
    assert kendall_tau(-x, x) == -1.0
    # one swapped adjacent pair of 6: (5 - 1) / 6
    assert kendall_tau(np.array([2.0, 1.0, 3.0, 4.0]), x) == pytest.approx(4 / 6)
    assert kendall_tau(np.zeros(3), np.zeros(3)) == 1.0
    assert kendall_tau(np.zeros(3), x[:3]) == 0.0


def test_kendall_tau_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats", reason="scipy is not installed (the cross-check needs it)")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, 12).astype(float)  # many ties: tau-b's correction matters
        e = rng.integers(0, 5, 12).astype(float)
        assert kendall_tau(a, e) == pytest.approx(stats.kendalltau(a, e).statistic, abs=1e-12)


def test_rank_figures_per_task_and_gates() -> None:
    offsets = np.array([0, 4, 5])  # user 0: 4 candidates, user 1: one (no order, no top-k to compare)
    expected = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3], [0.0, 0.4], [0.5, 0.5]])
    actual = expected.copy()
    actual[:, 1] = [0.4, 0.3, 0.2, 0.1, 0.5]  # task 1: user 0 fully reversed
    figures = rank_figures("export", "tables int8", ["ctr", "eng"], actual, expected, offsets, GATES)
    ctr, eng = figures
    assert ctr.ok and ctr.top_k_overlap == 1.0 and ctr.kendall_tau == 1.0 and ctr.max_abs == 0.0
    assert not eng.ok and eng.kendall_tau == -1.0 and eng.top_k_overlap == 0.0
    assert eng.max_abs == pytest.approx(0.3) and eng.mean_abs == pytest.approx((0.3 + 0.1 + 0.1 + 0.3) / 5)
    assert any(f.startswith("kendall_tau") for f in eng.failed) and any(f.startswith("max_abs") for f in eng.failed)
    table = format_rank_figures(figures)
    assert "FAIL: top_k_overlap" in table and table.count("ok") >= 1


def test_non_finite_scores_fail() -> None:
    bad = np.array([[np.nan], [0.1], [0.2]])
    (fig,) = rank_figures("x", "p", ["ctr"], bad, np.zeros((3, 1)), np.array([0, 3]), GATES)
    assert not fig.ok and fig.failed
