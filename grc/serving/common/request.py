"""The request and response of a served GR model: tensor names, types and shapes, from the spec.

One request is one user (or ``b`` users whose histories and candidate lists have the same lengths):
every tensor's first dimension is that batch ``b``; the shapes below are per user.

  profile_<table>       INT64 [1]      one id per profile table (MTGR; e.g. the user id table)
  history_<table>       INT64 [h]      one id per history event per history table (items, actions...)
  history_timestamps    INT64 [h]      seconds, oldest event first
  candidate_<table>     INT64 [c]      one id per candidate per candidate table
  cross_features        FP32  [c, F]   dense user x candidate features (only when the model has any)
  request_time          INT64 [1]      seconds
->
  scores                FP32  [c, T]   per-task scores, in the request's candidate order
  ranked_candidates     INT64 [k]      candidate positions, best first (k = min(top_k, c))
  ranked_items          INT64 [k]      their ids in the first candidate table
  ranked_scores         FP32  [k]      the ranking score: sum over tasks of rank_weight * score
  ranked_task_scores    FP32  [k, T]   their per-task scores

No module here imports torch: postprocess and the dense step load it without paying for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from grc.spec.schema import ModelConfig, TritonBundleConfig

HISTORY_TIME = "history_timestamps"
CROSS = "cross_features"
REQUEST_TIME = "request_time"
OUTPUTS = ("scores", "ranked_candidates", "ranked_items", "ranked_scores", "ranked_task_scores")
NP_TYPES = {"INT64": np.int64, "FP32": np.float32}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # the wire name: INT64, FP32
    dims: tuple[int, ...]  # per user, without the batch dimension; -1: variable
    description: str

    @property
    def ragged(self) -> bool:
        return -1 in self.dims

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": ["batch", *self.dims],
            "description": self.description,
        }


def profile_input(table: str) -> str:
    return f"profile_{table}"


def history_input(table: str) -> str:
    return f"history_{table}"


def candidate_input(table: str) -> str:
    return f"candidate_{table}"


def request_inputs(cfg: ModelConfig) -> list[TensorSpec]:
    specs = [
        TensorSpec(profile_input(t), "INT64", (1,), f"row of the {t} table (profile feature)") for t in cfg.profile
    ]
    specs += [
        TensorSpec(history_input(t), "INT64", (-1,), f"row of the {t} table per history event") for t in cfg.history
    ]
    specs.append(TensorSpec(HISTORY_TIME, "INT64", (-1,), "time of each history event in seconds, oldest first"))
    specs += [
        TensorSpec(candidate_input(t), "INT64", (-1,), f"row of the {t} table per candidate") for t in cfg.candidate
    ]
    if cfg.cross_features:
        specs.append(TensorSpec(CROSS, "FP32", (-1, cfg.cross_features), "user x candidate features per candidate"))
    specs.append(TensorSpec(REQUEST_TIME, "INT64", (1,), "time of the request in seconds"))
    return specs


def response_outputs(cfg: ModelConfig) -> list[TensorSpec]:
    tasks = len(cfg.tasks)
    first = cfg.candidate[0]
    return [
        TensorSpec("scores", "FP32", (-1, tasks), f"per-task scores ({', '.join(cfg.tasks)}) in request order"),
        TensorSpec("ranked_candidates", "INT64", (-1,), "candidate positions, best first (top k)"),
        TensorSpec("ranked_items", "INT64", (-1,), f"{candidate_input(first)} of the ranked candidates"),
        TensorSpec("ranked_scores", "FP32", (-1,), "ranking score: sum of rank_weights[task] * score"),
        TensorSpec("ranked_task_scores", "FP32", (-1, tasks), "per-task scores of the ranked candidates"),
    ]


def max_history(cfg: ModelConfig) -> int:
    """The most history events the model keeps, whatever the request's candidate count: room is reserved
    for max_candidates, so adding a candidate never cuts history (a score never depends on the others)."""
    return cfg.hstu.max_seq_len - len(cfg.profile) - cfg.max_candidates


def rank_weights(cfg: ModelConfig, bundle: TritonBundleConfig) -> np.ndarray:
    """Per-task weights of the ranking score (missing tasks weigh 0; none given: every task 1)."""
    if not bundle.rank_weights:
        return np.ones(len(cfg.tasks), dtype=np.float32)
    return np.array([bundle.rank_weights.get(t, 0.0) for t in cfg.tasks], dtype=np.float32)


def bundle_problems(cfg: ModelConfig, bundle: TritonBundleConfig) -> list[str]:
    """Rules joining bundles.triton to model (the section alone cannot see the model)."""
    problems = []
    for task in bundle.rank_weights:
        if task not in cfg.tasks:
            problems.append(
                f"bundles.triton.rank_weights: names task {task!r}, which model.tasks does not define "
                f"(tasks: {', '.join(cfg.tasks)})"
            )
    return problems


# --------------------------------------------------------------------------- building requests


def user_request(batch: Any, user: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The request of user ``user`` of a ``grc.model.gr.Batch`` (batch dimension 1), its history events
    put oldest first as the request format says (a generated batch's need not be)."""
    ho = batch.history_offsets.tolist()
    co = batch.candidate_offsets.tolist()
    hs, cs = slice(ho[user], ho[user + 1]), slice(co[user], co[user + 1])
    times = batch.history_time[hs].numpy().astype(np.int64)
    oldest_first = np.argsort(times, kind="stable")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(cfg.profile):
        arrays[profile_input(t)] = batch.profile[user : user + 1, i : i + 1].numpy().astype(np.int64)
    for t in cfg.history:
        arrays[history_input(t)] = batch.history[t][hs].numpy().astype(np.int64)[oldest_first][None]
    arrays[HISTORY_TIME] = times[oldest_first][None]
    for t in cfg.candidate:
        arrays[candidate_input(t)] = batch.candidates[t][cs].numpy().astype(np.int64)[None]
    if cfg.cross_features:
        arrays[CROSS] = batch.cross[cs].numpy().astype(np.float32)[None]
    arrays[REQUEST_TIME] = batch.request_time[user : user + 1].numpy().astype(np.int64)[:, None]
    return arrays


def stack_requests(requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several same-shaped single-user requests as one request of ``len(requests)`` users."""
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def request_batch(arrays: dict[str, np.ndarray], cfg: ModelConfig) -> Any:
    """A request (numpy, batch first) as a ``grc.model.gr.Batch``: what the PyTorch model takes."""
    import torch

    from grc.model.gr import Batch

    users = int(arrays[REQUEST_TIME].shape[0])
    h = arrays[HISTORY_TIME].shape[1]
    c = arrays[candidate_input(cfg.candidate[0])].shape[1]

    def offsets(n: int) -> torch.Tensor:
        return torch.arange(users + 1, dtype=torch.int64) * n

    def flat(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arrays[name]).reshape(-1).astype(np.int64))

    profile = (
        np.concatenate([arrays[profile_input(t)] for t in cfg.profile], 1)
        if cfg.profile
        else np.zeros((users, 0), dtype=np.int64)
    )
    cross = arrays[CROSS].reshape(users * c, -1) if cfg.cross_features else np.zeros((users * c, 0), np.float32)
    return Batch(
        profile=torch.from_numpy(profile.astype(np.int64)),
        history={t: flat(history_input(t)) for t in cfg.history},
        history_time=flat(HISTORY_TIME),
        history_offsets=offsets(h),
        candidates={t: flat(candidate_input(t)) for t in cfg.candidate},
        candidate_offsets=offsets(c),
        cross=torch.from_numpy(np.ascontiguousarray(cross, dtype=np.float32)),
        request_time=flat(REQUEST_TIME),
    )


def as_json_inputs(arrays: dict[str, np.ndarray], cfg: ModelConfig) -> list[dict[str, Any]]:
    """KServe v2 JSON ``inputs`` of a request (what curl posts to /v2/models/<name>/infer)."""
    types = {s.name: s.datatype for s in request_inputs(cfg)}
    return [
        {"name": name, "shape": list(a.shape), "datatype": types[name], "data": a.reshape(-1).tolist()}
        for name, a in arrays.items()
    ]


def ranking(scores: np.ndarray, weights: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """scores [b, c, T] -> (order [b, k] best first, ties by position; ranking score [b, c])."""
    combined = (scores.astype(np.float32) * weights).sum(-1, dtype=np.float32)
    order = np.argsort(-combined, axis=1, kind="stable")[:, : min(top_k, scores.shape[1])]
    return order.astype(np.int64), combined
