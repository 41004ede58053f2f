"""Triton kernel for SiLU over a whole tensor, as its own pass: y = x * sigmoid(x).

Why a kernel of its own when Inductor fuses pointwise ops anyway: the HSTU layer's UVQK projection is split into
u, v, q, k views that grc's custom ops take with their exact strides. Left to Inductor, SiLU stays unrealized and
each view is materialised into a buffer of its own by a kernel of its own (four pointwise kernels per layer in the
AOTInductor package: bench/results/e2e-notes.md, sessions 6 and 9). Behind this op the activated projection is ONE
buffer and the four are views of it (``engine.aoti.silu_apart``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.hstu_attention import INTERPRET, _round_to_bf16

BLOCK = 1024


@triton.jit
def _silu_kernel(X, Y, N, BLOCK: tl.constexpr, F64: tl.constexpr, ROUND_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0)
    x = x if F64 else x.to(tl.float32)  # 16-bit inputs computed in fp32 (as torch does), float64 in float64
    y = x / (1.0 + tl.exp(-x))
    if ROUND_BF16:  # interpreter only: its fp32->bf16 cast truncates; round to nearest first
        y = _round_to_bf16(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def silu_triton(x: torch.Tensor, wrap: Callable[[Any], Any] = lambda kernel: kernel) -> torch.Tensor:
    """SiLU of ``x`` into a new contiguous tensor of its shape and dtype; ``wrap`` is torch.library.wrap_triton in
    the op."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    wrap(_silu_kernel)[(triton.cdiv(n, BLOCK),)](
        x, out, n, BLOCK=BLOCK, F64=x.dtype == torch.float64, ROUND_BF16=INTERPRET and x.dtype == torch.bfloat16
    )
    return out
