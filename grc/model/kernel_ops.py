"""The model's door to ``kernels/``: one call per op, ``impl="pytorch" | "triton"``.

The padded attention in attention.py is what export traces; the jagged ops here are what the
canonical model runs, on the kernels' PyTorch reference (CPU) or their Triton kernels (GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grc.model.attention import hstu_attention_padded
from grc.model.jagged import lengths_of


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
    """[T, H, D] jagged attention; users never see each other's tokens."""
    if impl != "pytorch":
        raise NotImplementedError(f"impl {impl!r}")
    out = []
    lengths = lengths_of(offsets)
    for b in range(lengths.numel()):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        one = hstu_attention_padded(
            q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], lengths[b : b + 1], num_candidates[b : b + 1],
            timestamps[None, lo:hi], pos_w, ts_w, alpha, norm, causal,
        )
        out.append(one[0])
    return torch.cat(out) if out else v.new_zeros(v.shape)


def norm_gate(
    a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, impl: str = "pytorch"
) -> torch.Tensor:
    """LayerNorm(a) * u."""
    return F.layer_norm(a, a.shape[-1:], weight, bias, eps) * u
