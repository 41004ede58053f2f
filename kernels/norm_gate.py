"""Triton kernel for y = LayerNorm(a) * u over the last dim: one pass over memory.

Unfused it is three passes (layer_norm reads a and writes y0; the product reads y0 and u and
writes y). Here each program loads whole rows of a and u once, keeps them in registers, and
writes y once: 3 tensors' worth of traffic instead of 5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.hstu_attention import INTERPRET, _round_to_bf16


@triton.jit(do_not_specialize=["rows"])  # rows vary per call: one compile for all (hstu_attention.NOT_SPECIALISED)
def _norm_gate_kernel(
    A,
    U,
    W,
    Bias,
    Y,
    rows,
    stride_a,
    stride_u,
    stride_y,
    eps,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    SILU_U: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_r < rows
    col_ok = offs_c < C
    mask = row_ok[:, None] & col_ok[None, :]
    rr = offs_r[:, None].to(tl.int64)  # rows * stride can pass 2**31
    a = tl.load(A + rr * stride_a + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rr * stride_u + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU_U:  # u is the UVQK projection's raw output (a compiled model skips that SiLU pass); rounded as u would be
        u = u / (1.0 + tl.exp(-u))
        if ROUND_BF16:
            u = _round_to_bf16(u)
        u = u.to(U.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs_c, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(Bias + offs_c, mask=col_ok, other=0.0).to(tl.float32)
    mean = tl.sum(a, axis=1) / C
    centred = tl.where(mask, a - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C  # two-pass variance: no cancellation
    rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))  # eps may arrive as fp64 from Inductor (see hstu_attention)
    y = (centred * rstd[:, None] * w[None, :] + b[None, :]) * u
    if ROUND_BF16:  # interpreter only: its fp32->bf16 cast truncates; round to nearest first
        y = _round_to_bf16(y)
    tl.store(Y + rr * stride_y + offs_c[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _launch_shape(channels: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): ~4k elements a program, enough rows in flight per SM."""
    block_c = max(16, triton.next_power_of_2(channels))
    block_r = max(1, min(64, 4096 // block_c))
    warps = 1 if INTERPRET else (4 if block_c * block_r <= 4096 else 8)
    return block_r, block_c, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def norm_gate_triton(
    a: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    wrap: Callable[[Any], Any] = lambda kernel: kernel,
    out: torch.Tensor | None = None,
    silu_u: bool = False,
) -> torch.Tensor:
    """Launch the kernel on [..., C] inputs; ``wrap`` is torch.library.wrap_triton in the op,
    ``out`` (optional, contiguous, a's shape and dtype) lets tests pass a poisoned buffer; silu_u: u is the
    projection's output before SiLU, applied here (grc.model.hstu.CONSUMER_SILU)."""
    channels = a.shape[-1]
    a2, u2 = _rows(a), _rows(u)
    if out is None:
        out = torch.empty(a2.shape, dtype=a.dtype, device=a.device)
    out = out.view(a2.shape)
    rows = a2.shape[0]
    if rows == 0:
        return out.view(a.shape)
    block_r, block_c, warps = _launch_shape(channels)
    wrap(_norm_gate_kernel)[(triton.cdiv(rows, block_r),)](
        a2,
        u2,
        weight.contiguous(),
        bias.contiguous(),
        out,
        rows,
        a2.stride(0),
        u2.stride(0),
        out.stride(0),
        float(eps),
        C=channels,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        ROUND_BF16=INTERPRET and a.dtype == torch.bfloat16,
        SILU_U=bool(silu_u),
        num_warps=warps,
    )
    return out.view(a.shape)
