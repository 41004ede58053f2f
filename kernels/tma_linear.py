"""The fused projections' plain GEMM (the norm run apart: ``fused_linear``'s NO_NORM prologue) rebuilt for Hopper:
persistent programs, TMA tile loads and stores, the bias and the epilogue (SiLU, or the residual add) applied to the
float32 accumulator before its one rounding.

Why a second GEMM: the package's UVQK projection is cuBLAS (no SiLU epilogue in cuBLASLt) followed by SiLU passes
over its [T, 2048] output, ~0.49 of 4.42 ms at mtgr-small's throughput workload on the H200
(bench/results/e2e-h200-s22-mtgr-small.json), and those passes already run at the bandwidth bound (session 13).
They go only if the GEMM applies SiLU itself at cuBLAS speed. ``fused_linear``'s kernel does, but loads its tiles
through the load/store units and ran 1.5x slower than cuBLAS (session 6); cuBLAS itself runs at ~95% of the bf16
peak there. This kernel is what closes that gap on Hopper if anything in Triton does: the tensor memory
accelerator feeds the tiles to wgmma, a program keeps its SM for many tiles (one launch's worth of set-up), and
the tiles go in groups of GROUP_M row blocks so the weight's columns stay in L2.

Numerics are ``fused_linear``'s (its twins are the oracle): operands in their 16-bit dtype, float32 accumulation,
bias and epilogue in float32, one rounding. Only 16-bit operands (float32 keeps the exact ieee kernel).
Whether it runs is ``why_not`` (an sm90 GPU, 16-byte-aligned rows, an eager call: torch 2.11's Inductor cannot
compile a grc op that builds host TMA descriptors; the interpreter runs it on the CPU for the tests);
``fused_linear.GEMM`` says whether the ops use it, set from measurements (bench/fused_gemm.py).

Measured on the H200 (session 24, bench/results/fused-gemm-tma-mtgr-small-h200-s24.json, mtgr-small's UVQK GEMM on
64 x 1,000 tokens): 0.464 ms with SiLU (128 x 256, the default; the other configs 0.51-0.54) against cuBLAS alone
0.335 and cuBLAS + Inductor's SiLU pass 0.523 (1.13x), the pointer-loaded kernel 0.501; with the norm compiled apart
0.518 vs torch.compile's unfused 0.568 (1.10x). So 72% of cuBLAS: the passes' time comes back only in part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.hstu_attention import INTERPRET, _round_to_bf16
from kernels.ops import _traced

SILU, RESIDUAL = 0, 1  # the epilogues (fused_linear's numbering)
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Config:
    """A tile and its pipeline. block_n / 2 columns per store when ``subtile`` (half the epilogue's registers and
    shared memory); ``flatten``: the tile and K loops pipelined as one, so the next tile's loads start during this
    tile's epilogue."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    stages: int = 3
    warps: int = 8
    subtile: bool = True
    flatten: bool = True


# The default per the H100/H200's cuBLAS pick for these shapes (nvjet 256x128, two consumer warpgroups): 128 x 256
# over 8 warps. Unmeasured as this kernel: bench/fused_gemm.py sweeps CONFIGS and says which wins.
CONFIGS = {
    "128x256": Config(),
    "128x128": Config(block_n=128, warps=4, stages=4, subtile=False),
    "128x256 unflattened": Config(flatten=False),
    "128x128 8 warps": Config(block_n=128, stages=4),
}
DEFAULT = "128x256"
INTERPRETED = Config(block_m=16, block_n=16, block_k=16, group_m=2, stages=1, warps=1)  # tails at every edge


# fmt: off
@triton.jit
def _tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile -> (row block, column block), GROUP_M row blocks at a time: consecutive tiles share a weight column
    block, which stays in L2 while the programs of a wave read it."""
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % rows, (tile % in_group) // rows


@triton.jit
def _finish(acc, off_m, off_n, Bias, r_desc, y_desc, N, EPILOGUE: tl.constexpr, ROUND_BF16: tl.constexpr,
            WIDTH: tl.constexpr):
    """One [BLOCK_M, WIDTH] part of a tile: bias, epilogue, one rounding, the TMA store (rows and columns past the
    output's edge are not written)."""
    cols = off_n + tl.arange(0, WIDTH)
    y = acc + tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 0:  # noqa: SIM108 (a constexpr branch: the residual's load is compiled only where it is read)
        y = y * tl.sigmoid(y)
    else:
        y = y + r_desc.load([off_m, off_n]).to(tl.float32)
    if ROUND_BF16:  # the interpreter's own cast truncates
        y = _round_to_bf16(y)
    y_desc.store([off_m, off_n], y.to(y_desc.dtype))


@triton.jit(do_not_specialize=["M"])  # rows vary per call: one compile for all
def _tma_linear_kernel(x_desc, w_desc, y_desc, r_desc, Bias, M, N: tl.constexpr, K: tl.constexpr,
                       EPILOGUE: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
                       PROGRAMS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       SUBTILE: tl.constexpr, FLATTEN: tl.constexpr):
    """Y = epilogue(X W^T + Bias): X [M, K] (x_desc tiles [BLOCK_M, BLOCK_K]), W [N, K] as nn.Linear holds it
    (w_desc [BLOCK_N, BLOCK_K]), Y [M, N]; the residual R [M, N] read through r_desc for EPILOGUE 1. Program p
    computes tiles p, p + PROGRAMS, ... UPCAST: the interpreter's path (its dot multiplies 16-bit values as raw
    bits): operands widened to float32 (exact), products in ieee float32; ROUND_BF16: its fp32 -> bf16 cast
    truncates, so the output is rounded to nearest by integer ops first."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # a K tail reads zeros past the edge (TMA pads): adds nothing
            a = x_desc.load([off_m, k0])
            w = w_desc.load([off_n, k0])
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.T, acc)
        if SUBTILE:  # two stores of half the columns: half the epilogue's registers and staging buffer
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            _finish(left, off_m, off_n, Bias, r_desc, y_desc, N, EPILOGUE, ROUND_BF16, BLOCK_N // 2)
            _finish(right, off_m, off_n + BLOCK_N // 2, Bias, r_desc, y_desc, N, EPILOGUE, ROUND_BF16,
                    BLOCK_N // 2)
        else:
            _finish(acc, off_m, off_n, Bias, r_desc, y_desc, N, EPILOGUE, ROUND_BF16, BLOCK_N)
# fmt: on


def why_not(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> str:
    """'' when this kernel runs x [rows, K] @ weight [N, K]^T, reading ``residual`` and writing ``out`` ([rows, N]
    each, None: absent) by TMA, else what stops it. A compile's stand-ins (fake tensors: no data pointer)
    are checked for everything but their pointers' alignment, which the launch's descriptors check again."""
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        return f"16-bit operands of one dtype only, got {x.dtype} and {weight.dtype}"
    if _traced(x):
        return (
            "eager calls and CUDA-graph captures only, not a compiled graph (torch.compile, AOTInductor): torch "
            f"{torch.__version__.split('+')[0]}'s Inductor loses the host TMA descriptors a grc op builds (KeyError on "
            "the descriptor's name, then a failed compile: tests/kernels/test_tma_linear.py, on the H200, session 24)"
        )
    if not INTERPRET and (not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] != 9):
        return f"needs an sm90 GPU (TMA, wgmma), got {x.device}"
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("output", out)):
        if t is None:
            continue
        pointer = 0 if _traced(t) else t.data_ptr() % 16
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or pointer:
            return (f"{name} must be 2-D with contiguous, 16-byte-aligned rows (TMA), got strides {tuple(t.stride())}"
                    f"{f' at {pointer} bytes past 16-byte alignment' if pointer else ''}")  # fmt: skip
    return ""


def _programs(device: torch.device) -> int:
    """One program per SM (persistent); under the interpreter a few, so that programs loop over tiles."""
    return 3 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def tma_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    epilogue: int,
    out: torch.Tensor,
    residual: torch.Tensor | None = None,
    wrap: Callable[[Any], Any] = lambda kernel: kernel,
    config: Config | None = None,
) -> torch.Tensor:
    """out [rows, N] = epilogue(x2 [rows, K] @ weight^T + bias) (fused_linear's numbering: SILU, or RESIDUAL with
    ``residual`` [rows, N]). The caller checked ``why_not`` (and that out is contiguous). ``wrap``: wrap_triton
    inside the ops; ``config``: a CONFIGS entry (the bench's sweep), else the default for the device."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    c = config or (INTERPRETED if INTERPRET else CONFIGS[DEFAULT])
    part = c.block_n // 2 if c.subtile else c.block_n
    x_desc = TensorDescriptor.from_tensor(x2, [c.block_m, c.block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [c.block_n, c.block_k])
    y_desc = TensorDescriptor.from_tensor(out, [c.block_m, part])
    r_desc = TensorDescriptor.from_tensor(residual, [c.block_m, part]) if residual is not None else y_desc
    programs = _programs(x2.device)
    wrap(_tma_linear_kernel)[(programs,)](
        x_desc, w_desc, y_desc, r_desc, bias, x2.shape[0], N=weight.shape[0], K=weight.shape[1], EPILOGUE=epilogue,
        UPCAST=INTERPRET, ROUND_BF16=INTERPRET and out.dtype == torch.bfloat16, PROGRAMS=programs,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=c.group_m, SUBTILE=c.subtile, FLATTEN=c.flatten, num_warps=c.warps, num_stages=c.stages,
    )  # fmt: skip
    return out
