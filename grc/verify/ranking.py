"""Ranking quality of one backend's scores against the fp32 PyTorch model's: what a ranking team
reads, not only the largest |Δscore|.

Scores are jagged: ``scores[offsets[u]:offsets[u+1], task]`` are user u's candidates. Per task:
  top_k_overlap  mean over users of |top-k(actual) ∩ top-k(expected)| / k, users with more than k
                 candidates only (with k or fewer the top k is every candidate: 1 by construction)
  kendall_tau    mean over users of Kendall's tau-b between the two orderings of the candidates
                 (tau-b: ties count, as in scipy.stats.kendalltau); users with two candidates or more
  mean_abs, max_abs  of |actual - expected| over every candidate
Pure functions over numpy arrays: verify and the aoti parity check both call ``rank_figures``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from grc.spec.schema import ModelConfig


def top_k_overlap(actual: np.ndarray, expected: np.ndarray, k: int) -> float:
    """|top-k of actual ∩ top-k of expected| / k for one user's candidates (ties broken by index)."""
    a = set(np.argsort(-actual, kind="stable")[:k].tolist())
    e = set(np.argsort(-expected, kind="stable")[:k].tolist())
    return len(a & e) / min(k, len(actual))


def kendall_tau(actual: np.ndarray, expected: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors over the same candidates (O(n^2): a user has at most
    max_candidates). Both constant: 1 (the same, empty, order); one constant: 0 (no order to agree with)."""
    da = np.sign(actual[:, None] - actual[None, :])
    de = np.sign(expected[:, None] - expected[None, :])
    upper = np.triu_indices(len(actual), 1)
    da, de = da[upper], de[upper]
    concordance = float((da * de).sum())
    pairs_a, pairs_e = float(np.count_nonzero(da)), float(np.count_nonzero(de))
    if pairs_a == 0 and pairs_e == 0:
        return 1.0
    if pairs_a == 0 or pairs_e == 0:
        return 0.0
    return concordance / (pairs_a * pairs_e) ** 0.5


@dataclass(frozen=True)
class RankFigure:
    backend: str
    precision: str  # e.g. "tables int8, dense float32"
    task: str
    users: int
    top_k: int
    top_k_overlap: float
    kendall_tau: float
    mean_abs: float
    max_abs: float
    ok: bool
    failed: tuple[str, ...]  # the gates it missed, e.g. ("kendall_tau 0.91 < 0.95",)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["failed"] = list(self.failed)
        return out


@dataclass(frozen=True)
class Gates:
    """Thresholds (verify.ranking's fields); any figure outside fails the build."""

    top_k: int
    min_top_k_overlap: float
    min_kendall_tau: float
    max_mean_abs: float
    max_abs: float


def rank_figures(
    backend: str,
    precision: str,
    tasks: list[str],
    actual: np.ndarray,
    expected: np.ndarray,
    offsets: np.ndarray,
    gates: Gates,
) -> list[RankFigure]:
    """One figure per task: ``actual``/``expected`` are [candidates, tasks], ``offsets`` [users + 1]."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or not np.isfinite(actual).all():
        inf = float("inf")
        why = (f"scores shape {actual.shape} vs {expected.shape} or not finite",)
        return [RankFigure(backend, precision, t, 0, gates.top_k, 0.0, -1.0, inf, inf, False, why) for t in tasks]
    users = [(int(s), int(e)) for s, e in itertools.pairwise(offsets)]
    figures = []
    for j, task in enumerate(tasks):
        a, e = actual[:, j], expected[:, j]
        overlaps = [top_k_overlap(a[s:t], e[s:t], gates.top_k) for s, t in users if t - s > gates.top_k]
        taus = [kendall_tau(a[s:t], e[s:t]) for s, t in users if t - s >= 2]
        diff = np.abs(a - e)
        fig = {
            "top_k_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
            "kendall_tau": float(np.mean(taus)) if taus else 1.0,
            "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "max_abs": float(diff.max()) if diff.size else 0.0,
        }
        failed = _missed(fig, gates)
        figures.append(
            RankFigure(backend, precision, task, len(users), gates.top_k, **fig, ok=not failed, failed=failed)
        )
    return figures


def _missed(fig: dict[str, float], gates: Gates) -> tuple[str, ...]:
    checks = [
        ("top_k_overlap", fig["top_k_overlap"] >= gates.min_top_k_overlap, ">=", gates.min_top_k_overlap),
        ("kendall_tau", fig["kendall_tau"] >= gates.min_kendall_tau, ">=", gates.min_kendall_tau),
        ("mean_abs", fig["mean_abs"] <= gates.max_mean_abs, "<=", gates.max_mean_abs),
        ("max_abs", fig["max_abs"] <= gates.max_abs, "<=", gates.max_abs),
    ]
    return tuple(f"{name} {fig[name]:.4g} (want {op} {bound:g})" for name, ok, op, bound in checks if not ok)


def candidate_scores(scores: np.ndarray, offsets: torch.Tensor, num_candidates: torch.Tensor) -> np.ndarray:
    """Jagged [T, tasks] scores -> [candidates, tasks]: each user's candidates are its last tokens."""
    ends = offsets[1:].tolist()
    return np.concatenate([scores[e - c : e] for e, c in zip(ends, num_candidates.tolist(), strict=True)])


def user_shape(cfg: ModelConfig, history: int, candidates: int | None) -> tuple[int, int]:
    """(history, candidates) of synthetic users cut to fit the model (candidates default
    max_candidates): the held-out ranking users and the calibration users."""
    cands = min(candidates or cfg.max_candidates, cfg.max_candidates)
    return max(1, min(history, cfg.hstu.max_seq_len - len(cfg.profile) - cands)), cands


def format_rank_figures(figures: list[RankFigure]) -> str:
    lines = [
        f"{'backend':<9} {'precision':<30} {'task':<14} {'users':>5} {'top-k ovl':>9} {'tau':>7} "
        f"{'mean|Δ|':>9} {'max|Δ|':>9}"
    ]
    for f in figures:
        mark = "ok" if f.ok else "FAIL: " + "; ".join(f.failed)
        lines.append(
            f"{f.backend:<9} {f.precision:<30} {f.task:<14} {f.users:>5} {f.top_k_overlap:>9.4f} "
            f"{f.kendall_tau:>7.4f} {f.mean_abs:>9.2e} {f.max_abs:>9.2e}  {mark}"
        )
    return "\n".join(lines)
