"""Triton kernels for y = LayerNorm(a) * u over the last dim, and for the group LayerNorm (each row's scale and shift
from its token kind): one pass over memory each.

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


@triton.jit
def _row_tile(rows, C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program's tile of a [rows, C] tensor: (its rows' int64 indices as a column, its columns, row mask, column
    mask, load/store mask)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_r < rows
    col_ok = offs_c < C
    rr = offs_r[:, None].to(tl.int64)  # rows * stride can pass 2**31
    return rr, offs_c, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _normed(a, mask, eps, C: tl.constexpr):
    """Rows of ``a`` (float32, zero outside ``mask``) centred and times 1/std. Two-pass variance: no cancellation."""
    mean = tl.sum(a, axis=1) / C
    centred = tl.where(mask, a - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))  # eps may arrive as fp64 from Inductor (see hstu_attention)
    return centred * rstd[:, None]


@triton.jit
def _store_rows(Y, y, rr, offs_c, stride_y, mask, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:  # interpreter only: its fp32->bf16 cast truncates; round to nearest first
        y = _round_to_bf16(y)
    tl.store(Y + rr * stride_y + offs_c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# fmt: off
@triton.jit(do_not_specialize=["rows"])  # rows vary per call: one compile for all (hstu_attention.NOT_SPECIALISED)
def _norm_gate_kernel(A, U, W, Bias, Y, rows, stride_a, stride_part, stride_u, stride_y, eps, C: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_BF16: tl.constexpr, SILU_U: tl.constexpr,
                      PARTS: tl.constexpr):
    rr, offs_c, _row_ok, col_ok, mask = _row_tile(rows, C, BLOCK_R, BLOCK_C)
    a = tl.load(A + rr * stride_a + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    if PARTS > 1:  # A: the attention's fp32 key parts; their sum in part order, rounded once as finish_parts rounds
        for p in tl.static_range(1, PARTS):
            a += tl.load(A + p * stride_part + rr * stride_a + offs_c[None, :], mask=mask, other=0.0)
        if ROUND_BF16:
            a = _round_to_bf16(a)
        a = a.to(Y.dtype.element_ty).to(tl.float32)
    normed = _normed(a, mask, eps, C)
    u = tl.load(U + rr * stride_u + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU_U:  # u is the UVQK projection's raw output (a compiled model skips that SiLU pass); rounded as u would be
        u = u / (1.0 + tl.exp(-u))
        if ROUND_BF16:
            u = _round_to_bf16(u)
        u = u.to(U.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs_c, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(Bias + offs_c, mask=col_ok, other=0.0).to(tl.float32)
    _store_rows(Y, (normed * w[None, :] + b[None, :]) * u, rr, offs_c, stride_y, mask, ROUND_BF16)


@triton.jit(do_not_specialize=["rows"])
def _group_norm_kernel(A, G, W, Bias, Y, rows, stride_a, stride_g, stride_y, eps, C: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The group LayerNorm: each row's scale and shift from its group's row of W, Bias [groups, C]."""
    rr, offs_c, row_ok, _col_ok, mask = _row_tile(rows, C, BLOCK_R, BLOCK_C)
    normed = _normed(tl.load(A + rr * stride_a + offs_c[None, :], mask=mask, other=0.0).to(tl.float32), mask, eps, C)
    g = tl.load(G + rr * stride_g, mask=row_ok[:, None], other=0).to(tl.int64)
    affine = g * C + offs_c[None, :]
    w = tl.load(W + affine, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + affine, mask=mask, other=0.0).to(tl.float32)
    _store_rows(Y, normed * w + b, rr, offs_c, stride_y, mask, ROUND_BF16)
# fmt: on


def _launch_shape(channels: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): ~4k elements a program, enough rows in flight per SM."""
    block_c = max(16, triton.next_power_of_2(channels))
    block_r = max(1, min(64, 4096 // block_c))
    warps = 1 if INTERPRET else (4 if block_c * block_r <= 4096 else 8)
    return block_r, block_c, warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(a: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, Any]]:
    """Both launchers' setup for a [..., C]: (a as rows, the output (``out`` or a new one) as rows, the row count,
    the launch's grid and meta-parameters)."""
    channels = a.shape[-1]
    a2 = _rows(a)
    if out is None:
        out = torch.empty(a2.shape, dtype=a.dtype, device=a.device)
    block_r, block_c, warps = _launch_shape(channels)
    launch = {"grid": (triton.cdiv(a2.shape[0], block_r),), "C": channels, "BLOCK_R": block_r, "BLOCK_C": block_c,
              "ROUND_BF16": INTERPRET and a.dtype == torch.bfloat16, "num_warps": warps}  # fmt: skip
    return a2, out.view(a2.shape), a2.shape[0], launch


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
    a2, out, rows, launch = _launch(a, out)
    _launch_norm_gate(a2, 1, 0, u, weight, bias, out, rows, launch, eps, silu_u, wrap)
    return out.view(a.shape)


def _launch_norm_gate(
    a2: torch.Tensor,
    parts: int,
    stride_part: int,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    rows: int,
    launch: dict[str, Any],
    eps: float,
    silu_u: bool,
    wrap: Callable[[Any], Any] = lambda kernel: kernel,
) -> None:
    """Both norm-gate launchers' kernel call: ``a2`` the first of ``parts`` row blocks ``stride_part`` apart."""
    if rows:
        u2 = _rows(u)
        wrap(_norm_gate_kernel)[launch.pop("grid")](
            a2, u2, weight.contiguous(), bias.contiguous(), out, rows, a2.stride(0), stride_part, u2.stride(0),
            out.stride(0), float(eps), SILU_U=bool(silu_u), PARTS=parts, **launch,
        )  # fmt: skip


def norm_gate_parts_triton(
    parts: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    silu_u: bool = False,
) -> torch.Tensor:
    """norm_gate_triton of an attention's output still in its key parts: ``parts`` [P, T, ...] float32 (the kernels'
    partial sums, kernels.hstu_attention.launch_buffers) -> [T, C] in ``dtype``. The kernel adds the parts in part
    order and rounds the sum once to ``dtype`` before normalising, as finish_parts would: the same output as
    finish_parts then norm_gate_triton, one kernel fewer (grc.model.hstu.ATTENTION_GATE)."""
    if parts.dtype != torch.float32 or not parts.is_contiguous():
        raise ValueError(f"norm-gate parts must be contiguous float32, got {parts.dtype} strides {parts.stride()}")
    flat = parts.reshape(parts.shape[0], parts.shape[1], -1)
    if out is None:
        out = torch.empty(flat.shape[1:], dtype=dtype, device=parts.device)
    a2, out, rows, launch = _launch(flat[0], out)
    launch["ROUND_BF16"] = INTERPRET and dtype == torch.bfloat16  # the output's dtype, not the parts' float32
    _launch_norm_gate(a2, flat.shape[0], flat.stride(0), u, weight, bias, out, rows, launch, eps, silu_u)
    return out


def group_norm_triton(
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupLayerNorm (grc.model.hstu) of x [..., C] in one kernel, one rounding to x's dtype: ``group`` [...] each
    row's token kind, ``weight`` / ``bias`` [groups, C]. The PyTorch form is five kernels (layer_norm, two gathers,
    mul, add: ~0.046 ms of the history cache's 0.376 ms mtgr-base step on the H200, session 22). Eager only (the
    history cache's steps, eagerly or in CUDA graphs): not a registered op. ``out``: as norm_gate_triton's."""
    (x2, out, rows, launch), g = _launch(x, out), group.reshape(-1)
    if rows:
        _group_norm_kernel[launch.pop("grid")](
            x2, g, weight.contiguous(), bias.contiguous(), out, rows, x2.stride(0), g.stride(0), out.stride(0),
            float(eps), **launch,
        )  # fmt: skip
    return out.view(x.shape)
