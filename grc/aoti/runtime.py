"""Load and run an AOTInductor package of the dense model.

``load`` imports ``kernels`` first: on CPU the package calls the ``grc`` reference ops through
the dispatcher, so they must be registered in the process (on CUDA the Triton kernels are
compiled into the package). ``CudaGraphRunner`` replays one captured CUDA graph per distinct
input shape (users, tokens): the package's launches then cost one graph launch. Capture a package
loaded with ``single_threaded=True``: with AOTInductor's default runner (container lock, event
waits) the capture failed on an H200 ("operation failed due to a previous error during capture");
through the single-threaded one it replays right (bench/results/e2e-notes.md, session 3).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Runner = Callable[..., Any]


def load(path: str | Path, device: str | torch.device = "cpu", single_threaded: bool = False) -> Runner:
    """The compiled model: ``runner(tokens, offsets, num_candidates, timestamps) -> scores``.
    single_threaded: AOTInductor's ``run_single_threaded`` (no container lock or event waits)."""
    import kernels  # noqa: F401  registers torch.ops.grc.* (the CPU package calls them)

    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else -1)
    compiled = torch._inductor.aoti_load_package(str(path), run_single_threaded=single_threaded, device_index=index)

    def run(*args: torch.Tensor) -> torch.Tensor:
        out = compiled(*args)
        return out[0] if isinstance(out, (list, tuple)) else out

    return run


def capture_graph(
    fn: Runner,
    static: list[Any],
    pool: Any,
    warmup: int = 2,
    seconds: dict[str, float] | None = None,
    free_memory: bool = True,
    streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn(*static)`` captured in a CUDA graph (memory from ``pool``) after ``warmup`` runs on a side stream
    (where Triton compiles and autotunes, and lazy allocations happen outside the capture). Returns the graph and
    its output: replaying recomputes the output in place from whatever the ``static`` buffers then hold.
    ``seconds``: gets host seconds added: waiting for the work queued before ("wait"), the warm-up runs ("warmup"),
    the first of them ("first_run") and the capture ("capture").

    free_memory: as ``torch.cuda.graph``, which synchronizes and releases the caching allocators' free blocks
    (device, and pinned host) before it captures. False captures without that (``CUDAGraph.capture_begin`` on a
    side stream after the work queued before it): a server capturing a new shape between requests keeps its
    cached blocks, where a release means a cudaFree per block now and a fresh allocation for each later. (Served at
    16 clients a capture took ~140 ms on the H200 with or without the release: the first eager run of a new shape
    is that cost, not the release; session 13.) The caller then owns one rule
    ``torch.cuda.graph``'s release hid: a shared ``pool`` must still be held by a live graph when another capture
    joins it. A pool whose graphs are all gone keeps use count 0 until a release frees it, and a capture joining
    it fails ("it->second->use_count > 0 INTERNAL ASSERT FAILED", every served cached request of session 12's
    first attempt): take a fresh ``torch.cuda.graph_pool_handle()`` then (ScoreGraphs._capture_pool).

    streams: the (warm-up, capture) side streams, for a caller that captures again and again: the caching allocator
    keeps freed blocks per stream, so warm-up runs on a stream of their own reuse what the last capture's freed
    (default: new streams from torch's pool, which cycles through 32; the capture with free_memory uses
    torch.cuda.graph's own capture stream)."""
    queued = time.perf_counter()
    torch.cuda.current_stream().synchronize()  # the work queued before: timed apart from the warm-up ("wait")
    started = first = time.perf_counter()
    stream, capture = streams or (torch.cuda.Stream(), torch.cuda.Stream())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for run in range(warmup):
            fn(*static)
            if run == 0:
                first = time.perf_counter()
    torch.cuda.current_stream().wait_stream(stream)
    warm = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    if free_memory:
        with torch.cuda.graph(graph, pool=pool):
            out = fn(*static)
    else:
        capture.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture):
            graph.capture_begin(pool)
            try:
                out = fn(*static)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(capture)
    if seconds is not None:
        for key, value in (("wait", started - queued), ("first_run", first - started), ("warmup", warm - started),
                           ("capture", time.perf_counter() - warm)):  # fmt: skip
            seconds[key] = seconds.get(key, 0.0) + value
    return graph, out


class CudaGraphRunner:
    """Replays a CUDA graph of ``fn`` per input-shape signature (at most ``max_graphs``, least
    recently used dropped). Inputs are copied into the graph's static buffers; the returned
    tensor is the graph's static output (copy it before the next call if you keep it)."""

    def __init__(self, fn: Runner, max_graphs: int = 16, warmup: int = 2):
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def _key(args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        return tuple((tuple(a.shape), a.dtype, a.device) for a in args)

    def capture(self, *args: torch.Tensor, clone: bool = True) -> None:
        """The graph of these inputs' shapes, reading copies of them (``clone``), or the tensors themselves: a caller
        that writes its inputs into those buffers before each call then has nothing copied."""
        static = [a.clone() if clone else a for a in args]
        graph, out = capture_graph(self.fn, static, self.pool, self.warmup)
        self.graphs[self._key(args)] = (graph, static, out)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def __call__(self, *args: torch.Tensor) -> Any:
        key = self._key(args)
        if key not in self.graphs:
            self.capture(*args)
        self.graphs.move_to_end(key)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, args, strict=True):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src, non_blocking=True)
        graph.replay()
        return out
