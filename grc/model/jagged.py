"""Jagged <-> padded layout. Jagged (tokens of all users flattened, plus offsets) is canonical."""

from __future__ import annotations

import torch


def lengths_of(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def local_index(offsets: torch.Tensor) -> torch.Tensor:
    """[T]: each token's index within its own user's sequence."""
    lengths = lengths_of(offsets)
    starts = torch.repeat_interleave(offsets[:-1], lengths)
    return torch.arange(int(offsets[-1]), device=offsets.device) - starts


def to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """[T, ...] -> [B, max_len, ...], zero padded after each user's tokens."""
    lengths = lengths_of(offsets)
    batch = lengths.numel()
    out = values.new_zeros((batch, max_len, *values.shape[1:]))
    users = torch.repeat_interleave(torch.arange(batch, device=offsets.device), lengths)
    out[users, local_index(offsets)] = values
    return out


def to_jagged(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B, N, ...] -> [T, ...], keeping each user's first ``length`` rows."""
    lengths = lengths_of(offsets)
    users = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    return values[users, local_index(offsets)]
