"""The CUDA-graph bucket plan: which (users, tokens) shapes get a graph, and how a batch is padded into one.

A CUDA graph replays fixed shapes, so a jagged batch of B users and T tokens runs in the smallest
bucket (users_b, tokens_b) that holds it: tokens_b >= T and users_b >= B + pad_users. The
tokens_b - T padding tokens go to ``pad_users`` extra users of at most max_seq_len tokens each,
whose tokens are ALL candidates (num_candidates = length): a candidate attends to its user's
context and to itself only, so with no context each padding token attends to itself alone and
padding costs linear, not quadratic, attention work. The remaining user slots are empty (length
0). A real user's score cannot change: attention never crosses users, and every per-token step
(norms, projections, heads) is row-wise. The padded rows' scores are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where a batch is padded: the bundle writer imports the plan without it
    import torch


@dataclass(frozen=True, order=True)
class Bucket:
    tokens: int
    users: int


def most_users(max_users: int, tokens: int, max_seq_len: int) -> int:
    """The most user slots a bucket of ``tokens`` can use: every real user, and the pad users the
    tokens can need (slots beyond that are never filled)."""
    return max_users + -(-tokens // max_seq_len)


def default_plan(max_users: int, max_seq_len: int, smallest: int = 256, step: float = 1.25) -> list[Bucket]:
    """A geometric ladder of token counts (x ``step`` from min(max_seq_len, ``smallest``), each rounded up to
    a multiple of 16) up to max_users x max_seq_len, each with every user slot it can use: any batch the
    server takes fits, and padding stays under a quarter of a bucket (x2 steps padded a third of the
    tokens on the H200 run; a graph per bucket costs little)."""
    top = max_users * max_seq_len
    return [Bucket(t, most_users(max_users, t, max_seq_len)) for t in ladder(min(max_seq_len, smallest), top, step)]


def ladder(smallest: int, top: int, step: float = 1.25) -> list[int]:
    """Sizes from min(smallest, top) (at least 2) up to ``top``, each ``step`` times the last rounded up to a
    multiple of 16, ``top`` last."""
    size, rungs = max(2, min(smallest, top)), []
    while size < top:
        rungs.append(size)
        size = max(size + 1, -(-int(size * step) // 16) * 16)
    rungs.append(top)
    return rungs


def pad_users(bucket: Bucket, tokens: int, max_seq_len: int) -> int:
    """Users needed to carry the padding tokens of a batch of ``tokens`` in ``bucket``."""
    return -(-(bucket.tokens - tokens) // max_seq_len)


def choose(plan: list[Bucket], users: int, tokens: int, max_seq_len: int) -> Bucket | None:
    """The smallest bucket that holds the batch (fewest tokens, then fewest users), or None."""
    fits = [b for b in plan if b.tokens >= tokens and b.users >= users + pad_users(b, tokens, max_seq_len)]
    return min(fits) if fits else None


def padding_sizes(bucket: Bucket, users: int, total: int, max_seq_len: int) -> tuple[int, int, int]:
    """(full pad users of max_seq_len tokens, the last pad user's tokens (0: none), empty user slots) that fill
    ``bucket`` after a batch of ``users`` users and ``total`` tokens; ValueError where it cannot hold the batch."""
    extra = bucket.tokens - total
    full, rest = divmod(extra, max_seq_len)
    slots = bucket.users - users
    if full + (rest > 0) > slots or extra < 0:
        raise ValueError(f"bucket {bucket} cannot hold {users} users and {total} tokens (max_seq_len {max_seq_len})")
    return full, rest, slots - full - (rest > 0)


def ints_spans(bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(start, length) of the offsets [U+1], num_candidates [U] and timestamps [T'] in ``padded_ints`` (U, T' the
    bucket's users and tokens), each start a multiple of two int64s: a compiled package's kernels may read their
    inputs as 16-byte aligned, as every tensor torch allocates is."""
    u, t = bucket.users, bucket.tokens
    cands = (u + 2) // 2 * 2  # the first even index past the u + 1 offsets
    stamps = (cands + u + 1) // 2 * 2
    return (0, u + 1), (cands, u), (stamps, t)


def ints_length(bucket: Bucket) -> int:
    """The length of ``padded_ints`` for ``bucket``."""
    start, length = ints_spans(bucket)[-1]
    return start + length


def padded_ints(bucket: Bucket, max_seq_len: int, offsets: np.ndarray, num_candidates: np.ndarray,
                timestamps: np.ndarray) -> np.ndarray:  # fmt: skip
    """What ``pad`` makes of a batch's offsets [B+1], num_candidates [B] and timestamps [T], made on the host from
    the layout's arrays, in one int64 array at ``ints_spans`` (zeros between): ONE slice of the batch's upload,
    which one copy puts where the bucket's graph reads it (Bucketed.run_padded) instead of the dozen small launches
    ``pad`` costs a batch on the device."""
    total, users = int(offsets[-1]), num_candidates.shape[0]
    full, rest, _ = padding_sizes(bucket, users, total, max_seq_len)
    out = np.zeros(ints_length(bucket), np.int64)
    (o, n_o), (c, n_c), (t, _) = ints_spans(bucket)
    sizes = out[c + users : c + n_c]  # the pad users' num_candidates: all their tokens (then empty slots: 0)
    sizes[:full] = max_seq_len
    sizes[full : full + (rest > 0)] = rest
    out[o : o + users + 1] = offsets
    np.cumsum(sizes, out=out[o + users + 1 : o + n_o])
    out[o + users + 1 : o + n_o] += total
    out[c : c + users] = num_candidates
    out[t : t + total] = timestamps  # the pad tokens' stamps stay 0
    return out


def pad(
    bucket: Bucket,
    max_seq_len: int,
    tokens: torch.Tensor,
    offsets: torch.Tensor,
    num_candidates: torch.Tensor,
    timestamps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The jagged batch (tokens [T, D], offsets [B+1], num_candidates [B], timestamps [T]) padded to
    ``bucket``: its first T tokens and B users are the batch's, unchanged. The padding users'
    offsets follow from T and B alone, known on the host (no device sync)."""
    import torch

    total, users = tokens.shape[0], num_candidates.shape[0]
    full, rest, empty = padding_sizes(bucket, users, total, max_seq_len)
    extra = bucket.tokens - total
    # the padding users' sizes made on the device from host integers: no host->device copy, no sync
    dev, kind = tokens.device, offsets.dtype
    sizes = torch.cat(
        [
            torch.full((full,), max_seq_len, dtype=kind, device=dev),
            torch.full((1 if rest else 0,), rest, dtype=kind, device=dev),
            torch.zeros(empty, dtype=kind, device=dev),
        ]
    )
    return (
        torch.cat([tokens, tokens.new_zeros(extra, tokens.shape[1])]),
        torch.cat([offsets, total + sizes.cumsum(0)]),  # offsets[-1] is T: known here
        torch.cat([num_candidates, sizes.to(num_candidates.dtype)]),
        torch.cat([timestamps, timestamps.new_zeros(extra)]),
    )
