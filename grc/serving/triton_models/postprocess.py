"""postprocess: the dense model's scores -> per-candidate task scores, ranking score, top k.

In, per request of b users: scores FP32 [b, L, tasks] (zero except the candidate rows, which are
the last num_candidates of each user's ``lengths`` tokens), lengths and num_candidates INT64
[b, 1], candidate_ids INT64 [b, c] (the ids of the first candidate table). Out: see
grc/serving/request.py (scores, ranked_candidates, ranked_items, ranked_scores, ranked_task_scores).
The ranking score is sum(rank_weights * scores); ties keep the request's candidate order.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from grc.serving import request as rq
from grc.serving.triton_models import tensor_io as io

INPUTS = ("scores", "lengths", "num_candidates", "candidate_ids")


def rank(r: dict[str, np.ndarray], weights: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    scores, ids = r["scores"], r["candidate_ids"]
    b, c = ids.shape
    lengths, cands = r["lengths"].reshape(-1), r["num_candidates"].reshape(-1)
    if scores.shape[0] != b or (cands != c).any() or (lengths > scores.shape[1]).any():
        raise ValueError(f"scores {list(scores.shape)}, lengths {lengths.tolist()}, num_candidates "
                         f"{cands.tolist()} and candidate_ids {list(ids.shape)} do not agree")
    rows = (lengths - c)[:, None] + np.arange(c)[None, :]  # [b, c]: the candidate tokens
    per_task = np.ascontiguousarray(np.take_along_axis(scores, rows[:, :, None], axis=1), np.float32)
    order, combined = rq.ranking(per_task, weights, top_k)
    return {
        "scores": per_task,
        "ranked_candidates": order,
        "ranked_items": np.take_along_axis(ids, order, axis=1).astype(np.int64),
        "ranked_scores": np.take_along_axis(combined, order, axis=1).astype(np.float32),
        "ranked_task_scores": np.ascontiguousarray(np.take_along_axis(per_task, order[:, :, None], axis=1)),
    }


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = io.parameters(args)
        self.name = args["model_name"]
        self.weights = np.asarray(json.loads(params["rank_weights"]), dtype=np.float32)
        self.top_k = int(params["top_k"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:  # numpy work per request is microseconds; no need to merge
            r = {name: io.read(request, name) for name in INPUTS}
            missing = [n for n, a in r.items() if a is None]
            try:
                if missing:
                    raise ValueError(f"missing input(s): {', '.join(missing)}")
                responses.append(io.response(rank(r, self.weights, self.top_k)))  # type: ignore[arg-type]
            except ValueError as exc:
                responses.append(io.error_response(f"{self.name}: {exc}"))
        return responses
