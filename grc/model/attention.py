"""HSTU pointwise attention on padded batches: the export-friendly form of the math.

Per user with L tokens, of which the last ``nc`` are candidates (``n_ctx = L - nc``):
  position p(i) = min(i, n_ctx)              all candidates share one position
  allowed(i, j) = j <= i (causal) / j < n_ctx (full)     for history queries i < n_ctx
                = j < n_ctx or j == i                       for candidate queries
  s = alpha * q_i.k_j + pos_w[h, clamp(p(i)-p(j), -(P-1), P-1) + P-1] + ts_w[h, bucket(|t_i - t_j|)]
  a = SiLU(s) / N  where allowed, else 0;   out_i = sum_j a_ij v_j
bucket(dt) = min(floor(log2(1 + dt)), NB-1), computed exactly in integers.
The jagged kernels in ``kernels/`` implement the same function; this module is what ONNX export
traces and what graph surgery fuses back into one ``grc::HSTUAttention`` node per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def time_bucket(dt_abs: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Exact floor(log2(1 + dt)) clamped to NB-1: count the powers of two that 1 + dt reaches."""
    bounds = torch.tensor([1 << k for k in range(1, num_buckets)], dtype=torch.int64, device=dt_abs.device)
    return ((dt_abs.unsqueeze(-1) + 1) >= bounds).sum(-1)


def candidate_mask(lengths: torch.Tensor, num_candidates: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
    """[B, N, N] bool: which key j each query i may see (padding rows and columns are False)."""
    idx = torch.arange(n, device=lengths.device)
    i, j = idx.view(1, n, 1), idx.view(1, 1, n)
    length = lengths.view(-1, 1, 1)
    n_ctx = (lengths - num_candidates).view(-1, 1, 1)
    history_rule = (j <= i) if causal else (j < n_ctx)
    candidate_rule = (j < n_ctx) | (j == i)
    is_candidate = i >= n_ctx
    rule = (is_candidate & candidate_rule) | (~is_candidate & history_rule)  # a bool Where has no ORT kernel
    return rule & (i < length) & (j < length)


def relative_bias(
    lengths: torch.Tensor,
    num_candidates: torch.Tensor,
    timestamps: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
) -> torch.Tensor:
    """[B, H, N, N] learned bias over relative position and bucketed log time delta."""
    n = timestamps.shape[1]
    num_pos = (pos_w.shape[1] + 1) // 2
    idx = torch.arange(n, device=lengths.device).view(1, n)
    pos = torch.minimum(idx, (lengths - num_candidates).view(-1, 1))
    rel = (pos.unsqueeze(2) - pos.unsqueeze(1)).clamp(-(num_pos - 1), num_pos - 1) + (num_pos - 1)
    dt = (timestamps.unsqueeze(2) - timestamps.unsqueeze(1)).abs()
    bucket = time_bucket(dt, ts_w.shape[1])
    bias = pos_w[:, rel] + ts_w[:, bucket]  # [H, B, N, N]
    return bias.permute(1, 0, 2, 3)


def hstu_attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    num_candidates: torch.Tensor,
    timestamps: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    """q, k: [B, N, H, Dqk]; v: [B, N, H, Dv]; returns [B, N, H, Dv] (zeros on padding)."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * alpha
    scores = scores + relative_bias(lengths, num_candidates, timestamps, pos_w, ts_w).to(scores.dtype)
    mask = candidate_mask(lengths, num_candidates, q.shape[1], causal).unsqueeze(1)
    weights = torch.where(mask, F.silu(scores) / norm, torch.zeros_like(scores))
    return torch.einsum("bhij,bjhd->bihd", weights, v)
