"""Triton kernels for HSTU attention and the fused norm-gate, each with a PyTorch reference.

Public API: ``hstu_attention(..., impl="triton" | "pytorch")`` and ``norm_gate(..., impl=...)``;
importing this package registers ``torch.ops.grc.hstu_attention`` and ``torch.ops.grc.norm_gate``.
``kernels.reference`` is the plain (float64-capable) PyTorch oracle.
"""

from kernels import reference
from kernels.ops import hstu_attention, hstu_attention_cached, norm_gate

__all__ = ["hstu_attention", "hstu_attention_cached", "norm_gate", "reference"]
