"""The embedding tables where the fused model runs: lookups that stay on the model's device.

placement (bundles.triton.gpu.tables):
- ``device``: every table's tensors (float rows, or int8 / fp8 codes with their per-row scales) in
  GPU memory, one [vocab, dim] tensor per table; a lookup is an index_select on the GPU;
- ``pinned_host``: the same tensors in pinned host memory; the rows a batch needs are gathered by a
  GPU kernel (kernels/gather.py) reading through the pinned buffer's unified address into a GPU
  buffer: only those rows cross PCIe;
- ``auto``: device when the tables' bytes fit ``budget_mb``, else pinned_host (decided at load, logged).
Either way quantized rows are dequantized on the GPU by grc.model.tables.dequantize_rows, the one
dequantization every serving path shares. On a CPU device the lookups stay grc.weights.open_tables'
memory-mapped ones (nothing is loaded whole).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grc.model.tables import dequantize_rows, factor_names
from grc.spec.schema import ModelConfig
from grc.weights import CODE_DTYPE, open_tables, read_manifest
from grc.weights.artifact import is_factor, is_table, memmap_arrays
from grc.weights.safetensors_io import DTYPES

PLACEMENTS = ("auto", "device", "pinned_host")
_KIND = {code: kind for kind, code in CODE_DTYPE.items()}  # safetensors dtype -> quantization kind


class Lookup:
    """What TokenProjector-like code needs: ``lookup(table, ids, dtype) -> [n, dim]`` in ``dtype`` (default
    float32; None: as the table holds its rows, dequantized) on ids' device."""

    def lookup(self, name: str, ids: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class _Table:
    values: torch.Tensor  # [vocab, dim]: float rows, or quantized codes
    factors: dict[str, torch.Tensor]  # quantized: per-row scale (and offset), [vocab] fp16
    kind: str | None  # None, "int8", "fp8_e4m3"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, *self.factors.values()))


class DeviceTables(Lookup):
    """Tables on a CUDA device or in pinned host memory (see the module docstring)."""

    def __init__(self, tables: dict[str, _Table], placement: str, device: torch.device):
        self.tables, self.placement, self.device = tables, placement, device
        self.gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        if placement == "device":
            self.gather = lambda t, ids: t.index_select(0, ids)
        else:
            from kernels.gather import gather_rows

            self.gather = gather_rows

    def lookup(self, name: str, ids: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Ids were checked by the request parser: no device-to-host check here. Float rows go to ``dtype`` in one
        cast, none when stored in it (a bfloat16 table read through float32 was two launches per table and batch)
        or for None (the caller concatenates tables and casts once: Ranker._tokens)."""
        table = self.tables[name]
        rows = self.gather(table.values, ids)
        if table.kind is not None:
            rows = dequantize_rows(rows, {f: self.gather(v, ids) for f, v in table.factors.items()}, table.kind)
        return rows if dtype is None else rows.to(dtype)

    def lookup_concat(
        self, names: list[str], ids: list[torch.Tensor], extra: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``torch.cat([lookup(name, ids) ...] + [extra], -1)`` in ``dtype``, bit for bit, as ONE kernel
        (kernels/gather.py gather_concat) where it runs: every table of float rows, at most its MAX_PARTS tables, on a
        CUDA device (or CPU tensors under the Triton interpreter). None elsewhere: the caller looks the tables up one by
        one, to the same values. A lookup per table, the concatenation and the cast were a launch each."""
        from kernels.gather import MAX_PARTS, gather_concat
        from kernels.ops import runs_kernel

        tables = [self.tables[n] for n in names]
        if not runs_kernel(ids[0]) or len(tables) > MAX_PARTS or any(t.kind is not None for t in tables):
            return None
        return gather_concat([t.values for t in tables], ids, extra, dtype)

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values())


def table_bytes(weights_dir: Path) -> int:
    """Bytes of every table tensor (codes and factors), from the manifest and shard headers."""
    manifest = read_manifest(weights_dir)
    names = [n for n in manifest["tensors"] if is_table(n)]
    return sum(
        int(np.prod(info["shape"])) * DTYPES[info["dtype"]][1].itemsize
        for _, info in memmap_arrays(weights_dir, manifest, names).values()
    )


def choose_placement(placement: str, weights_dir: Path, budget_mb: int, log: Callable[[str], None]) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"gpu.tables: expected one of {', '.join(PLACEMENTS)} (got {placement!r})")
    if placement != "auto":
        return placement
    size = table_bytes(weights_dir)
    chosen = "device" if size <= budget_mb << 20 else "pinned_host"
    log(f"gpu.tables auto: tables are {size / 2**20:.1f} MiB, budget tables_device_budget_mb {budget_mb} MiB: {chosen}")
    return chosen


def open_lookup(
    cfg: ModelConfig,
    weights_dir: Path,
    device: torch.device,
    placement: str,
    budget_mb: int,
    log: Callable[[str], None] = print,
) -> Any:
    """The tables for a model on ``device``: memory-mapped (cpu) or DeviceTables (cuda)."""
    if device.type != "cuda":
        return open_tables(cfg, weights_dir)
    chosen = choose_placement(placement, weights_dir, budget_mb, log)
    return DeviceTables(_load(weights_dir, device if chosen == "device" else None), chosen, device)


def _load(weights_dir: Path, device: torch.device | None) -> dict[str, _Table]:
    """Every table's blocks concatenated into one tensor per table (and per factor), on ``device``
    or, for None, in pinned host memory; copied block by block off the memory maps."""
    manifest = read_manifest(weights_dir)
    names = sorted(n for n in manifest["tensors"] if is_table(n))
    arrays = memmap_arrays(weights_dir, manifest, names)
    by_table: dict[str, list[str]] = {}
    for name in (n for n in names if not is_factor(n)):
        by_table.setdefault(name.split(".")[1], []).append(name)
    tables = {}
    for table, blocks in by_table.items():
        kind = _KIND.get(arrays[blocks[0]][1]["dtype"])
        values = _stack([arrays[b] for b in blocks], device)
        factors = {f: _stack([arrays[f"{b}.{f}"] for b in blocks], device) for f in factor_names(kind)} if kind else {}
        tables[table] = _Table(values, factors, kind)
    return tables


def _stack(parts: list[tuple[np.ndarray, dict]], device: torch.device | None) -> torch.Tensor:
    dtype = DTYPES[parts[0][1]["dtype"]][0]
    rows = sum(int(info["shape"][0]) for _, info in parts)
    shape = (rows, *parts[0][1]["shape"][1:])
    out = (
        torch.empty(shape, dtype=dtype, device=device)
        if device is not None
        else torch.empty(shape, dtype=dtype, pin_memory=True)
    )
    start = 0
    for array, _ in parts:
        with warnings.catch_warnings():  # a read-only memory map: torch warns, and we only read it
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(array).view(dtype)
        out[start : start + block.shape[0]].copy_(block)
        start += block.shape[0]
    return out
