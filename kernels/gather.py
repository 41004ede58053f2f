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
