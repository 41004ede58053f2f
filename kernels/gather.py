"""Row gather from a table that need not live in GPU memory: ``out[i] = table[ids[i]]``.

The fused serving model keeps embedding tables too large for the GPU in pinned host memory; this
kernel runs on the GPU and reads the rows it needs through the pinned buffer's unified (UVA)
address, so only the requested rows cross PCIe and no host thread touches them. The rows are
moved as raw integers of the element's width (an int8 or fp8 code, a bf16 or fp32 value alike),
so any table dtype goes through one kernel. Under TRITON_INTERPRET=1 it runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# element width -> the integer dtype the kernel moves (bit-exact for every table dtype)
_RAW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _gather_rows_kernel(table, ids, out, dim, stride_table, stride_out, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    src = tl.load(ids + row).to(tl.int64)
    values = tl.load(table + src * stride_table + cols, mask=mask)
    tl.store(out + row.to(tl.int64) * stride_out + cols, values, mask=mask)


def gather_rows(table: torch.Tensor, ids: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """table [rows] or [rows, dim] (GPU, pinned host, or CPU under the interpreter), ids [n] int64 on
    ``device`` (default: ids' device) -> [n] or [n, dim] in table's dtype on that device. Ids are
    not checked here: the caller validated them (a kernel cannot raise)."""
    flat = table.dim() == 1
    rows = table.unsqueeze(1) if flat else table
    if rows.stride(1) != 1:
        raise ValueError(f"gather_rows: table rows must be contiguous (strides {tuple(table.stride())})")
    raw_dtype = _RAW[table.element_size()]
    device = ids.device if device is None else torch.device(device)
    out = torch.empty((ids.numel(), rows.shape[1]), dtype=table.dtype, device=device)
    if ids.numel() and rows.shape[1]:
        block = min(1024, triton.next_power_of_2(rows.shape[1]))
        grid = (ids.numel(), triton.cdiv(rows.shape[1], block))
        _gather_rows_kernel[grid](
            rows.view(raw_dtype),
            ids.contiguous(),
            out.view(raw_dtype),
            rows.shape[1],
            rows.stride(0),
            out.stride(0),
            BLOCK_D=block,
        )
    return out.squeeze(1) if flat else out


MAX_PARTS = 4  # tables one gather_concat call takes (a model kind with more goes through one lookup per table)


@triton.jit
def _copy_part(
    src, ids, out, rows, row_ok, dim, col, stride_src, stride_out, INDEXED: tl.constexpr, BLOCK_D: tl.constexpr
):
    """out[rows, col:col + dim] = src[ids[rows]] (INDEXED) or src[rows], cast to out's dtype, BLOCK_D columns a
    step."""
    if INDEXED:  # noqa: SIM108 (a constexpr branch: one of the two is compiled)
        src_rows = tl.load(ids + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src_rows = rows.to(tl.int64)
    out_rows = rows.to(tl.int64)
    for c0 in range(0, dim, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < dim)
        values = tl.load(src + src_rows[:, None] * stride_src + cols[None, :], mask=mask)
        tl.store(
            out + out_rows[:, None] * stride_out + (col + cols)[None, :], values.to(out.dtype.element_ty), mask=mask
        )


# ids and extra are views into a request's packed layout (grc/serving/ranker/layout.py): their offsets, and n, vary
# per request, so nothing is specialised on them (a 16-byte-aligned field and an 8-byte one would be two compiles,
# one of them on a request's path)
_PER_REQUEST = ["n", "I0", "I1", "I2", "I3", "E"]


# fmt: off
@triton.jit(do_not_specialize=_PER_REQUEST, do_not_specialize_on_alignment=_PER_REQUEST[1:])
def _gather_concat_kernel(out, n, stride_out,
                          T0, I0, D0, C0, S0, T1, I1, D1, C1, S1, T2, I2, D2, C2, S2, T3, I3, D3, C3, S3,
                          E, DE, CE, SE, PARTS: tl.constexpr, EXTRA: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One program per (BLOCK_R rows, part): part p < PARTS copies table p's rows of its ids (Tp, Ip: dim Dp at
    column Cp, row stride Sp) into its columns; part PARTS (with EXTRA) copies E's rows as they are."""
    part = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    if part == 0:
        _copy_part(T0, I0, out, rows, row_ok, D0, C0, S0, stride_out, True, BLOCK_D)
    if PARTS > 1 and part == 1:
        _copy_part(T1, I1, out, rows, row_ok, D1, C1, S1, stride_out, True, BLOCK_D)
    if PARTS > 2 and part == 2:
        _copy_part(T2, I2, out, rows, row_ok, D2, C2, S2, stride_out, True, BLOCK_D)
    if PARTS > 3 and part == 3:
        _copy_part(T3, I3, out, rows, row_ok, D3, C3, S3, stride_out, True, BLOCK_D)
    if EXTRA and part == PARTS:
        _copy_part(E, E, out, rows, row_ok, DE, CE, SE, stride_out, False, BLOCK_D)
# fmt: on


def gather_concat(
    tables: list[torch.Tensor], ids: list[torch.Tensor], extra: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """torch.cat([table[ids] for each table] + [extra], -1).to(dtype) in ONE launch, bit for bit (each value cast
    once; a cast to a wider float is exact): tables [vocab_j, dim_j] of any float dtype, rows contiguous (on the
    GPU or in pinned host memory, read through its unified address as gather_rows does; CPU tensors under the
    interpreter), ids [n] int64 each (checked by the caller), extra [n, F] or None. At most MAX_PARTS tables. In
    the fused Ranker a kind's lookups were a gather per table, a concatenation and a cast: on a GPU a launch each."""
    if not 1 <= len(tables) <= MAX_PARTS or len(ids) != len(tables):
        raise ValueError(f"gather_concat: 1..{MAX_PARTS} tables, one ids tensor each (got {len(tables)}, {len(ids)})")
    n = ids[0].numel()
    if any(i.numel() != n for i in ids) or (extra is not None and extra.shape[0] != n):
        raise ValueError(f"gather_concat: every part needs {n} rows ({[i.numel() for i in ids]}, extra "
                         f"{None if extra is None else extra.shape[0]})")  # fmt: skip
    if any(t.dim() != 2 or t.stride(1) != 1 for t in tables) or (extra is not None and extra.stride(1) != 1):
        raise ValueError("gather_concat: tables and extra must be 2-D with contiguous rows")
    dims = [t.shape[1] for t in tables] + ([] if extra is None else [extra.shape[1]])
    out = torch.empty((n, sum(dims)), dtype=dtype, device=ids[0].device)
    if n == 0:
        return out
    cols = [sum(dims[:j]) for j in range(len(dims))]
    parts = []
    for j in range(MAX_PARTS):  # unused slots repeat the first table with no columns
        k = j if j < len(tables) else 0
        parts += [tables[k], ids[k].contiguous(), dims[k] if j < len(tables) else 0, cols[k], tables[k].stride(0)]
    side = [extra, extra.shape[1], cols[-1], extra.stride(0)] if extra is not None else [tables[0], 0, 0, 0]
    block_r = 16
    block_d = min(128, triton.next_power_of_2(max(dims)))
    grid = (triton.cdiv(n, block_r), len(tables) + (extra is not None))
    _gather_concat_kernel[grid](out, n, out.stride(0), *parts, *side, PARTS=len(tables), EXTRA=extra is not None,
                                BLOCK_R=block_r, BLOCK_D=block_d)  # fmt: skip
    return out
