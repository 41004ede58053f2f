"""The model's tail in one Triton kernel: final group LayerNorm, the task heads' two layers and the
sigmoid, computed only for row blocks that hold a candidate token, with a PyTorch twin.

    candidate_heads(x, group, is_candidate, gamma, beta, w1, b1, w2, b2)[t, task]
        = sigmoid(SiLU(GroupLN(x)[t] w1[task] + b1[task]) . w2[task] + b2[task])   if is_candidate[t]
        = 0                                                                       otherwise

Only candidate rows are scored, but gathering them first gives a row count that depends on the
data, which a CUDA graph cannot replay and an exported program can only hold as an unbacked size
(a device-to-host sync per call). Instead the grid covers all rows and a program whose BLOCK_M rows
hold no candidate writes zeros and skips the norm and both matmuls: candidates are each user's
last rows, so nearly every block is all-candidate or candidate-free and the heads' work follows
the candidate count. The norm is the GEMM prologue of kernels/fused_linear.py (one helper);
the hidden layer never leaves registers (one program per row block and task holds all its units).
Importing this module registers ``torch.ops.grc.candidate_heads`` (Triton on CUDA, the twin elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# called jit functions keep their def names (Inductor re-emits them under those)
from kernels.fused_linear import (
    INTERPRET,
    _round_to_bf16,
    check_supported,
    dot_settings,
    group_norm_reference,
    normed_dot,
    row_stats,
)
from kernels.ops import runs_kernel
from kernels.reference import compute_dtype


# fmt: off
@triton.jit(do_not_specialize=["M"])  # rows vary per call: one compile for all (see hstu_attention.NOT_SPECIALISED)
def _candidate_heads_kernel(X, Stats, G, Gamma, Beta, Cand, W1, B1, W2, B2, Y, M,
                            stride_x, stride_g, stride_w1t, stride_w1k, stride_w1h, stride_y,
                            K: tl.constexpr, HIDDEN: tl.constexpr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr,
                            EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """Scores of BLOCK_M rows (axis 0) for one task (axis 1)."""
    task = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    cand = tl.load(Cand + rows, mask=row_ok, other=0) != 0
    score = tl.zeros([BLOCK_M], dtype=tl.float32)
    if tl.max(cand.to(tl.int32), axis=0) > 0:  # a block without candidates skips all the work
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < HIDDEN
        acc = normed_dot(X, Stats, G, Gamma, Beta, X, W1 + task * stride_w1t, rows, row_ok, offs_h, h_ok,
                         stride_x, stride_g, 0, stride_w1h, stride_w1k, K, 0, OPERAND, DOT_PREC, EVEN_K,
                         BLOCK_M, BLOCK_H, BLOCK_K)
        hidden = acc + tl.load(B1 + task * HIDDEN + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        hidden = hidden * tl.sigmoid(hidden)
        w2 = tl.load(W2 + task * HIDDEN + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        logit = tl.sum(hidden * w2[None, :], axis=1) + tl.load(B2 + task).to(tl.float32)
        score = tl.where(cand, tl.sigmoid(logit), 0.0)
    if OPERAND == 1:
        score = _round_to_bf16(score)
    tl.store(Y + rows * stride_y + task, score.to(Y.dtype.element_ty), mask=row_ok)
# fmt: on


def candidate_heads_triton(
    x: torch.Tensor,
    group: torch.Tensor,
    is_candidate: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
    wrap: Callable[[Any], Any] = lambda kernel: kernel,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch on x [T, D] -> [T, tasks] in x's dtype (w1 [tasks, D, hidden] as TaskHeads holds it)."""
    check_supported(x, w1[0].t())
    tasks, _, hidden = w1.shape
    rows = x.shape[0]
    if out is None:
        out = torch.empty((rows, tasks), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    stats = row_stats(x2, eps, wrap)
    cand = is_candidate.reshape(-1).to(torch.int8)
    operand, dot_prec, block_k = dot_settings(x.dtype)
    block_h = max(16, triton.next_power_of_2(hidden))
    block_m = 16 if INTERPRET else 64
    wrap(_candidate_heads_kernel)[(triton.cdiv(rows, block_m), tasks)](
        x2, stats, group.reshape(-1), gamma.contiguous(), beta.contiguous(), cand, w1, b1.contiguous(),
        w2.contiguous(), b2.contiguous(), out, rows,
        x2.stride(0), group.reshape(-1).stride(0), w1.stride(0), w1.stride(1), w1.stride(2), out.stride(0),
        K=x.shape[1], HIDDEN=hidden, OPERAND=operand, DOT_PREC=dot_prec, EVEN_K=x.shape[1] % block_k == 0,
        BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_K=block_k,
        num_warps=1 if INTERPRET else (4 if block_h <= 128 else 8), num_stages=1 if INTERPRET else 3,
    )  # fmt: skip
    return out


def candidate_heads_reference(
    x: torch.Tensor,
    group: torch.Tensor,
    is_candidate: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The twin: every row scored (row-wise math: the same values a gather would give), the
    normalised x rounded to x's dtype, the rest in float32 (float64 for float64 x), then masked."""
    cdt = compute_dtype(x.dtype)
    xh = group_norm_reference(x, group, gamma, beta, eps)
    hidden = F.silu(torch.einsum("nd,tdh->nth", xh.to(x.dtype).to(cdt), w1.to(cdt)) + b1.to(cdt))
    scores = torch.sigmoid((hidden * w2.to(cdt)).sum(-1) + b2.to(cdt))
    return torch.where(is_candidate.reshape(-1, 1), scores, torch.zeros((), dtype=cdt, device=x.device)).to(x.dtype)


@triton_op("grc::candidate_heads", mutates_args=())
def candidate_heads(
    x: torch.Tensor,
    group: torch.Tensor,
    is_candidate: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """[T, tasks] scores in x's dtype, zero off the candidate rows."""
    args = (x, group, is_candidate, gamma, beta, w1, b1, w2, b2, eps)
    if not runs_kernel(x):
        return candidate_heads_reference(*args)
    return candidate_heads_triton(*args, wrap=wrap_triton)
