"""The history-cached model: the whole request path in one python model, holding the user-history
cache (grc/serving/common/history_cache.py) and running the dense step through ``GRDense.score``.

Why one model and not an ensemble step: the cache must see the request's raw ids and timestamps
(to match the cached prefix) and its user_id, and Triton ensembles cannot pass an optional
input on. Each such model is one instance, one store: with ``history_cache.instances`` > 1 a
router (history_router.py) sends each user to the same one. Steps: check the request
(preprocess.parse), look the user up, project only the tokens the cache does not hold, score them
against the cached K/V, store the extended entry, rank (postprocess.rank). A request without
``user_id`` is computed whole and caches nothing.

Metrics (Triton custom metrics, on the server's metrics port; metrics.HistoryCacheMetrics, as in fused.py):
grc_history_cache_hits_total, grc_history_cache_misses_total, grc_history_cache_evictions_total (counters) and
grc_history_cache_bytes (gauge), labelled with the model name; with the entries in the arena (store arena, or
auto on KIND_GPU) also its grc_history_cache_splits_total, grc_history_cache_unplaced_total,
grc_history_cache_moves_total, grc_history_cache_in_place_total (counters) and grc_history_cache_arena_bytes
(gauge), not declared with a store of copies (no arena). Sent at most every metrics.HISTORY_CACHE_EVERY_S (what
waits is sent once the interval is over): a reader sees the counts that late at most.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grc.serving.common import request as rq
from grc.serving.common.history_cache import HistoryCache
from grc.serving.common.history_step import USER_ID, UserCaches, user_ids, user_request
from grc.serving.common.validate import RequestParser
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io
from grc.serving.triton.models.host import set_host_threads
from grc.serving.triton.models.metrics import HistoryCacheMetrics
from grc.serving.triton.models.postprocess import rank
from grc.serving.triton.models.preprocess import project
from grc.spec.schema import ModelConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

DTYPES = ("float32", "bfloat16")
MAX_GRAPHED_USERS = 8  # users per step the graphs' ladders reach (a larger step runs eagerly, counted as a miss)


def instance_device(gpu: bool, device_id: int) -> str:
    """The torch device of a model instance. A KIND_GPU instance without a usable CUDA device fails
    here, at load, naming why: never a silent run on the CPU."""
    import torch

    if not gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"history_cached: a KIND_GPU instance needs CUDA, and this torch ({torch.__version__}, built with "
            f"CUDA {torch.version.cuda}) sees no CUDA device; serve it with bundles.triton.instance_kind "
            f"KIND_CPU or on a host with a GPU"
        )
    if device_id >= torch.cuda.device_count():
        raise RuntimeError(
            f"history_cached: the instance is placed on GPU {device_id}, and torch sees "
            f"{torch.cuda.device_count()} CUDA device(s) (CUDA_VISIBLE_DEVICES?)"
        )
    return f"cuda:{device_id}"


def dense_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """The dense model's and the cached K/V's dtype: ``dtype`` on a GPU, float32 on the CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"history_cached: dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype) if device.type == "cuda" else torch.float32


class CachedScorer:
    """The dense model + the cache: score users, reusing and extending their entries.

    On a CUDA device the dense model, its inputs and every cached K/V live in device memory (the
    budget counts device bytes), attention runs grc's Triton kernels (impl "triton") and the step is
    replayed from CUDA graphs over entries kept in one device arena (store ``arena``: grc/serving/common/
    arena_graphs.py) or as tensors copied in and out (``copies``: score_graphs.py); the
    projector and the tables stay on the host. A miss runs the same score step against an empty
    cache: the whole sequence through the same kernels, on the same device."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Path,
        budget: int,
        max_user: int | None,
        device: str,
        weights_digest: str,
        dtype: str = "float32",
        impl: str | None = None,
        store: str = "auto",
        log: Callable[[str], None] = print,
    ):
        """store: where a GPU instance keeps entries (bundles.triton.history_cache.store; UserCaches.use_store)."""
        import torch

        from grc.weights import load_model, open_tables

        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dense_dtype(self.device, dtype)
        model = load_model(cfg, weights)
        self.projector = model.projector.eval()
        self.dense = model.dense.eval().to(self.device, self.dtype)
        self.tables = open_tables(cfg, weights)
        self.impl = impl or ("triton" if self.device.type == "cuda" else "pytorch")
        self.caches = UserCaches(cfg, budget, max_user, weights_digest, dtype, self.impl)
        from grc.serving.ranker.dense import GraphStats

        # on a GPU the step replayed from CUDA graphs, as in the fused model
        gpu = self.device.type == "cuda"
        step = self.caches.use_store(self.dense, store, GraphStats(), MAX_GRAPHED_USERS, log, graphs=gpu)
        if step is not None:
            step.warm_up(torch.empty(0, device=self.device, dtype=self.dtype))

    @property
    def cache(self) -> HistoryCache:
        return self.caches.cache

    @cache.setter
    def cache(self, store: HistoryCache) -> None:
        """A fresh store (bench/history_cache_session.py starts each mode on one)."""
        self.caches.cache = store

    @property
    def namespace(self) -> str:
        return self.caches.namespace

    def score(self, checked: dict[str, np.ndarray], users: np.ndarray | None) -> np.ndarray:
        """One checked request of b users -> candidate scores [b, c, tasks]; ``users``: their ids
        (None: cache nothing)."""
        import torch

        b = checked[rq.REQUEST_TIME].shape[0]
        visits = [self.caches.visit(checked, u, None if users is None else int(users[u])) for u in range(b)]
        parts = [user_request(checked, self.cfg, u, v.reused) for u, v in enumerate(visits)]
        projected = project(parts, self.projector, self.tables, self.cfg)
        device, dtype = self.device, self.dtype
        host = np.concatenate([p["timestamps"][0] for p in projected])
        bounds = [0, *itertools.accumulate(p["timestamps"].shape[1] for p in projected)]
        scores = self.caches.score(
            self.dense,
            visits,
            torch.from_numpy(np.concatenate([p["tokens"][0] for p in projected])).to(device, dtype),  # one copy
            torch.from_numpy(host).to(device),
            bounds,
            [int(p["num_candidates"][0, 0]) for p in projected],
            host,
        )
        return scores.float().cpu().numpy().reshape(b, -1, len(self.cfg.tasks))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = io.parameters(args)
        self.name = args["model_name"]
        self.cfg = ModelConfig.model_validate_json(params["grc_model"])
        self.truncate = params.get("truncate_history", "true") == "true"
        self.parse = RequestParser(self.cfg, self.truncate)
        self.weights = np.asarray(json.loads(params["rank_weights"]), dtype=np.float32)
        self.top_k = int(params["top_k"])
        gpu = args.get("model_instance_kind") == "GPU"
        set_host_threads(params)
        device = instance_device(gpu, int(args.get("model_instance_device_id", 0)))
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        max_user = int(params["max_user_bytes"]) if params.get("max_user_bytes") else None
        self.scorer = CachedScorer(
            self.cfg,
            weights,
            int(params["budget_bytes"]),
            max_user,
            device,
            params["weights_digest"],
            params.get("dtype", "float32"),
            store=params.get("store", "auto"),
        )
        self.names = [s.name for s in rq.request_inputs(self.cfg)]
        self.first = rq.candidate_input(self.cfg.candidate[0])
        self.metrics = HistoryCacheMetrics(self.name, self.scorer.caches)

    def _check(self, arrays: dict[str, np.ndarray | None]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """One request's checked inputs and its user ids (None: cache nothing); RequestError refuses it."""
        users = arrays.pop(USER_ID)
        checked = self.parse(arrays)
        return checked, user_ids(users, checked[rq.REQUEST_TIME].shape[0])

    def _answer(self, request: tuple[dict[str, np.ndarray], np.ndarray | None]) -> dict[str, np.ndarray]:
        checked, ids = request
        scores = self.scorer.score(checked, ids)
        b, c = scores.shape[:2]
        sizes = np.full((b, 1), c, np.int64)
        return rank(
            {"scores": scores, "lengths": sizes, "num_candidates": sizes, "candidate_ids": checked[self.first]},
            self.weights,
            self.top_k,
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        # one request's cache step at a time (a user's entries stay ordered); a bad request is refused
        # alone and an error in one fails only that one (grc.serving.triton.models.steps)
        responses = steps.execute(
            requests, self.name, [*self.names, USER_ID], self._check, lambda batch: [self._answer(r) for r in batch]
        )
        self.metrics.update()
        return responses

    def finalize(self) -> None:
        self.metrics.flush()  # the figures an unload would otherwise leave unsent
