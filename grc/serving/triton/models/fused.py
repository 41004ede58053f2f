"""fused: the whole request path of one backend in ONE python model (bundles.triton.pipeline: fused).

A thin TritonPythonModel around grc.serving.ranker.Ranker: every request of an execute() is
checked on its own (a bad one gets its own error, steps.execute), the good ones are ranked in ONE
pipeline pass (lookups, projector, dense, ranking). KIND_GPU instances run on their own GPU
(``model_instance_device_id``); on a host or interpreter without CUDA they fail at load, naming
why: there is no CPU fallback. Metrics (Triton custom metrics, label model):
grc_cuda_graph_hits_total, grc_cuda_graph_misses_total, grc_padded_tokens_total.

With bundles.triton.history_cache on, the model takes an optional ``user_id`` (INT64 [batch, 1]) and
keeps a user-history cache (grc/serving/ranker/history.py; one store per model, one instance per
model: the router history_router.py sends each user to its one) and exports the same
grc_history_cache_* metrics as the ensemble path's history_cached.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from grc.serving.common import request as rq
from grc.serving.common.history_step import USER_ID
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io
from grc.serving.triton.models.metrics import HISTORY_CACHE, Metrics

METRICS = {
    "graph_hits": ("grc_cuda_graph_hits_total", "batches of the dense step replayed in a captured CUDA graph", False),
    "graph_misses": ("grc_cuda_graph_misses_total", "batches no CUDA-graph bucket held (run eagerly, unpadded)", False),
    "padded_tokens": ("grc_padded_tokens_total", "padding tokens added to fill CUDA-graph buckets", False),
}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from grc.serving.ranker.ranker import Ranker, cuda_missing

        params = io.parameters(args)
        self.name = args["model_name"]
        gpu = args.get("model_instance_kind") == "GPU"
        if gpu and not torch.cuda.is_available():
            raise RuntimeError(cuda_missing(f"{self.name}: a KIND_GPU instance"))
        threads = int(params.get("intra_op_threads", "1"))
        if threads > 0 and not gpu:
            torch.set_num_threads(threads)
        device = f"cuda:{int(args['model_instance_device_id'])}" if gpu else "cpu"
        if gpu:
            torch.cuda.set_device(device)
        folder = Path(args["model_repository"]) / args["model_version"]
        self.ranker = Ranker.from_model_dir(folder, device, params, log=lambda m: io.log(f"{self.name}: {m}"))
        self.names = [s.name for s in rq.request_inputs(self.ranker.cfg)]
        self.metrics = Metrics(self.name, METRICS)
        self.cache_metrics = None
        if self.ranker.history is not None:  # the optional user_id input, and the cache's figures
            self.names.append(USER_ID)
            self.cache_metrics = Metrics(self.name, HISTORY_CACHE)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = steps.execute(requests, self.name, self.names, self.ranker.check, self.ranker.rank)
        self.metrics.update(self.ranker.stats())
        if self.cache_metrics is not None:
            assert self.ranker.history is not None
            self.cache_metrics.update(dataclasses.asdict(self.ranker.history.caches.cache.stats()))
        return responses
