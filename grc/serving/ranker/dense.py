"""Dense runners of the fused model: ``(tokens [T, D], offsets [B+1], num_candidates [B],
timestamps [T]) -> scores [T, tasks]`` (zero except at candidate tokens), on the model's device.

- ``aotinductor``: the aoti stage's package for the device (on CUDA loaded single-threaded, the
  runner a CUDA graph can capture: grc.aoti.runtime);
- ``pytorch``: ``GRDense.forward_padded`` in plain PyTorch, in the package dtype: the hand-written
  baseline (padded batch, no graphs, no grc kernels);
- ``pytorch_kernels``: GRDense's own layers with grc's Triton kernels, through
  ``grc.aoti.model.JaggedDense`` (the exported entry point: it derives every per-token quantity
  from the static token count, so unlike ``forward_jagged`` it never reads a size back from the
  GPU, and a CUDA graph can capture it).
On CUDA the aotinductor and pytorch_kernels runners are wrapped in ``Bucketed``: one CUDA graph per
bucket, captured at load; a batch is padded into the smallest bucket that holds it (buckets.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from grc.model.gr import GRDense
from grc.model.jagged import lengths_of, to_jagged, to_padded
from grc.serving.ranker import buckets as bk

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("aotinductor", "pytorch", "pytorch_kernels")
GRAPHED = ("aotinductor", "pytorch_kernels")  # the runners a CUDA graph can capture


@dataclass
class GraphStats:
    graph_hits: int = 0  # batches replayed in a captured graph
    graph_misses: int = 0  # batches no bucket held: run eagerly, unpadded
    padded_tokens: int = 0  # padding tokens added to fill buckets
    captures: int = 0  # graphs captured while serving (the history cache's step shapes, at first use)
    capture_s: float = 0.0  # host seconds those captures took: the instance stalls for them
    capture_warmup_s: float = 0.0  # of which the eager runs before each capture
    capture_first_run_s: float = 0.0  # of which the first of them (new shapes' first allocations, compiles)
    capture_wait_s: float = 0.0  # before them, waiting for the work queued earlier (not in capture_s)
    # what the captures did on their way (kernels.tuning.jit_state, torch.cuda.memory_stats' num_device_alloc):
    capture_compiles: int = 0  # Triton kernel variants compiled or loaded
    capture_tunings: int = 0  # autotuning keys tuned
    capture_device_allocs: int = 0  # the caching allocator's cudaMalloc calls


# the captures' figures beyond their count: exported as graph_<name> (Ranker.stats), diffed by the benches
CAPTURE_FIGURES = tuple(f.name for f in fields(GraphStats) if f.name.startswith("capture_"))


def aotinductor(package: Path, device: torch.device) -> Runner:
    from grc.aoti.runtime import load

    return load(package, device, single_threaded=device.type == "cuda")


def pytorch(dense: GRDense) -> Runner:
    """forward_padded on the padded batch (as long as its longest user): what a team writes by hand."""

    def run(
        tokens: torch.Tensor, offsets: torch.Tensor, num_candidates: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        lengths = lengths_of(offsets)
        longest = int(lengths.max())  # a device sync: the baseline pays it, as hand-written code does
        scores = dense.forward_padded(
            to_padded(tokens, offsets, longest), lengths, num_candidates, to_padded(timestamps, offsets, longest)
        )
        return to_jagged(scores, offsets)

    return run


def pytorch_kernels(dense: GRDense) -> Runner:
    from grc.aoti.model import JaggedDense

    return JaggedDense(dense, impl="triton").eval()


class Bucketed:
    """``fn`` run in the smallest bucket of ``plan`` that holds the batch, padded (buckets.pad); with
    ``graphs`` each bucket's CUDA graph is captured here, at load, and replayed. A batch no bucket
    holds runs unpadded and eagerly, counted as a miss. Returns the real tokens' scores only."""

    def __init__(
        self,
        fn: Runner,
        plan: list[bk.Bucket],
        max_seq_len: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        graphs: bool,
        stats: GraphStats,
    ):
        self.fn, self.plan, self.max_seq_len, self.stats = fn, sorted(plan), max_seq_len, stats
        self.graphs = None
        if graphs:
            from grc.aoti.runtime import CudaGraphRunner

            self.graphs = CudaGraphRunner(fn, max_graphs=max(1, len(self.plan)))
            for bucket in self.plan:  # an all-padding batch of the bucket's shape (values do not matter)
                empty = (torch.zeros(0, width, dtype=dtype, device=device), torch.zeros(1, dtype=torch.int64,
                         device=device), torch.zeros(0, dtype=torch.int64, device=device),
                         torch.zeros(0, dtype=torch.int64, device=device))  # fmt: skip
                self.graphs.capture(*bk.pad(bucket, max_seq_len, *empty))
            torch.cuda.synchronize(device)

    def __call__(
        self, tokens: torch.Tensor, offsets: torch.Tensor, num_candidates: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        total, users = tokens.shape[0], num_candidates.shape[0]
        bucket = bk.choose(self.plan, users, total, self.max_seq_len)
        if bucket is None:
            self.stats.graph_misses += 1
            return self.fn(tokens, offsets, num_candidates, timestamps)
        padded = bk.pad(bucket, self.max_seq_len, tokens, offsets, num_candidates, timestamps)
        self.stats.padded_tokens += bucket.tokens - total
        if self.graphs is None:
            return self.fn(*padded)[:total]
        self.stats.graph_hits += 1
        return self.graphs(*padded)[:total]
