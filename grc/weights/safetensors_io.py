"""Streaming safetensors: write tensor by tensor, read rows through a memory map.

safetensors.torch.save_file needs every tensor of a shard in memory at once; an 8B-parameter
model's tables do not fit that way. The format is simple (8-byte little-endian header size, a JSON
header of dtype/shape/offsets, raw bytes), so we write it ourselves in a stream and read only the
rows a request needs. Files written here load with the official ``safetensors`` library (tested).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

# safetensors dtype names <-> (torch dtype, numpy dtype used to hold the raw bytes)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "F32": (torch.float32, np.dtype("<f4")),
    "F16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<u2")),  # numpy has no bfloat16: keep the bits
    "I64": (torch.int64, np.dtype("<i8")),
    "I8": (torch.int8, np.dtype("i1")),  # int8 table rows (row-wise scale and offset beside them)
    "F8_E4M3": (torch.float8_e4m3fn, np.dtype("u1")),  # numpy has no fp8 either: keep the bits
}
TORCH_TO_ST = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name, e.g. "BF16"
    produce: Callable[[], torch.Tensor]  # called once, when this tensor's bytes are written

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype][1].itemsize


def write_streaming(
    path: Path, entries: Iterable[TensorEntry], metadata: dict[str, str], tensor_digests: dict[str, str] | None = None
) -> str:
    """Write a safetensors file holding one produced tensor in memory at a time; return its sha256.
    ``tensor_digests``: filled with each tensor's own sha256 (its bytes alone, whatever shard holds it)."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    blob += b" " * (-len(blob) % 8)  # the spec recommends 8-byte alignment of the data section
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            fh.write(chunk)
            digest.update(chunk)
        for e in entries:
            _write_tensor(fh, e, digest, tensor_digests)
    return digest.hexdigest()


def _write_tensor(fh: BinaryIO, entry: TensorEntry, digest: hashlib._Hash, own: dict[str, str] | None) -> None:
    tensor = entry.produce().contiguous()
    want = DTYPES[entry.dtype][0]
    if tensor.dtype != want or tuple(tensor.shape) != entry.shape:
        raise ValueError(f"{entry.name}: produced {tensor.dtype} {tuple(tensor.shape)}, declared {want} {entry.shape}")
    raw = tensor.view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    view = raw.numpy().data  # a memoryview of the bytes, no copy
    fh.write(view)
    digest.update(view)
    if own is not None:
        own[entry.name] = hashlib.sha256(view).hexdigest()


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data section)."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def memmap_tensor(path: Path, info: dict, data_start: int) -> np.ndarray:
    """A read-only numpy view of one tensor's bytes (BF16 as uint16 bits)."""
    begin, end = info["data_offsets"]
    dtype = DTYPES[info["dtype"]][1]
    if end == begin:
        return np.zeros(info["shape"], dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=tuple(info["shape"]))


def to_float32(rows: np.ndarray, st_dtype: str) -> torch.Tensor:
    """Rows read from a memmap -> float32 tensor (BF16 and F8_E4M3 bits are widened exactly)."""
    if st_dtype == "BF16":
        return torch.from_numpy((rows.astype(np.uint32) << 16).view(np.float32))
    if st_dtype == "F8_E4M3":
        return torch.from_numpy(np.array(rows, dtype=np.uint8)).view(torch.float8_e4m3fn).to(torch.float32)
    return torch.from_numpy(np.array(rows, dtype=np.float32))  # a writable copy, never the map itself
