"""The HSTU layer's two projections as Triton GEMMs with the layer's norms as prologue and its
pointwise tail as epilogue, each with a PyTorch twin (the float64-capable oracle):

    norm_linear_silu(x, group, gamma, beta, W, b)   = SiLU(GroupLN(x) W^T + b)      the UVQK projection
    gated_linear_residual(a, u, nw, nb, W, b, r)    = r + (LN(a) * u) W^T + b      the output projection
    linear_silu(x, W, b), linear_residual(x, W, b, r): the same with the norm run apart (epilogue only)

Unfused, each is a norm kernel, a cuBLAS GEMM and one or two pointwise kernels (SiLU and the
split into U, V, Q, K; the residual add), every one a round trip of a [T, N] activation through
HBM. Here the GEMM reads x (or a and u) once per tile, normalises it in registers before the dot,
and writes SiLU(acc + b) (or acc + b + r) once: U, V, Q, K are column slices of that one output,
which the attention and norm-gate kernels read through their strides (no split copies).

A GEMM program sees BLOCK_K columns of its rows at a time, so each row's mean and 1/std come from
``_row_stats_kernel`` first (one read of the rows, two-pass variance in registers: no
cancellation). The normalised operand is rounded to the weight's dtype before the dot, as the
unfused model rounds its norm output; accumulation, bias and epilogue are float32, one rounding
at the store. Which pays, the norm as prologue or apart (a prologue is recomputed for every N tile of a row block,
a norm apart is one more pass over memory), is measured per projection by bench/fused_gemm.py; the
model's choice is grc.model.hstu.NORM_PROLOGUE. Importing this module registers
``torch.ops.grc.{norm_linear_silu, gated_linear_residual, linear_silu, linear_residual}`` (Triton
on CUDA, the twins elsewhere, as kernels/ops.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# (imported under its own name: Inductor re-emits called jit functions by their def names)
from kernels import tma_linear
from kernels.hstu_attention import INTERPRET, _round_to_bf16
from kernels.ops import runs_kernel
from kernels.reference import compute_dtype
from kernels.tuning import PERSIST

GROUP_NORM, NORM_GATE, NO_NORM = 0, 1, 2  # prologues (NO_NORM: x is already normalised)
SILU, RESIDUAL = 0, 1  # epilogues
# The GEMM of NO_NORM calls (the norm run apart) without a KVInto: "pointer" (this module's kernel, tiles through
# the load/store units) or "tma" (kernels/tma_linear.py: persistent, TMA tiles, Hopper only, eager calls only; a call
# it cannot run raises naming why). "pointer" stays the default: on the H200 the TMA kernel is 1.08x the pointer one
# with SiLU (0.464 vs 0.501 ms at mtgr-small's UVQK), but no compiled graph can hold it with torch 2.11 (session 24).
GEMM = "pointer"
GEMMS = ("pointer", "tma")
# The operand path of the dot: the GPU's (native dtype), or the interpreter's (its tl.dot
# multiplies bf16 as raw bits and its fp32->bf16 cast truncates): operands rounded to the
# weight's dtype by integer ops (bf16) or a cast (fp16, fp32), then multiplied in fp32.
NATIVE, UPCAST_BF16, UPCAST = 0, 1, 2
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    # Hopper bf16 tiles (BLOCK_K 64) for K = 512..1024, N = 512..4096 (the HSTU widths), autotuned per
    # (N, K, prologue, epilogue): 8 warps spread a prologue over twice the threads. Each fits Hopper's
    # 227 KiB of shared memory with the prologue's pipelined norm operands (208 KiB at most: checked by
    # tests/kernels/test_fused_hopper_compile.py; 256x128 needed 240 KiB with the group norm).
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 128, 4, 4),
            (128, 256, 8, 3),
            (64, 128, 4, 4),
            (128, 64, 4, 4),
        )
    ]


# fmt: off
@triton.jit
def _row_stats_kernel(X, Stats, rows, stride_x, eps, C: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Stats[r] = (mean, 1/sqrt(var + eps)) of row r of X [rows, C], in float32."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_r < rows
    mask = row_ok[:, None] & (offs_c[None, :] < C)
    rr = offs_r.to(tl.int64)
    x = tl.load(X + rr[:, None] * stride_x + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))  # eps may arrive as fp64 from Inductor
    tl.store(Stats + rr * 2, mean, mask=row_ok)
    tl.store(Stats + rr * 2 + 1, rstd, mask=row_ok)


@triton.jit
def normed_dot(X, Stats, G, Gamma, Beta, U, W, rows, row_ok, offs_n, col_ok, stride_x, stride_g, stride_u,
               stride_wn, stride_wk, K: tl.constexpr, PROLOGUE: tl.constexpr, OPERAND: tl.constexpr,
               DOT_PREC: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """prologue(X[rows]) @ W[:, offs_n] as a float32 [BLOCK_M, BLOCK_N] tile. PROLOGUE 0: group
    LayerNorm (Gamma, Beta [groups, K], G the row's group); 1: LayerNorm (Gamma, Beta [K]) times
    U[rows]; 2: none (X already normalised). Stats: each row's (mean, 1/std) from _row_stats_kernel."""
    if PROLOGUE != 2:
        mean = tl.load(Stats + rows * 2, mask=row_ok, other=0.0)
        rstd = tl.load(Stats + rows * 2 + 1, mask=row_ok, other=0.0)
    if PROLOGUE == 0:
        grp = tl.load(G + rows * stride_g, mask=row_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a_mask = row_ok[:, None]
            w_mask = col_ok[None, :]
        else:
            a_mask = row_ok[:, None] & (offs_k[None, :] < K)
            w_mask = col_ok[None, :] & (offs_k[:, None] < K)
        a = tl.load(X + rows[:, None] * stride_x + offs_k[None, :], mask=a_mask, other=0.0)
        if PROLOGUE != 2:
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]
        if PROLOGUE == 0:  # group LayerNorm: scale and shift of the row's token kind
            affine = grp[:, None] * K + offs_k[None, :]
            gamma = tl.load(Gamma + affine, mask=a_mask, other=0.0).to(tl.float32)
            beta = tl.load(Beta + affine, mask=a_mask, other=0.0).to(tl.float32)
            a = a * gamma + beta
        elif PROLOGUE == 1:  # LayerNorm, then the gate u
            k_ok = offs_k < K
            gamma = tl.load(Gamma + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            beta = tl.load(Beta + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            u = tl.load(U + rows[:, None] * stride_u + offs_k[None, :], mask=a_mask, other=0.0).to(tl.float32)
            a = (a * gamma[None, :] + beta[None, :]) * u
        w = tl.load(W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=w_mask, other=0.0)
        if OPERAND == 1:
            a = _round_to_bf16(a.to(tl.float32))
            w = w.to(tl.float32)
        elif OPERAND == 2:
            a = a.to(w.dtype).to(tl.float32)
            w = w.to(tl.float32)
        elif PROLOGUE != 2:  # the normalised operand, rounded as the unfused model rounds its norm output
            a = a.to(w.dtype)
        # (no prologue on the GPU: a goes from memory to the tensor cores untouched, as in a plain GEMM)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    return acc


@triton.autotune(configs=_configs(), key=["N", "K", "PROLOGUE", "EPILOGUE", "SCATTER"], **PERSIST)
@triton.jit(do_not_specialize=["M"])  # rows vary per call: one compile for all (see hstu_attention.NOT_SPECIALISED)
def _fused_linear_kernel(X, Stats, G, Gamma, Beta, U, W, Bias, R, Y, M,
                         stride_x, stride_g, stride_u, stride_wn, stride_wk, stride_r, stride_y,
                         Slots, KS, VS, stride_ks, stride_vs,
                         N: tl.constexpr, K: tl.constexpr, PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr,
                         OPERAND: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_K: tl.constexpr,
                         SCATTER: tl.constexpr, K_COL: tl.constexpr, K_W: tl.constexpr, V_COL: tl.constexpr,
                         V_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[BLOCK_M, BLOCK_N] tile = epilogue(prologue(X rows) @ W^T + Bias). Programs run the N
    tiles of one row block back to back (n fastest): the row block is read from L2 after the
    first; W (at most a few MiB) stays in L2. SCATTER: Y's columns [K_COL, K_COL + K_W) and
    [V_COL, V_COL + V_W) are also stored as row Slots[m] of KS and VS (the K/V rows of a cache)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    col_ok = offs_n < N
    rows = offs_m.to(tl.int64)  # rows * stride can pass 2**31
    acc = normed_dot(X, Stats, G, Gamma, Beta, U, W, rows, row_ok, offs_n, col_ok, stride_x, stride_g, stride_u,
                     stride_wn, stride_wk, K, PROLOGUE, OPERAND, DOT_PREC, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    y = acc + tl.load(Bias + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE == 0:
        y = y * tl.sigmoid(y)
    else:
        y = y + tl.load(R + rows[:, None] * stride_r + offs_n[None, :], mask=out_mask, other=0.0).to(tl.float32)
    if OPERAND == 1:
        y = _round_to_bf16(y)
    y = y.to(Y.dtype.element_ty)
    tl.store(Y + rows[:, None] * stride_y + offs_n[None, :], y, mask=out_mask)
    if SCATTER:  # the same values (one rounding) into the cache's rows: no index_copy pass per K and V
        slot = tl.load(Slots + rows, mask=row_ok, other=0).to(tl.int64)
        col_k = offs_n - K_COL
        k_mask = out_mask & (col_k >= 0)[None, :] & (col_k < K_W)[None, :]
        tl.store(KS + slot[:, None] * stride_ks + col_k[None, :], y, mask=k_mask)
        col_v = offs_n - V_COL
        v_mask = out_mask & (col_v >= 0)[None, :] & (col_v < V_W)[None, :]
        tl.store(VS + slot[:, None] * stride_vs + col_v[None, :], y, mask=v_mask)
# fmt: on


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def check_supported(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise ValueError naming what the kernel does not run (nothing else runs it on CUDA)."""
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype:
        raise ValueError(
            f"fused linear kernel: x and the weight must share one dtype of {[str(d) for d in KERNEL_DTYPES]}, "
            f"got {x.dtype} and {weight.dtype} (float64: use impl='pytorch')"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused linear kernel: x has {x.shape[-1]} features, the weight takes {weight.shape[1]}")


def dot_settings(dtype: torch.dtype) -> tuple[int, str, int]:
    """(OPERAND, DOT_PREC, BLOCK_K) for operands of ``dtype``: fp32 operands multiply exactly
    (ieee, not tf32); the interpreter upcasts (see OPERAND) and takes small K blocks."""
    operand = (UPCAST_BF16 if dtype == torch.bfloat16 else UPCAST) if INTERPRET else NATIVE
    dot_prec = "ieee" if dtype == torch.float32 or INTERPRET else "tf32"
    return operand, dot_prec, 16 if INTERPRET else 64


@dataclass(frozen=True)
class KVInto:
    """Where a UVQK projection's K and V also go (the fused kernel's SCATTER epilogue): row ``slots[m]`` of
    ``keys`` [R, H, Dqk] and ``values`` [R, H, Dv] (a history cache's rows, each row's H x D contiguous: the
    arena's per-layer views) takes output row m's columns [k_col, k_col + H Dqk) and [v_col, v_col + H Dv).
    What ``index_copy_`` of the output's K and V views would write, without its two passes (a tenth of the
    arena step's kernel time on the H200: bench/results/history-cache-notes.md, session 19)."""

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    k_col: int
    v_col: int

    @property
    def columns(self) -> tuple[int, int, int, int]:
        """(k_col, K's width, v_col, V's width) in output columns."""
        (_, hk, dqk), (_, hv, dv) = self.keys.shape, self.values.shape  # [rows, H, D]: check() says so first
        return self.k_col, hk * dqk, self.v_col, hv * dv

    def check(self, x: torch.Tensor, n_out: int) -> None:
        """Raise ValueError naming what the epilogue cannot store (nothing else stores it on CUDA)."""
        for name, t in (("keys", self.keys), ("values", self.values)):
            if t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.dtype != x.dtype:
                raise ValueError(f"fused linear kernel: {name} must be [rows, H, D] in {x.dtype} with each row's "
                                 f"H x D contiguous, got {tuple(t.shape)} strides {t.stride()} {t.dtype}")  # fmt: skip
        k_col, k_w, v_col, v_w = self.columns
        if min(k_col, v_col) < 0 or max(k_col + k_w, v_col + v_w) > n_out:
            raise ValueError(f"fused linear kernel: K columns [{k_col}, {k_col + k_w}) and V columns [{v_col}, "
                             f"{v_col + v_w}) must lie in the output's {n_out}")  # fmt: skip
        rows = x.numel() // x.shape[-1]
        if self.slots.shape != (rows,) or self.slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"fused linear kernel: slots must be [{rows}] integers (one cache row per output "
                             f"row), got {tuple(self.slots.shape)} {self.slots.dtype}")  # fmt: skip

    def write(self, out: torch.Tensor) -> None:
        """The twin: ``out``'s K and V columns into the rows (``index_copy_``)."""
        k_col, k_w, v_col, v_w = self.columns
        flat = out.reshape(-1, out.shape[-1])
        self.keys.index_copy_(0, self.slots, flat[:, k_col : k_col + k_w].unflatten(1, self.keys.shape[1:]))
        self.values.index_copy_(0, self.slots, flat[:, v_col : v_col + v_w].unflatten(1, self.values.shape[1:]))


def row_stats(x2: torch.Tensor, eps: float, wrap: Callable[[Any], Any]) -> torch.Tensor:
    """[rows, 2] float32: each row's mean and 1 / sqrt(var + eps)."""
    rows, channels = x2.shape
    stats = torch.empty((rows, 2), dtype=torch.float32, device=x2.device)
    block_c = max(16, triton.next_power_of_2(channels))
    block_r = max(1, min(64, 4096 // block_c))
    wrap(_row_stats_kernel)[(triton.cdiv(rows, block_r),)](
        x2, stats, rows, x2.stride(0), float(eps), C=channels, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return stats


def fused_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    prologue: int,
    epilogue: int,
    *,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    eps: float = 0.0,
    group: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    wrap: Callable[[Any], Any] = lambda kernel: kernel,
    out: torch.Tensor | None = None,
    into: KVInto | None = None,
    gemm: str | None = None,
    config: Any = None,
) -> torch.Tensor:
    """Launch on x [..., K] -> [..., N] in x's dtype: the norm's gamma, beta, eps (and group, or
    the gate u) for the GROUP_NORM / NORM_GATE prologues, residual for the RESIDUAL epilogue.
    ``wrap`` is wrap_triton inside the ops; ``out`` (contiguous) lets tests pass a poisoned buffer;
    ``into``: the K and V columns also stored into a cache's rows (KVInto); ``gemm``: GEMM's choice for this call
    (NO_NORM without ``into`` only), ``config`` a kernels.tma_linear.Config for the TMA kernel (the bench's sweep)."""
    check_supported(x, weight)
    gemm = GEMM if gemm is None else gemm
    if gemm not in GEMMS:
        raise ValueError(f"fused linear kernel: gemm {gemm!r}, expected one of {GEMMS}")
    if into is not None:
        into.check(x, n_out=weight.shape[0])
    n_out, k_in = weight.shape
    x2 = _rows(x)
    rows = x2.shape[0]
    if out is None:
        out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    out = out.view(rows, n_out)
    if rows == 0:
        return out.view(*x.shape[:-1], n_out)
    if gemm == "tma" and prologue == NO_NORM and into is None:
        r2 = _rows(residual) if residual is not None else None
        reason = tma_linear.why_not(x2, weight, r2, out)
        if reason:
            raise ValueError(f"fused linear kernel: gemm 'tma' cannot run this call: {reason}")
        tma_linear.tma_linear(x2, weight, bias.contiguous(), epilogue, out, r2, wrap, config)
        return out.view(*x.shape[:-1], n_out)
    stats = row_stats(x2, eps, wrap) if prologue != NO_NORM else x2.new_empty((1, 2), dtype=torch.float32)
    g = group.reshape(-1) if group is not None else stats  # unused pointers: any tensor
    u2 = _rows(u) if u is not None else x2
    bias = bias.contiguous()
    r2 = _rows(residual) if residual is not None else bias  # never read: no alias of the output
    gamma = gamma.contiguous() if gamma is not None else bias  # unused without a norm
    beta = beta.contiguous() if beta is not None else bias
    operand, dot_prec, block_k = dot_settings(x.dtype)
    # without ``into`` the scatter's pointers are never read: any tensors
    slots, ks, vs = (into.slots, into.keys, into.values) if into is not None else (bias, out, out)
    k_col, k_w, v_col, v_w = into.columns if into is not None else (0, 0, 0, 0)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    wrap(_fused_linear_kernel)[grid](
        x2, stats, g, gamma, beta, u2, weight, bias, r2, out, rows,
        x2.stride(0), g.stride(0), u2.stride(0), weight.stride(0), weight.stride(1), r2.stride(0), out.stride(0),
        slots, ks, vs, ks.stride(0), vs.stride(0),
        N=n_out, K=k_in, PROLOGUE=prologue, EPILOGUE=epilogue, OPERAND=operand,
        DOT_PREC=dot_prec, EVEN_K=k_in % block_k == 0, SCATTER=into is not None, K_COL=k_col, K_W=k_w, V_COL=v_col,
        V_W=v_w, BLOCK_K=block_k,
    )  # fmt: skip
    return out.view(*x.shape[:-1], n_out)


# --------------------------------------------------------------------------- the PyTorch twins
# Each computes in float32 (float64 for float64 inputs) from operands rounded to the input's dtype,
# as the kernel multiplies them; one rounding at the end.
def linear_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU(x W^T + b)."""
    cdt = compute_dtype(x.dtype)
    return F.silu(F.linear(x.to(cdt), weight.to(cdt), bias.to(cdt))).to(x.dtype)


def linear_residual_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """residual + x W^T + b."""
    cdt = compute_dtype(x.dtype)
    return (residual.to(cdt) + F.linear(x.to(cdt), weight.to(cdt), bias.to(cdt))).to(x.dtype)


def group_norm_reference(
    x: torch.Tensor, group: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
) -> torch.Tensor:
    """The twins' group LayerNorm: per-row statistics, then the row's group's gamma and beta, in the
    compute dtype of x (float32, float64 for float64 x); the fused kernels' prologues compute the same."""
    cdt = compute_dtype(x.dtype)
    return F.layer_norm(x.to(cdt), x.shape[-1:], eps=eps) * gamma.to(cdt)[group] + beta.to(cdt)[group]


def norm_linear_silu_reference(
    x: torch.Tensor,
    group: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """SiLU(GroupLN(x) W^T + b), the normalised x rounded to x's dtype (as the model's norm output is)."""
    return linear_silu_reference(group_norm_reference(x, group, gamma, beta, eps).to(x.dtype), weight, bias)


def gated_linear_residual_reference(
    a: torch.Tensor,
    u: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """residual + (LN(a) * u) W^T + b, the gated operand rounded to a's dtype."""
    cdt = compute_dtype(a.dtype)
    gated = F.layer_norm(a.to(cdt), a.shape[-1:], norm_weight.to(cdt), norm_bias.to(cdt), eps) * u.to(cdt)
    return linear_residual_reference(gated.to(a.dtype), weight, bias, residual)


# --------------------------------------------------------------------------- the ops
@triton_op("grc::norm_linear_silu", mutates_args=())
def norm_linear_silu(
    x: torch.Tensor,
    group: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """SiLU(GroupLN(x) W^T + b) (gamma, beta [groups, K], group [...] ints, weight [N, K] as
    nn.Linear holds it), in x's dtype."""
    if not runs_kernel(x):
        return norm_linear_silu_reference(x, group, gamma, beta, weight, bias, eps)
    return fused_linear_triton(
        x, weight, bias, GROUP_NORM, SILU, gamma=gamma, beta=beta, eps=eps, group=group, wrap=wrap_triton
    )


@triton_op("grc::gated_linear_residual", mutates_args=())
def gated_linear_residual(
    a: torch.Tensor,
    u: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """residual + (LN(a) * u) W^T + b, in a's dtype."""
    if not runs_kernel(a):
        return gated_linear_residual_reference(a, u, norm_weight, norm_bias, weight, bias, residual, eps)
    return fused_linear_triton(
        a,
        weight,
        bias,
        NORM_GATE,
        RESIDUAL,
        gamma=norm_weight,
        beta=norm_bias,
        eps=eps,
        u=u,
        residual=residual,
        wrap=wrap_triton,
    )


@triton_op("grc::linear_silu", mutates_args=())
def linear_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU(x W^T + b) (x already normalised: the norm runs apart), in x's dtype."""
    if not runs_kernel(x):
        return linear_silu_reference(x, weight, bias)
    return fused_linear_triton(x, weight, bias, NO_NORM, SILU, wrap=wrap_triton)


@triton_op("grc::linear_residual", mutates_args=())
def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x W^T + b, in x's dtype."""
    if not runs_kernel(x):
        return linear_residual_reference(x, weight, bias, residual)
    return fused_linear_triton(x, weight, bias, NO_NORM, RESIDUAL, residual=residual, wrap=wrap_triton)


def linear_silu_into(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    into: KVInto,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """SiLU(x W^T + b), or with ``norm`` = (group, gamma, beta, eps) SiLU(GroupLN(x) W^T + b) (the prologue), its K
    and V columns also stored into ``into``'s rows. Not a registered op: it writes its arguments, and only the
    history cache's steps call it (eagerly, or captured in CUDA graphs; never traced by Inductor). Where the ops
    would run their twins (runs_kernel), the twins, then ``into.write``."""
    if not runs_kernel(x):
        into.check(x, n_out=weight.shape[0])  # as the launcher checks it
        if norm is None:
            out = linear_silu_reference(x, weight, bias)
        else:
            out = norm_linear_silu_reference(x, norm[0], norm[1], norm[2], weight, bias, norm[3])
        into.write(out)
        return out
    if norm is None:
        return fused_linear_triton(x, weight, bias, NO_NORM, SILU, into=into)
    group, gamma, beta, eps = norm
    return fused_linear_triton(x, weight, bias, GROUP_NORM, SILU, gamma=gamma, beta=beta, eps=eps, group=group,
                               into=into)  # fmt: skip
