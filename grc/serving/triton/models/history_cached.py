"""The history-cached model: the whole request path in one python model, holding the user-history
cache (grc/serving/common/history_cache.py) and running the dense step through ``GRDense.score``.

Why one model and not an ensemble step: the cache must see the request's raw ids and timestamps
(to match the cached prefix) and its user_id, and Triton ensembles cannot pass an optional
input on. Each such model is one instance, one store: with ``history_cache.instances`` > 1 a
router (history_router.py) sends each user to the same one. Steps: check the request
(preprocess.parse), look the user up, project only the tokens the cache does not hold, score them
against the cached K/V, store the extended entry, rank (postprocess.rank). A request without
``user_id`` is computed whole and caches nothing.

Metrics (Triton custom metrics, on the server's metrics port): grc_history_cache_hits_total,
grc_history_cache_misses_total, grc_history_cache_evictions_total (counters) and
grc_history_cache_bytes (gauge), labelled with the model name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grc.model.kv_cache import UserKV
from grc.serving.common import request as rq
from grc.serving.common.history_cache import (
    CachedHistory,
    HistoryCache,
    cached_history,
    miss_reason,
    model_namespace,
    reusable_events,
)
from grc.serving.common.validate import RequestError, parse
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io
from grc.serving.triton.models.postprocess import rank
from grc.serving.triton.models.preprocess import project
from grc.spec.schema import ModelConfig

if TYPE_CHECKING:
    import torch

USER_ID = "user_id"
METRICS = {
    "hits": ("grc_history_cache_hits_total", "requests (users) served from the history cache"),
    "misses": ("grc_history_cache_misses_total", "users with user_id whose history had to be computed whole"),
    "evictions": ("grc_history_cache_evictions_total", "entries evicted to stay within the byte budget"),
    "bytes": ("grc_history_cache_bytes", "bytes of cached K/V and ids held"),
}


def user_events(checked: dict[str, np.ndarray], cfg: ModelConfig, u: int) -> tuple[np.ndarray, np.ndarray]:
    """User ``u``'s profile ids [P] and events [h, history tables + 1] (ids, then timestamp)."""
    profile = np.array([checked[rq.profile_input(t)][u, 0] for t in cfg.profile], np.int64)
    columns = [checked[rq.history_input(t)][u] for t in cfg.history] + [checked[rq.HISTORY_TIME][u]]
    return profile, np.stack(columns, 1).astype(np.int64)


def user_request(checked: dict[str, np.ndarray], cfg: ModelConfig, u: int, skip_events: int) -> dict[str, np.ndarray]:
    """User ``u`` alone (batch 1), without its first ``skip_events`` history events."""
    history = {rq.history_input(t) for t in cfg.history} | {rq.HISTORY_TIME}
    return {name: a[u : u + 1, skip_events:] if name in history else a[u : u + 1] for name, a in checked.items()}


DTYPES = ("float32", "bfloat16")


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
    budget counts device bytes) and attention runs grc's Triton kernels (impl "triton"); the
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
    ):
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
        self.cache = HistoryCache(budget, max_user)
        self.namespace = model_namespace(cfg.model_dump_json(), weights_digest, dtype)

    def _lookup(self, user: int, ids: np.ndarray, events: np.ndarray, now: int) -> tuple[UserKV | None, int]:
        """The user's reusable cache (its rows still exact at ``now``) and how many events it holds;
        (None, 0) on a miss."""
        buckets = self.cfg.hstu.time_buckets

        def usable(entry: CachedHistory) -> bool:
            return miss_reason(entry, ids, events, now, buckets) is None

        found = self.cache.lookup((self.namespace, user), usable)
        if found is None:
            return None, 0
        reused = reusable_events(found, now, buckets)
        return found.kv.prefix(found.kv.profile + reused), reused

    def score(self, checked: dict[str, np.ndarray], users: np.ndarray | None) -> np.ndarray:
        """One checked request of b users -> candidate scores [b, c, tasks]; ``users``: their ids
        (None: cache nothing)."""
        import torch

        cfg, profile = self.cfg, len(self.cfg.profile)
        b = checked[rq.REQUEST_TIME].shape[0]
        parts, caches, seen = [], [], []
        for u in range(b):
            ids, events = user_events(checked, cfg, u)
            now = int(checked[rq.REQUEST_TIME][u, 0])
            kv, reused = (None, 0) if users is None else self._lookup(int(users[u]), ids, events, now)
            seen.append((ids, events, now))
            parts.append(user_request(checked, cfg, u, reused))
            caches.append(kv)
        projected = project(parts, self.projector, self.tables, cfg)
        tokens, stamps, offsets, cands = [], [], [0], []
        kvs = []
        for p, kv in zip(projected, caches, strict=True):
            drop = profile if kv is not None else 0  # a hit holds the profile tokens already
            tokens.append(torch.from_numpy(p["tokens"][0, drop:]))
            stamps.append(torch.from_numpy(p["timestamps"][0, drop:]))
            offsets.append(offsets[-1] + tokens[-1].shape[0])
            cands.append(int(p["num_candidates"][0, 0]))
            kvs.append(kv if kv is not None else self.dense.empty_cache(profile, self.dense.heads.w1))
        device, dtype = self.device, self.dtype
        with torch.no_grad():
            scores, grown = self.dense.score(
                kvs,
                torch.cat(tokens).to(device, dtype),
                torch.tensor(offsets),  # host integers: score reads them without a device sync
                torch.tensor(cands),
                torch.cat(stamps).to(device),
                [now for _, _, now in seen],
                self.impl,
            )
        if users is not None:
            for u, (ids, events, _) in enumerate(seen):
                self.cache.store((self.namespace, int(users[u])), cached_history(grown[u], ids, events))
        return scores.float().cpu().numpy().reshape(b, -1, len(cfg.tasks))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        params = io.parameters(args)
        self.name = args["model_name"]
        self.cfg = ModelConfig.model_validate_json(params["grc_model"])
        self.truncate = params.get("truncate_history", "true") == "true"
        self.weights = np.asarray(json.loads(params["rank_weights"]), dtype=np.float32)
        self.top_k = int(params["top_k"])
        threads = int(params.get("intra_op_threads", "1"))
        gpu = args.get("model_instance_kind") == "GPU"
        if threads > 0 and not gpu:
            torch.set_num_threads(threads)
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
        )
        self.names = [s.name for s in rq.request_inputs(self.cfg)]
        self.first = rq.candidate_input(self.cfg.candidate[0])
        self._metrics_init()

    def _metrics_init(self) -> None:
        pb = io.pb()
        labels = {"model": self.name}
        self.metrics = {}
        self.families = []  # a Metric needs its MetricFamily alive
        for key, (name, description) in METRICS.items():
            kind = pb.MetricFamily.GAUGE if key == "bytes" else pb.MetricFamily.COUNTER
            family = pb.MetricFamily(name=name, description=description, kind=kind)
            self.families.append(family)
            self.metrics[key] = family.Metric(labels=labels)
        self.reported = {"hits": 0, "misses": 0, "evictions": 0}

    def _metrics_update(self) -> None:
        stats = self.scorer.cache.stats()
        for key in self.reported:
            value = getattr(stats, key)
            if value > self.reported[key]:
                self.metrics[key].increment(value - self.reported[key])
                self.reported[key] = value
        self.metrics["bytes"].set(stats.bytes)

    def _check(self, arrays: dict[str, np.ndarray | None]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """One request's checked inputs and its user ids (None: cache nothing); RequestError refuses it."""
        users = arrays.pop(USER_ID)
        checked = parse(arrays, self.cfg, self.truncate)
        b = checked[rq.REQUEST_TIME].shape[0]
        if users is not None and (users.shape != (b, 1) or users.dtype != np.int64):
            raise RequestError(
                f"{USER_ID}: expected INT64 [{b}, 1], one id per user (got {users.dtype} {list(users.shape)})"
            )
        return checked, None if users is None else users.reshape(-1).copy()

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
        self._metrics_update()
        return responses
