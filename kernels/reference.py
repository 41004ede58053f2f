"""Plain PyTorch references for the kernels: the numerical oracle.

Written for obviousness, not speed: one user at a time, dense masks, every quantity spelled out.
Any floating dtype works; float16/bfloat16 inputs are computed in float32 (the kernels accumulate
in float32), float32 in float32 and float64 in float64, so passing float64 inputs gives the
float64 oracle the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle); everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def time_bucket(dt_abs: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Exact min(floor(log2(1 + dt)), NB - 1) for int64 dt >= 0: count the powers 2**k (k = 1..NB-1)
    that 1 + dt reaches. Pure integer arithmetic, so no float rounding can put it off by one."""
    powers = torch.tensor([1 << k for k in range(1, num_buckets)], dtype=torch.int64, device=dt_abs.device)
    return ((dt_abs.unsqueeze(-1) + 1) >= powers).sum(-1)


def allowed_mask(length: int, n_ctx: int, causal: bool, device: torch.device) -> torch.Tensor:
    """[L, L] bool: may query i see key j (the contract's mask, one user)."""
    i = torch.arange(length, device=device).view(-1, 1)
    j = torch.arange(length, device=device).view(1, -1)
    history = (j <= i) if causal else (j < n_ctx)
    candidate = (j < n_ctx) | (j == i)
    return torch.where(i < n_ctx, history, candidate)


def user_bias(length: int, n_ctx: int, ts: torch.Tensor, pos_w: torch.Tensor, ts_w: torch.Tensor) -> torch.Tensor:
    """[H, L, L]: pos_w[h, rp(i, j)] + ts_w[h, bucket(i, j)] for one user."""
    num_pos = (pos_w.shape[1] + 1) // 2
    idx = torch.arange(length, device=ts.device)
    pos = torch.minimum(idx, torch.tensor(n_ctx, device=ts.device))  # candidates share position n_ctx
    rel = (pos.view(-1, 1) - pos.view(1, -1)).clamp(-(num_pos - 1), num_pos - 1) + (num_pos - 1)
    bucket = time_bucket((ts.view(-1, 1) - ts.view(1, -1)).abs(), ts_w.shape[1])
    return pos_w[:, rel] + ts_w[:, bucket]


def hstu_attention(
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
) -> torch.Tensor:
    """Jagged HSTU attention, [T, H, Dv] in q's dtype; see kernels/README.md for the math."""
    cdt = compute_dtype(q.dtype)
    out = torch.zeros(v.shape, dtype=cdt, device=v.device)
    pos_w, ts_w = pos_w.to(cdt), ts_w.to(cdt)
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        length, n_ctx = hi - lo, hi - lo - int(num_candidates[b])
        if length == 0:
            continue
        qb, kb, vb = (x[lo:hi].to(cdt).transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        scores = alpha * (qb @ kb.transpose(1, 2)) + user_bias(length, n_ctx, timestamps[lo:hi], pos_w, ts_w)
        mask = allowed_mask(length, n_ctx, causal, q.device)
        weights = torch.where(mask, F.silu(scores) / norm, torch.zeros((), dtype=cdt, device=q.device))
        out[lo:hi] = (weights @ vb).transpose(0, 1)
    return out.to(q.dtype)


def norm_gate(a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(a) over the last dim, times u; computed in float32 (float64 for float64 a)."""
    cdt = compute_dtype(a.dtype)
    y = F.layer_norm(a.to(cdt), a.shape[-1:], weight.to(cdt), bias.to(cdt), eps) * u.to(cdt)
    return y.to(a.dtype)
