"""Embedding tables stored row-wise in blocks, looked up without loading whole tables.

A table of ``vocab_size`` rows is kept as blocks of ``block_rows`` rows (``tables.<name>.<block>``),
the way row-wise sharded embeddings are kept in production; a lookup touches only the rows asked
for, so an 8B-parameter model's tables serve from memory-mapped files.

Quantized blocks (``int8``, ``fp8_e4m3``) keep per-row fp16 factors beside the codes
(``<block>.scale``, and ``<block>.offset`` for int8), as FBGEMM's row-wise tables do; every
lookup (verify, the Triton preprocess, the vLLM plugin, the bundle sample) dequantizes the rows it
fetched with ``dequantize_rows``, so no serving path carries its own copy. Per element:
  int8      x = (q + 128) * scale + offset, scale = (max - offset) / 255 rounded up, offset = the
            row's min rounded down (both fp16): |error| <= scale / 2
  fp8_e4m3  x = q * scale, scale = max|x| / 448 rounded up (fp16): |error| <= |x| / 16, and
            <= scale / 1024 for values in fp8's subnormal range
With fp16 factors, a 128-wide row costs 132 bytes (int8) or 130 (fp8) against bf16's 256.
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

    def lookup(self, name: str, ids: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """[n] int64 row ids -> [n, dim] in ``dtype`` (float32 unless asked; None: as the blocks give them, for a
        caller that concatenates several tables and casts once). Out-of-range ids are an error, never a
        wrap-around."""
        ids = ids.to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab[name]):
            bad = ids[(ids < 0) | (ids >= self.vocab[name])][0]
            raise ValueError(f"table {name}: id {int(bad)} is outside [0, {self.vocab[name]})")
        block, row = ids // self.block_rows, ids % self.block_rows
        parts = [(b, (block == b).nonzero().flatten()) for b in block.unique().tolist()]
        fetched = [(where, self.blocks[name][b](row[where])) for b, where in parts]
        like = fetched[0][1] if fetched else self.blocks[name][0](row[:0])
        out = torch.empty(ids.numel(), like.shape[1], dtype=like.dtype if dtype is None else dtype)
        for where, rows in fetched:
            out[where] = rows.to(out.dtype)
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], block_rows: int) -> Tables:
        """In-memory tables (tests, small models): name -> [vocab, dim] tensor."""
        blocks = {
            name: [_rows_of(t[s : s + block_rows]) for s in range(0, t.shape[0], block_rows)]
            for name, t in tensors.items()
        }
        return Tables(blocks, {n: t.shape[0] for n, t in tensors.items()}, block_rows)


QUANTIZED = ("int8", "fp8_e4m3")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_STEPS = 255


def factor_names(kind: str) -> tuple[str, ...]:
    """The per-row tensors stored beside a quantized block's codes, by suffix."""
    return ("scale", "offset") if kind == "int8" else ("scale",)


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x rounded to fp16 toward +inf (direction 1) or -inf (-1): a stored factor never shrinks the range."""
    h = x.to(torch.float16)
    off = (h.to(torch.float32) - x) * direction < 0
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction * float("inf"))), h)


def quantize_rows(block: torch.Tensor, kind: str, where: str) -> dict[str, torch.Tensor]:
    """[rows, dim] float -> {"codes": int8 / float8_e4m3fn, "scale": fp16 [rows], ("offset": fp16 [rows])}.
    ``where`` names the block in the error a value too large for an fp16 scale raises."""
    x = block.to(torch.float32)
    if kind == "int8":
        lo = _fp16_toward(x.min(1).values if x.shape[1] else torch.zeros(x.shape[0]), -1.0)
        hi = x.max(1).values if x.shape[1] else lo.to(torch.float32)
        scale = _fp16_toward((hi - lo.to(torch.float32)) / INT8_STEPS, 1.0)
        factors = {"scale": scale, "offset": lo}
        step = torch.where(scale > 0, scale.to(torch.float32), 1.0)[:, None]
        steps = torch.round((x - lo.to(torch.float32)[:, None]) / step).clamp(0, INT8_STEPS)
        codes = (steps - 128).to(torch.int8)
    elif kind == "fp8_e4m3":
        amax = x.abs().max(1).values if x.shape[1] else torch.zeros(x.shape[0])
        scale = _fp16_toward(amax / FP8_MAX, 1.0)
        factors = {"scale": scale}
        step = torch.where(scale > 0, scale.to(torch.float32), 1.0)[:, None]
        codes = (x / step).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        raise ValueError(f"{where}: unknown table quantization {kind!r} (known: {', '.join(QUANTIZED)})")
    for name, f in factors.items():
        if not torch.isfinite(f).all():
            row = int((~torch.isfinite(f)).nonzero()[0])
            raise ValueError(
                f"{where} row {row}: values too large for an fp16 {name} (|x| up to {float(x[row].abs().max()):.3g}); "
                "store this table as float32 or bfloat16"
            )
    return {"codes": codes, **factors}


def dequantize_rows(codes: torch.Tensor, factors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The float32 rows back from codes and their per-row factors (any subset of a block's rows)."""
    scale = factors["scale"].to(torch.float32)[:, None]
    if kind == "int8":  # (q + 128) * scale + offset as one fused multiply-add over the row
        return torch.addcmul(
            factors["offset"].to(torch.float32)[:, None] + 128.0 * scale, codes.to(torch.float32), scale
        )
    return codes.to(torch.float32) * scale


def _rows_of(block: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda rows: block[rows]
