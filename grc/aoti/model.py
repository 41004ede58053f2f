"""The export entry point: the dense jagged model with its HSTU ops as ``torch.ops.grc.*``.

``GRDense.forward_jagged`` finds each token's user with ``int(offsets[-1])`` and
``repeat_interleave``, whose sizes depend on tensor values, so ``torch.export`` cannot trace it
with a dynamic token count. ``JaggedDense`` computes the same per-token quantities from the
static token count (``searchsorted`` over the offsets) and then runs GRDense's own layers, final
norm and heads, each layer with ``impl="triton"``: the exported program holds one
``grc.hstu_attention`` and one ``grc.norm_gate`` node per layer (see ``capped_layer`` for specs
with more than 31 time buckets). The parity check compares the
compiled package with ``GRDense.forward_jagged`` itself (float64, plain reference), so the two
entry points cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from grc.aoti.inputs import JaggedInputs, random_inputs
from grc.model.gr import GRDense, token_groups
from grc.model.hstu import HSTULayer
from grc.model.kernel_ops import hstu_attention_jagged

INPUTS = ("tokens", "offsets", "num_candidates", "timestamps")
OUTPUTS = ("scores",)
MAX_USERS = 1 << 16
MAX_TOKENS = 1 << 24
KERNEL_TIME_BUCKETS = 31  # kernels.ops.MAX_KERNEL_TIME_BUCKETS (not imported: that loads triton)


def jagged_positions(offsets: torch.Tensor, num_candidates: torch.Tensor, total: int) -> tuple[torch.Tensor, ...]:
    """[T] each token's index within its user, and its user's history length (profile + history)."""
    pos = torch.arange(total, device=offsets.device)
    # user of token t = how many users end at or before t: a +1 at each user's end, prefix-summed.
    # (Not searchsorted over offsets[1:]: Inductor's CUDA bucketize read that view from its base
    # and sent every token of a 1-user batch to user 1, an out-of-bounds gather; H100, torch 2.11.)
    ends = offsets[1:]
    marks = torch.zeros(total + 1, dtype=offsets.dtype, device=offsets.device).index_add(0, ends, torch.ones_like(ends))
    user = marks.cumsum(0)[:total]
    idx = pos - offsets[:-1][user]
    n_ctx = (offsets[1:] - offsets[:-1] - num_candidates)[user]
    return idx, n_ctx


def capped_layer(
    layer: HSTULayer,
    x: torch.Tensor,
    group: torch.Tensor,
    offsets: torch.Tensor,
    num_candidates: torch.Tensor,
    timestamps: torch.Tensor,
    impl: str,
) -> torch.Tensor:
    """``HSTULayer.forward_jagged`` with the time-bias table cut to its first 31 buckets.

    The Triton kernel saturates |dt| at 2**30 s, so it is exact for NB <= 31 and the grc op falls
    back to the (per-user, looping) reference above that. The MTGR specs have NB = 32, whose last
    bucket holds |dt| >= 2**31 - 1 s (68 years), a delta no real request carries. With the table
    cut to 31 buckets such a pair would get bucket 30's bias instead; every delta under 68 years
    gives exactly the same scores, and the kernel runs. Recorded in the package metadata."""
    c = layer.cfg
    u, q, k, v = layer._project(x, group)
    a = layer.attention
    attn = hstu_attention_jagged(q, k, v, offsets, timestamps, num_candidates, a.pos_w,
                                 a.ts_w[:, :KERNEL_TIME_BUCKETS], c.scale, float(c.max_seq_len),
                                 c.history_mask == "causal", impl=impl)  # fmt: skip
    return layer._finish(x, attn, u, impl=impl)


def time_bucket_note(time_buckets: int) -> str:
    if time_buckets <= KERNEL_TIME_BUCKETS:
        return f"exact: time_buckets {time_buckets} <= {KERNEL_TIME_BUCKETS}, the kernel's exact range"
    return (
        f"time_buckets {time_buckets} > {KERNEL_TIME_BUCKETS}: the time-bias table is cut to its first "
        f"{KERNEL_TIME_BUCKETS} buckets so the Triton kernel runs; exact for |dt| < 2**31 - 1 s (68 years) "
        f"between tokens of one user, beyond that bucket {KERNEL_TIME_BUCKETS - 1} instead of the last"
    )


class JaggedDense(nn.Module):
    """tokens [T, D], offsets [B+1], num_candidates [B], timestamps [T] -> scores [T, tasks]
    (zero except at candidate tokens), exactly ``GRDense.forward_jagged``."""

    def __init__(self, dense: GRDense, impl: str = "triton"):
        super().__init__()
        self.dense = dense
        self.impl = impl

    def forward(
        self, tokens: torch.Tensor, offsets: torch.Tensor, num_candidates: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        d = self.dense
        idx, n_ctx = jagged_positions(offsets, num_candidates, tokens.shape[0])
        group = token_groups(d.cfg, idx, n_ctx)
        x = tokens
        for layer in d.hstu_layers:
            if layer.cfg.time_buckets <= KERNEL_TIME_BUCKETS:
                x = layer.forward_jagged(x, group, offsets, num_candidates, timestamps, impl=self.impl)
            else:
                x = capped_layer(layer, x, group, offsets, num_candidates, timestamps, self.impl)
        scores = d.heads(d.final_norm(x, group))
        return scores * (idx >= n_ctx).unsqueeze(-1).to(scores.dtype)


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    users = torch.export.Dim("users", min=1, max=MAX_USERS)
    tokens = torch.export.Dim("tokens", min=2, max=MAX_TOKENS)
    return {"tokens": {0: tokens}, "offsets": {0: users + 1}, "num_candidates": {0: users}, "timestamps": {0: tokens}}


def trace_inputs(dense: GRDense, device: torch.device, dtype: torch.dtype) -> JaggedInputs:
    """Two ragged users (no size 0 or 1 anywhere, so nothing is specialised into the graph)."""
    cfg = dense.cfg
    gen = torch.Generator().manual_seed(0)
    history = max(2, min(16, cfg.hstu.max_seq_len - len(cfg.profile) - 4))
    return random_inputs(cfg, 2, history, 2, gen, ragged=False).to(device, dtype)


def export_program(dense: GRDense, device: torch.device, dtype: torch.dtype) -> torch.export.ExportedProgram:
    """``torch.export`` of ``JaggedDense`` (dense cast to ``dtype`` on ``device``), dynamic users
    and tokens; the grc ops stay custom-op nodes in the program."""
    model = JaggedDense(copy.deepcopy(dense).to(device=device, dtype=dtype)).eval()
    sample = trace_inputs(dense, device, dtype)
    with torch.no_grad():
        return torch.export.export(model, sample.args(), dynamic_shapes=dynamic_shapes(), strict=False)


def custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The grc custom-op nodes (and any Triton kernel calls traced out of them) of an exported
    program, in graph order."""
    names = [
        str(n.target) if isinstance(n.target, torch._ops.OpOverload) else str(getattr(n.target, "__name__", n.target))
        for n in program.graph.nodes
        if n.op == "call_function"
    ]
    return [n for n in names if n.startswith("grc.") or "triton_kernel_wrapper" in n]
