"""Plain PyTorch references for the kernels: the numerical oracle.

Written for obviousness, not speed: one user at a time, dense masks, every quantity spelled out.
Any floating dtype works; float16/bfloat16 inputs are computed in float32 (the kernels accumulate
in float32), float32 in float32 and float64 in float64, so passing float64 inputs gives the
float64 oracle the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# One definition of the time gap and bucket (exact integers, saturating gap) for the padded model and
# this oracle: grc.model.attention imports torch only.
from grc.model.attention import abs_time_gap, time_bucket


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the oracle); everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_mask(length: int, n_ctx: int, causal: bool, device: torch.device) -> torch.Tensor:
    """[L, L] bool: may query i see key j (the contract's mask, one user)."""
    i = torch.arange(length, device=device).view(-1, 1)
    j = torch.arange(length, device=device).view(1, -1)
    history = (j <= i) if causal else (j < n_ctx)
    candidate = (j < n_ctx) | (j == i)
    return torch.where(i < n_ctx, history, candidate)


def user_bias(
    length: int, n_ctx: int, ts: torch.Tensor, pos_w: torch.Tensor, ts_w: torch.Tensor, rows: slice = slice(None)
) -> torch.Tensor:
    """[H, L, L]: pos_w[h, rp(i, j)] + ts_w[h, bucket(i, j)] for one user (query ``rows`` only)."""
    num_pos = (pos_w.shape[1] + 1) // 2
    idx = torch.arange(length, device=ts.device)
    pos = torch.minimum(idx, torch.tensor(n_ctx, device=ts.device))  # candidates share position n_ctx
    rel = (pos[rows].view(-1, 1) - pos.view(1, -1)).clamp(-(num_pos - 1), num_pos - 1) + (num_pos - 1)
    bucket = time_bucket(abs_time_gap(ts[rows].view(-1, 1), ts.view(1, -1)), ts_w.shape[1])
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


def key_range(kv_offsets: torch.Tensor, b: int) -> tuple[int, int]:
    """User b's keys [lo, hi): from offsets [B+1] (users one after another) or ranges [B, 2]."""
    if kv_offsets.dim() == 2:
        return int(kv_offsets[b, 0]), int(kv_offsets[b, 1])
    return int(kv_offsets[b]), int(kv_offsets[b + 1])


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
) -> torch.Tensor:
    """Queries against cached keys: [Tq, H, Dv] in q's dtype.

    Per user b the keys/values ``k, v[kv_offsets[b]:kv_offsets[b+1]]`` (length Lk: cached tokens,
    then new ones; with ``kv_offsets`` of shape [B, 2], ``k, v[kv_offsets[b, 0]:kv_offsets[b, 1]]``:
    key ranges anywhere in k and v, an arena's entries) and their ``timestamps`` (kv layout) are the
    user's whole sequence, whose last
    ``num_candidates[b]`` tokens are candidates; the queries ``q[q_offsets[b]:q_offsets[b+1]]``
    (length Lq <= Lk) are that sequence's last Lq tokens. The result is exactly the rows that
    ``hstu_attention`` over the whole sequence gives for those tokens: query r sits at absolute
    position Lk - Lq + r, which drives the mask and both biases.
    """
    cdt = compute_dtype(q.dtype)
    out = torch.zeros((q.shape[0], q.shape[1], v.shape[2]), dtype=cdt, device=v.device)
    pos_w, ts_w = pos_w.to(cdt), ts_w.to(cdt)
    for b in range(q_offsets.numel() - 1):
        k_lo, k_hi = key_range(kv_offsets, b)
        q_lo, q_hi = int(q_offsets[b]), int(q_offsets[b + 1])
        length, n_q = k_hi - k_lo, q_hi - q_lo
        if n_q > length:
            raise ValueError(f"user {b}: {n_q} queries but only {length} keys (queries are a suffix of the keys)")
        if n_q == 0:
            continue
        n_ctx = length - int(num_candidates[b])
        rows = slice(length - n_q, length)
        qb = q[q_lo:q_hi].to(cdt).transpose(0, 1)  # [H, Lq, D]
        kb, vb = (x[k_lo:k_hi].to(cdt).transpose(0, 1) for x in (k, v))  # [H, Lk, D]
        bias = user_bias(length, n_ctx, timestamps[k_lo:k_hi], pos_w, ts_w, rows)
        scores = alpha * (qb @ kb.transpose(1, 2)) + bias
        mask = allowed_mask(length, n_ctx, causal, q.device)[rows]  # booleans: cheap at any L
        weights = torch.where(mask, F.silu(scores) / norm, torch.zeros((), dtype=cdt, device=q.device))
        out[q_lo:q_hi] = (weights @ vb).transpose(0, 1)
    return out.to(q.dtype)
