"""Embedding tables stored row-wise in blocks, looked up without loading whole tables.

A table of ``vocab_size`` rows is kept as blocks of ``block_rows`` rows (``tables.<name>.<block>``),
the way row-wise sharded embeddings are kept in production; a lookup touches only the rows asked
for, so an 8B-parameter model's tables serve from memory-mapped files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def block_name(table: str, block: int) -> str:
    return f"tables.{table}.{block:05d}"


def block_count(vocab_size: int, block_rows: int) -> int:
    return -(-vocab_size // block_rows)


@dataclass
class Tables:
    """name -> list of row blocks; each block fetches rows (a tensor or a memory map behind it)."""

    blocks: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]
    vocab: dict[str, int]
    block_rows: int

    def lookup(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """[n] int64 row ids -> [n, dim] float32. Out-of-range ids are an error, never a wrap-around."""
        ids = ids.to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab[name]):
            bad = ids[(ids < 0) | (ids >= self.vocab[name])][0]
            raise ValueError(f"table {name}: id {int(bad)} is outside [0, {self.vocab[name]})")
        block, row = ids // self.block_rows, ids % self.block_rows
        parts = [(b, (block == b).nonzero().flatten()) for b in block.unique().tolist()]
        fetched = [(where, self.blocks[name][b](row[where])) for b, where in parts]
        dim = fetched[0][1].shape[1] if fetched else self.blocks[name][0](row[:0]).shape[1]
        out = torch.empty(ids.numel(), dim, dtype=torch.float32)
        for where, rows in fetched:
            out[where] = rows.to(torch.float32)
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], block_rows: int) -> Tables:
        """In-memory tables (tests, small models): name -> [vocab, dim] tensor."""
        blocks = {
            name: [_rows_of(t[s : s + block_rows]) for s in range(0, t.shape[0], block_rows)]
            for name, t in tensors.items()
        }
        return Tables(blocks, {n: t.shape[0] for n, t in tensors.items()}, block_rows)


def _rows_of(block: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda rows: block[rows]
