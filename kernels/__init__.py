"""Triton kernels for HSTU attention and the fused norm-gate, each with a PyTorch reference.

Public API: ``hstu_attention(..., impl="triton" | "pytorch")`` and ``norm_gate(..., impl=...)``;
importing this package registers ``torch.ops.grc.hstu_attention`` and ``torch.ops.grc.norm_gate``.
``kernels.reference`` is the plain (float64-capable) PyTorch oracle.
"""

from kernels import (
    fused_heads,  # registers torch.ops.grc.candidate_heads
    fused_linear,  # registers torch.ops.grc.norm_linear_silu and gated_linear_residual
    reference,
)
from kernels.ops import hstu_attention, hstu_attention_cached, norm_gate

__all__ = ["fused_heads", "fused_linear", "hstu_attention", "hstu_attention_cached", "norm_gate", "reference"]
