"""postprocess: the dense model's scores -> per-candidate task scores, ranking score, top k.

In, per request of b users: scores FP32 [b, L, tasks] (zero except the candidate rows, which are
the last num_candidates of each user's ``lengths`` tokens), lengths and num_candidates INT64
[b, 1], candidate_ids INT64 [b, c] (the ids of the first candidate table). Out: see
grc/serving/common/request.py (scores, ranked_candidates, ranked_items, ranked_scores, ranked_task_scores).
The ranking score is sum(rank_weights * scores); ties keep the request's candidate order.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from grc.serving.common import request as rq
from grc.serving.common.validate import check_postprocess
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io

INPUTS = ("scores", "lengths", "num_candidates", "candidate_ids")


def rank(r: dict[str, np.ndarray], weights: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """One request checked by validate.check_postprocess -> its outputs."""
    scores, ids = r["scores"], r["candidate_ids"]
    c = ids.shape[1]
    lengths = r["lengths"].reshape(-1)
    rows = (lengths - c)[:, None] + np.arange(c)[None, :]  # [b, c]: the candidate tokens
    return rank_candidates(np.take_along_axis(scores, rows[:, :, None], axis=1), ids, weights, top_k)


def rank_candidates(scores: np.ndarray, ids: np.ndarray, weights: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """One request's candidate scores [b, c, tasks] and ids [b, c] -> its outputs (the fused model's too)."""
    per_task = np.ascontiguousarray(scores, np.float32)
    order, combined = rq.ranking(per_task, weights, top_k)
    return {
        "scores": per_task,
        "ranked_candidates": order,
        "ranked_items": np.take_along_axis(ids, order, axis=1).astype(np.int64),
        "ranked_scores": np.take_along_axis(combined, order, axis=1).astype(np.float32),
        "ranked_task_scores": np.ascontiguousarray(np.take_along_axis(per_task, order[:, :, None], axis=1)),
    }


def rank_requests(
    picked: np.ndarray, ids: list[np.ndarray], weights: np.ndarray, top_k: int
) -> list[dict[str, np.ndarray]]:
    """Candidate scores of several requests, request after request and user after user ([rows, tasks]), and each
    request's candidate ids [b, c] -> each request's outputs. Consecutive requests with the same candidate count
    are ranked in one ``rank_candidates`` call and split by rows (the same numbers: every row is ranked on its own;
    per request, ~6 requests an execute, the numpy calls cost ~2x on the host)."""
    outs, row = [], 0
    for c, group in itertools.groupby(ids, key=lambda a: a.shape[1]):
        parts = list(group)
        users = sum(a.shape[0] for a in parts)
        together = parts[0] if len(parts) == 1 else np.concatenate(parts)
        ranked = rank_candidates(picked[row : row + users * c].reshape(users, c, -1), together, weights, top_k)
        start = 0
        for a in parts:
            outs.append({name: out[start : start + a.shape[0]] for name, out in ranked.items()})
            start += a.shape[0]
        row += users * c
    return outs


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = io.parameters(args)
        self.name = args["model_name"]
        self.weights = np.asarray(json.loads(params["rank_weights"]), dtype=np.float32)
        self.top_k = int(params["top_k"])

    def execute(self, requests: list[Any]) -> list[Any]:
        # numpy work per request is microseconds: each runs on its own
        return steps.execute(
            requests,
            self.name,
            INPUTS,
            lambda r: check_postprocess(r, len(self.weights)),
            lambda batch: [rank(r, self.weights, self.top_k) for r in batch],
        )
