"""fused: the whole request path of one backend in ONE python model (bundles.triton.pipeline: fused).

A thin TritonPythonModel around grc.serving.ranker.Ranker: the requests of an execute() are
checked together (Ranker.check_all), a bad one getting its own error (steps.execute), and the good ones
are ranked in ONE pipeline pass (lookups, projector, dense, ranking). KIND_GPU instances run on their own GPU
(``model_instance_device_id``); on a host or interpreter without CUDA they fail at load, naming
why: there is no CPU fallback. Metrics (Triton custom metrics, label model):
grc_cuda_graph_hits_total, grc_cuda_graph_misses_total, grc_padded_tokens_total, grc_cuda_graph_captures_total and
grc_cuda_graph_capture_seconds_total (graphs captured while serving: the cached step's shapes at first use),
grc_dense_device_seconds_total (CUDA events), and the host seconds of each phase of execute() (phases.py):
grc_phase_<read|check|layout|upload|embed|dense|fetch|rank|respond|metrics>_seconds_total.
Triton's compute_infer minus their sum is what the python backend itself spends around execute() (requests in,
responses out).

With bundles.triton.history_cache on, the model takes an optional ``user_id`` (INT64 [batch, 1]) and
keeps a user-history cache (grc/serving/ranker/history.py; one store per model, one instance per
model: the router history_router.py sends each user to its one) and exports the same
grc_history_cache_* metrics as the ensemble path's history_cached.py (metrics.HistoryCacheMetrics: the store's,
and the arena's where the store keeps its entries there), sent at most every metrics.HISTORY_CACHE_EVERY_S.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grc.serving.common import request as rq
from grc.serving.common.history_step import USER_ID
from grc.serving.ranker.phases import PHASES
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io
from grc.serving.triton.models.host import set_host_threads
from grc.serving.triton.models.metrics import HistoryCacheMetrics, Metrics
from grc.serving.triton.models.trace import ExecuteTrace

METRICS = {
    "graph_hits": ("grc_cuda_graph_hits_total", "batches of the dense step replayed in a captured CUDA graph", False),
    "graph_misses": ("grc_cuda_graph_misses_total", "batches no CUDA-graph bucket held (run eagerly, unpadded)", False),
    "padded_tokens": ("grc_padded_tokens_total", "padding tokens added to fill CUDA-graph buckets", False),
    "graph_captures": (
        "grc_cuda_graph_captures_total",
        "CUDA graphs captured while serving (a cached step's new shape)",
        False,
    ),
    "graph_capture_s": (
        "grc_cuda_graph_capture_seconds_total",
        "host seconds of those captures (the instance waits)",
        False,
    ),
    "graph_capture_warmup_s": (
        "grc_cuda_graph_capture_warmup_seconds_total",
        "of which the eager runs before each capture",
        False,
    ),
    "graph_capture_first_run_s": (
        "grc_cuda_graph_capture_first_run_seconds_total",
        "of which the first of those runs",
        False,
    ),
    "graph_capture_wait_s": (
        "grc_cuda_graph_capture_wait_seconds_total",
        "host seconds waiting for queued work before each capture's runs (not in the capture seconds)",
        False,
    ),
    "graph_capture_compiles": (
        "grc_cuda_graph_capture_compiles_total",
        "Triton kernel variants compiled or loaded during the captures",
        False,
    ),
    "graph_capture_tunings": ("grc_cuda_graph_capture_tunings_total", "autotuning keys tuned during them", False),
    "graph_capture_device_allocs": (
        "grc_cuda_graph_capture_device_allocs_total",
        "device allocations (cudaMalloc) the caching allocator made during them",
        False,
    ),
}
# phase -> its counter of host seconds (phases.py says what each phase holds); sent together, at most every
# PHASE_EVERY_S (metrics.py), with the count of execute() calls they cover: a reader divides by that count
PHASE_METRICS = {
    phase: (f"grc_phase_{phase}_seconds_total", f"host seconds in execute(): {what}", False)
    for phase, what in PHASES.items()
} | {
    "executes": ("grc_phase_executes_total", "execute() calls the grc_phase_* counters cover so far", False),
    "dense_device_s": ("grc_dense_device_seconds_total", "device time of the dense step (CUDA events)", False),
}
# two counter changes per execute() (graph hits, padded tokens) cost 0.46 ms of a 10.4 ms execute at concurrency 32
# on the H200 (serve-h200-mtgr-small-gpu.json, session 7): the graph counters wait as the phases do, misses excepted
PHASE_EVERY_S = 0.25


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from grc.serving.ranker.ranker import Ranker, cuda_missing

        params = io.parameters(args)
        self.name = args["model_name"]
        gpu = args.get("model_instance_kind") == "GPU"
        if gpu and not torch.cuda.is_available():
            raise RuntimeError(cuda_missing(f"{self.name}: a KIND_GPU instance"))
        set_host_threads(params)
        device = f"cuda:{int(args['model_instance_device_id'])}" if gpu else "cpu"
        if gpu:
            torch.cuda.set_device(device)
        folder = Path(args["model_repository"]) / args["model_version"]
        self.ranker = Ranker.from_model_dir(folder, device, params, log=lambda m: io.log(f"{self.name}: {m}"))
        self.names = [s.name for s in rq.request_inputs(self.ranker.cfg)]
        self.metrics = Metrics(self.name, METRICS, every_s=PHASE_EVERY_S, urgent=frozenset({"graph_misses"}))
        self.phase_metrics = Metrics(self.name, PHASE_METRICS, every_s=PHASE_EVERY_S)
        self.executes = 0
        self.trace = ExecuteTrace(self.name)  # off unless GRC_TRACE_DIR is set (trace.py)
        self.cache_metrics = None
        if self.ranker.history is not None:  # the optional user_id input, and the cache's figures
            self.names.append(USER_ID)
            self.cache_metrics = HistoryCacheMetrics(self.name, self.ranker.history.caches)

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.trace.folder is None:
            return self._execute(requests)
        keyed = self.cache_metrics is not None and any(io.read(r, USER_ID) is not None for r in requests)
        return self.trace.run("cached" if keyed else "plain", self._execute, requests)

    def _execute(self, requests: list[Any]) -> list[Any]:
        ranker = self.ranker
        responses = steps.execute(
            requests, self.name, self.names, ranker.check, ranker.rank, ranker.clock, check_all=ranker.check_all
        )
        ranker.clock.start()
        stats = ranker.stats()
        self.metrics.update(stats)
        self.executes += 1  # this execute's "metrics" phase is sent with a later one
        timing = {**ranker.clock.seconds, "executes": self.executes, "dense_device_s": stats["dense_device_us"] / 1e6}
        self.phase_metrics.update(timing)
        if self.cache_metrics is not None:
            self.cache_metrics.update()
        ranker.clock.lap("metrics")
        return responses

    def finalize(self) -> None:
        if self.cache_metrics is not None:  # the figures an unload would otherwise leave unsent
            self.cache_metrics.flush()
        self.trace.flush()
        history = self.ranker.history
        graphed = None if history is None else history.caches.graphed
        if graphed is not None:  # each capture of the cached step
            self.trace.write_json("captures", list(graphed.capture_log))
