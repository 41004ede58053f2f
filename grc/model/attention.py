"""HSTU pointwise attention on padded batches: the export-friendly form of the math.

Per user with L tokens, of which the last ``nc`` are candidates (``n_ctx = L - nc``):
  position p(i) = min(i, n_ctx)              all candidates share one position
  allowed(i, j) = j <= i (causal) / j < n_ctx (full)     for history queries i < n_ctx
                = j < n_ctx or j == i                       for candidate queries
  s = alpha * q_i.k_j + pos_w[h, clamp(p(i)-p(j), -(P-1), P-1) + P-1] + ts_w[h, bucket(|t_i - t_j|)]
  a = SiLU(s) / N  where allowed, else 0;   out_i = sum_j a_ij v_j
bucket(dt) = min(floor(log2(1 + dt)), NB-1), computed exactly in integers, where dt = |t_i - t_j| is
the exact gap saturated at 2**63 - 1 (``abs_time_gap``): timestamps further apart than int64 can
hold (history at INT64_MIN, request at INT64_MAX) land in the last bucket instead of wrapping.
The jagged kernels in ``kernels/`` implement the same function; this module is what ONNX export
traces and what graph surgery fuses back into one ``grc::HSTUAttention`` node per layer.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F

INT64_MAX = (1 << 63) - 1
MAX_BUCKET = 63  # floor(log2(1 + INT64_MAX)): buckets past 63 are never reached
A = TypeVar("A", torch.Tensor, np.ndarray)


def abs_time_gap(t_i: A, t_j: A) -> A:
    """|t_i - t_j| for int64 timestamps without overflow, saturated at INT64_MAX; torch tensors, or numpy
    arrays (the serving store's host check, grc/serving/common/history_cache.py).

    The exact gap of two int64 values can reach 2**64 - 1; subtracting directly wraps such a gap
    into a small (even negative) number. hi - lo exceeds INT64_MAX only when lo < 0, and there
    lo + INT64_MAX cannot overflow, so the test below never overflows either; nor does the
    subtraction, which only runs where the gap fits. (No clamp op here: graph surgery tells the
    position gather from the time gather by a Clip upstream.)"""
    xp: Any = np if isinstance(t_i, np.ndarray) else torch
    hi, lo = xp.maximum(t_i, t_j), xp.minimum(t_i, t_j)
    over = (lo < 0) & (hi > xp.where(lo < 0, lo, -1) + INT64_MAX)
    return cast("A", xp.where(over, INT64_MAX, hi - xp.where(over, hi, lo)))


def time_bucket(gap: A, num_buckets: int) -> A:
    """Exact min(floor(log2(1 + gap)), NB-1) for int64 gap in [0, INT64_MAX]: count the k in
    1..min(NB-1, 63) with gap >= 2**k - 1. Integers only (no float rounding at powers of two), and
    no 1 + gap that could overflow. Numpy arrays count by a binary search over the same bounds (the
    serving store checks thousands of events per request on the host: the broadcast compare was ms there)."""
    bounds = bucket_bounds(num_buckets)
    if isinstance(gap, np.ndarray):
        return cast("A", np.searchsorted(np.array(bounds, np.int64), gap, side="right"))
    return cast("A", (gap.unsqueeze(-1) >= torch.tensor(bounds, dtype=torch.int64, device=gap.device)).sum(-1))


def bucket_bounds(num_buckets: int) -> list[int]:
    """time_bucket's bounds 2**k - 1, k = 1..min(NB-1, 63): a gap's bucket is how many of them it reaches."""
    return [(1 << k) - 1 for k in range(1, min(num_buckets - 1, MAX_BUCKET) + 1)]


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
    bucket = time_bucket(abs_time_gap(timestamps.unsqueeze(2), timestamps.unsqueeze(1)), ts_w.shape[1])
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
