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

import numpy as np
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
    holds runs unpadded and eagerly, counted as a miss. Returns the real tokens' scores only.

    Every bucket reads its inputs from two buffers all buckets share (one batch runs at a time, in stream order):
    ``rows`` [most tokens, D] and ``ints`` (offsets, num_candidates, timestamps at buckets.ints_spans: the bucket's
    sizes, each 16-byte aligned). The fused Ranker fills them itself (``run_padded``: the padded ints made on the
    host come with the batch's one upload, one copy puts them in place, the tokens are cast into ``rows``), where a
    batch padded on the device was ~12 small launches and the graph's four input copies. The pad rows of ``rows``
    keep whatever an earlier batch left there (finite values: the graph's all-padding batch, or tokens): a pad
    user's tokens are all candidates, each attending to itself alone, and every other step is row-wise, so no real
    row ever reads them."""

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
        self.rows = torch.zeros(max(b.tokens for b in plan), width, dtype=dtype, device=device)
        self.ints = torch.zeros(max(bk.ints_length(b) for b in plan), dtype=torch.int64, device=device)
        self.graphs = None
        if graphs:
            from grc.aoti.runtime import CudaGraphRunner

            self.graphs = CudaGraphRunner(fn, max_graphs=max(1, len(self.plan)))
            empty = np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
            for bucket in self.plan:  # an all-padding batch of the bucket's shape (the token values do not matter)
                self.ints[: bk.ints_length(bucket)].copy_(torch.from_numpy(bk.padded_ints(bucket, max_seq_len, *empty)))
                self.graphs.capture(*self.inputs(bucket), clone=False)
            torch.cuda.synchronize(device)

    def choose(self, users: int, tokens: int) -> bk.Bucket | None:
        """The bucket a batch of ``users`` and ``tokens`` runs in (None: none holds it)."""
        return bk.choose(self.plan, users, tokens, self.max_seq_len)

    def inputs(self, bucket: bk.Bucket) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bucket's inputs (tokens, offsets, num_candidates, timestamps): views of the shared buffers."""
        (o, n_o), (c, n_c), (t, n_t) = bk.ints_spans(bucket)
        return self.rows[:n_t], self.ints[o : o + n_o], self.ints[c : c + n_c], self.ints[t : t + n_t]

    def run_padded(self, bucket: bk.Bucket, padded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """A batch the host padded (layout.build with ``choose``): ``padded`` buckets.padded_ints on the device,
        ``tokens`` [T, D] the real tokens (any float dtype: cast as they are copied; or ``rows[:T]`` itself) -> the
        real tokens' scores."""
        total = tokens.shape[0]
        self.ints[: padded.shape[0]].copy_(padded)
        if tokens.data_ptr() != self.rows.data_ptr():  # (tokens projected into ``rows`` already stay)
            self.rows[:total].copy_(tokens)
        return self._run(bucket, total)

    def _run(self, bucket: bk.Bucket, total: int) -> torch.Tensor:
        """The bucket's graph replayed on the shared buffers (without graphs: ``fn`` on them) -> the first ``total``
        tokens' scores, the padding counted."""
        self.stats.padded_tokens += bucket.tokens - total
        args = self.inputs(bucket)
        if self.graphs is None:
            return self.fn(*args)[:total]
        self.stats.graph_hits += 1
        return self.graphs(*args)[:total]  # the inputs are the graph's own buffers: nothing copied

    def __call__(
        self, tokens: torch.Tensor, offsets: torch.Tensor, num_candidates: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        """A batch on the device, padded there (buckets.pad) into the shared buffers."""
        total, users = tokens.shape[0], num_candidates.shape[0]
        bucket = self.choose(users, total)
        if bucket is None:
            self.stats.graph_misses += 1
            return self.fn(tokens, offsets, num_candidates, timestamps)
        for dst, src in zip(self.inputs(bucket), bk.pad(bucket, self.max_seq_len, tokens, offsets, num_candidates,
                                                          timestamps), strict=True):  # fmt: skip
            dst.copy_(src)
        return self._run(bucket, total)
