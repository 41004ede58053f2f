"""The model's door to ``kernels/``: one call per op, ``impl="pytorch" | "triton"``.

The padded attention in attention.py is what ONNX export traces; the jagged ops here are what the
canonical model runs: the kernels' plain PyTorch reference (``impl="pytorch"``, any device and
dtype, float64 included) or the ``torch.ops.grc.*`` custom ops (``impl="triton"``: Triton kernels
on CUDA, the reference elsewhere). Two independent formulations of one function, so the model's
jagged == padded test also checks the kernels' reference against the exported math.
"""

from __future__ import annotations

from typing import Any

import torch


def hstu_attention_jagged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    impl: str = "pytorch",
) -> torch.Tensor:
    """[T, H, Dv] jagged attention; users never see each other's tokens."""
    from kernels import hstu_attention  # imports triton: only when a model actually runs

    return hstu_attention(q, k, v, offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal, impl=impl)


def hstu_attention_vqk_jagged(
    vqk: torch.Tensor, heads: int, head_qk: int, head_v: int, *args: Any, impl: str = "pytorch"
) -> torch.Tensor:
    """``hstu_attention_jagged`` of q, k, v as views of the activated ``vqk`` (kernels.ops.hstu_attention_vqk; ``args``
    as hstu_attention_jagged's after v)."""
    from kernels.ops import hstu_attention_vqk

    return hstu_attention_vqk(vqk, heads, head_qk, head_v, *args, impl=impl)


def hstu_attention_gate_vqk(
    vqk: torch.Tensor,
    u: torch.Tensor,
    norm: Any,
    heads: int,
    head_qk: int,
    head_v: int,
    *args: Any,
    impl: str = "pytorch",
) -> torch.Tensor:
    """norm_gate(``hstu_attention_vqk_jagged`` as [T, H*Dv], raw ``u``) with the LayerNorm ``norm``'s weight, bias
    and eps, as one op (kernels.ops.hstu_attention_gate_vqk; ``args`` as hstu_attention_jagged's after v)."""
    from kernels.ops import hstu_attention_gate_vqk

    gate = (u, norm.weight, norm.bias, norm.eps)
    return hstu_attention_gate_vqk(vqk, *gate, heads, head_qk, head_v, *args, impl=impl)


def norm_gate(
    a: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    impl: str = "pytorch",
    silu_u: bool = False,
) -> torch.Tensor:
    """LayerNorm(a) * u over the last dim (silu_u: of u before SiLU)."""
    from kernels import norm_gate as kernel_norm_gate

    return kernel_norm_gate(a, u, weight, bias, eps, impl=impl, silu_u=silu_u)


def group_norm(x: torch.Tensor, group: torch.Tensor, norm: Any) -> torch.Tensor:
    """``norm(x, group)`` (a GroupLayerNorm) as one Triton kernel where grc's kernels run (kernels/norm_gate.py:
    one rounding where the module rounds after each of its ops), else the module itself. Eager: the history cache's
    steps call it."""
    from kernels.norm_gate import group_norm_triton
    from kernels.ops import runs_kernel

    if not runs_kernel(x):
        return norm(x, group)
    return group_norm_triton(x, group, norm.weight, norm.bias, norm.eps)


def silu_apart(x: torch.Tensor) -> torch.Tensor:
    """SiLU as a pass of its own: the ``grc::silu`` op (kernels/silu.py says why)."""
    from kernels.ops import silu

    return silu(x, impl="triton")


def hstu_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    impl: str = "pytorch",
    max_user_keys: int | None = None,
) -> torch.Tensor:
    """[Tq, H, Dv]: per user the queries are the last rows of the sequence ``kv_offsets`` delimits
    (cached tokens, then the new ones; [users, 2] ranges with ``max_user_keys``: an arena's entries); the rows
    ``hstu_attention_jagged`` gives those tokens."""
    from kernels import hstu_attention_cached as kernel_cached

    args = (q, k, v, q_offsets, kv_offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    return kernel_cached(*args, impl=impl, max_user_keys=max_user_keys)


# The fused GPU-compile path (kernels/fused_*.py: torch.ops.grc.* with PyTorch twins); their
# argument lists are the ops' own, documented there.
def norm_linear_silu(*args: Any) -> torch.Tensor:
    """SiLU(GroupLN(x) W^T + b) in one Triton GEMM: (x, group, gamma, beta, weight, bias, eps)."""
    from kernels.fused_linear import norm_linear_silu as op

    return op(*args)


def linear_silu_into(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    k_col: int,
    v_col: int,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """``linear_silu`` (with ``norm`` = (group, gamma, beta, eps): ``norm_linear_silu``) whose K and V columns (from
    ``k_col`` / ``v_col``) also fill rows ``slots`` of a cache's ``rows`` = (keys, values, slots), in the GEMM's
    epilogue (kernels.fused_linear.KVInto)."""
    from kernels.fused_linear import KVInto
    from kernels.fused_linear import linear_silu_into as op

    return op(x, weight, bias, KVInto(*rows, k_col=k_col, v_col=v_col), norm=norm)


def gated_linear_residual(*args: Any) -> torch.Tensor:
    """residual + (LN(a) * u) W^T + b in one Triton GEMM: (a, u, norm_w, norm_b, weight, bias, residual, eps)."""
    from kernels.fused_linear import gated_linear_residual as op

    return op(*args)


def linear_silu(*args: Any) -> torch.Tensor:
    """SiLU(x W^T + b) in one Triton GEMM (the norm apart): (x, weight, bias)."""
    from kernels.fused_linear import linear_silu as op

    return op(*args)


def linear_residual(*args: Any) -> torch.Tensor:
    """residual + x W^T + b in one Triton GEMM: (x, weight, bias, residual)."""
    from kernels.fused_linear import linear_residual as op

    return op(*args)


def candidate_heads(*args: Any) -> torch.Tensor:
    """Final group norm + task heads on the candidate rows, zeros elsewhere, in one Triton kernel:
    (x, group, is_candidate, gamma, beta, w1, b1, w2, b2, eps)."""
    from kernels.fused_heads import candidate_heads as op

    return op(*args)
