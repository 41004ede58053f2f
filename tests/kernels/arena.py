"""Test data: keys, values and timestamps moved into an arena (the history cache's entries, read in place)."""

from __future__ import annotations

import torch


def arena(gen: torch.Generator, k: torch.Tensor, v: torch.Tensor, ts: torch.Tensor,
          kv_offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """k, v, ts with each user's rows moved to a range of a larger buffer (users shuffled, 3 rows before each),
    the rows between them NaN (keys, values) and 2**62 (timestamps): -> (k, v, ts, ranges [B, 2])."""
    users = kv_offsets.numel() - 1
    lengths = (kv_offsets[1:] - kv_offsets[:-1]).tolist()
    size = int(kv_offsets[-1]) + 3 * (users + 1)
    k_a, v_a = (torch.full((size, *x.shape[1:]), float("nan"), dtype=x.dtype) for x in (k, v))
    ts_a = torch.full((size,), 1 << 62, dtype=torch.int64)
    ranges = torch.zeros(users, 2, dtype=torch.int64)
    at = 3
    for b in torch.randperm(users, generator=gen).tolist():
        lo = int(kv_offsets[b])
        for dst, src in ((k_a, k), (v_a, v), (ts_a, ts)):
            dst[at : at + lengths[b]] = src[lo : lo + lengths[b]]
        ranges[b] = torch.tensor([at, at + lengths[b]])
        at += lengths[b] + 3
    return k_a, v_a, ts_a, ranges
