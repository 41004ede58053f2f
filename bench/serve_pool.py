"""bench/serve.py's requests and answer checks: a seeded pool of one-user requests of realistic sizes, and the
PyTorch float64 reference a sample of every mode's answers is held against."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grc.serving.common import request as rq
from grc.spec.schema import ModelConfig, Spec, Tolerance

SHORTEST_HISTORY = 50  # events; a ranking request carries a real history
FEWEST_CANDIDATES = 16
MOST_CANDIDATES = 512


def size_ranges(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(history lo, hi), (candidates lo, hi): 50..max_history and 16..min(512, max_candidates), the lower bound
    cut to the upper one where a (tiny) model allows less."""
    top_h = rq.max_history(cfg)
    top_c = min(MOST_CANDIDATES, cfg.max_candidates)
    if top_h < 1:
        raise SystemExit(f"{cfg}: max_history {top_h}: the model keeps no history event, nothing to rank on")
    return (min(SHORTEST_HISTORY, top_h), top_h), (min(FEWEST_CANDIDATES, top_c), top_c)


def request_pool(cfg: ModelConfig, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` one-user requests (batch dimension 1), history length and candidate count drawn uniformly from
    ``size_ranges``, every id inside its table, timestamps oldest first and before the request time."""
    rng = np.random.Generator(np.random.PCG64(seed))
    (h_lo, h_hi), (c_lo, c_hi) = size_ranges(cfg)

    def ids(table: str, n: int) -> np.ndarray:
        return rng.integers(0, cfg.tables[table].vocab_size, size=(1, n), dtype=np.int64)

    pool = []
    for _ in range(count):
        h, c = int(rng.integers(h_lo, h_hi + 1)), int(rng.integers(c_lo, c_hi + 1))
        now = 1_750_000_000 + int(rng.integers(0, 86_400))
        # gaps from a second to weeks, so every time bucket occurs; sorted: the request format wants oldest first
        gaps = np.sort((2.0 ** (rng.random(h) * 21)).astype(np.int64))[::-1]
        arrays = {rq.profile_input(t): ids(t, 1) for t in cfg.profile}
        arrays |= {rq.history_input(t): ids(t, h) for t in cfg.history}
        arrays[rq.HISTORY_TIME] = (now - gaps)[None].astype(np.int64)
        arrays |= {rq.candidate_input(t): ids(t, c) for t in cfg.candidate}
        if cfg.cross_features:
            arrays[rq.CROSS] = rng.standard_normal((1, c, cfg.cross_features)).astype(np.float32)
        arrays[rq.REQUEST_TIME] = np.array([[now]], dtype=np.int64)
        pool.append(arrays)
    return pool


@dataclass
class Sampler:
    """Keeps the answers to the first ``size`` pool requests a mode returns (under load, so batched with others)
    and checks them against the PyTorch float64 model after the row; references computed once per request."""

    spec: Spec
    weights_dir: Path
    pool: list[dict[str, np.ndarray]]
    tolerance: Tolerance  # the bundle's own (grc.serving.triton.bundle.served_tolerance): bf16's on KIND_GPU
    size: int = 16
    references: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from grc.serving.triton.check import Reference

        self.reference = Reference(self.spec.model, self.weights_dir, self.spec.bundles.triton.truncate_history)

    def prepare(self) -> None:
        """Every sampled request's reference, ahead of the rows (bench/serve.py computes them while the server
        loads its models)."""
        for index in range(min(self.size, len(self.pool))):
            if index not in self.references:
                self.references[index] = self.reference.scores(self.pool[index])

    def check(self, answers: dict[int, dict[str, np.ndarray]]) -> dict[str, Any]:
        """{checked, max_abs, max_rel, problems} of the kept answers (problems name the pool request)."""
        from grc.serving.triton.check import check_response

        cfg = self.spec.bundles.triton
        weights = rq.rank_weights(self.spec.model, cfg)
        worst_abs = worst_rel = 0.0
        problems: list[str] = []
        for index, answer in sorted(answers.items()):
            if index not in self.references:
                self.references[index] = self.reference.scores(self.pool[index])
            result = check_response(
                answer, self.references[index], self.pool[index], self.spec.model, weights, cfg.top_k, self.tolerance
            )
            worst_abs, worst_rel = max(worst_abs, result.max_abs), max(worst_rel, result.max_rel)
            problems += [f"pool request {index}: {p}" for p in result.problems]
        return {
            "checked": len(answers),
            "max_abs": worst_abs,
            "max_rel": worst_rel,
            "tolerance": {"max_abs": self.tolerance.max_abs, "max_rel": self.tolerance.max_rel},
            "problems": problems[:8],
        }


def answer_problems(
    answer: dict[str, np.ndarray], request: dict[str, np.ndarray], cfg: ModelConfig, top_k: int
) -> list[str]:
    """What is wrong with an answer's form (every answer gets this check, cheap): shapes and finite scores."""
    c = request[rq.candidate_input(cfg.candidate[0])].shape[1]
    k, tasks = min(top_k, c), len(cfg.tasks)
    wanted = {
        "scores": (1, c, tasks),
        "ranked_candidates": (1, k),
        "ranked_items": (1, k),
        "ranked_scores": (1, k),
        "ranked_task_scores": (1, k, tasks),
    }
    problems = []
    for name, shape in wanted.items():
        got = answer.get(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif tuple(got.shape) != shape:
            problems.append(f"{name}: shape {list(got.shape)}, expected {list(shape)}")
        elif got.dtype.kind == "f" and not np.isfinite(got).all():
            problems.append(f"{name}: not finite")
    return problems
