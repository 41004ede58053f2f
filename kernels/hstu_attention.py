"""Triton forward kernel of jagged HSTU attention (math: kernels/README.md, oracle: reference.py).

One program computes BLOCK_M query rows of one user and one head. Which key blocks it visits:
- Keys past the history (j >= n_ctx) are seen only by the candidate query j itself, so that region
  is never looped over; its one allowed pair per row (the diagonal) is a row-wise dot product.
  Fully masked tiles therefore cost nothing.
- Blocks fully allowed for every row of the tile run without mask arithmetic; only the boundary
  blocks (causal diagonal, end of history) apply the mask.
- Blocks whose every pair has |p(i) - p(j)| >= P-1 ("far") have a constant clamped position, so
  their bias is one gather from a per-head row of time buckets instead of position arithmetic plus
  two gathers.

Per-score work is the bottleneck (not the two matmuls), so it is trimmed to a few instructions:
- time: a program whose timestamps span less than 2**29 s (every real history) works on int32
  offsets, and its key loops hold no int64 code (a program with a wider span takes one generic
  masked loop on the saturated int64 gap instead: same results, slower, never seen in practice);
  the bucket is the exponent of |dt| + 1 converted to float rounding toward zero (exact; one PTX
  block on the GPU);
- on that path buckets are < 32, so each lane of a warp keeps one entry of the time and far tables
  in a register and a score's entry is one warp shuffle (no address, no load);
- bias: small tables, pre-scaled by 1/2, that stay in L1: time [H, 64] (buckets past NB-1 repeat
  the last, so no clamp), position [H, 2P-1 + 2 POS_PAD] (padded with the clamped ends, so no clamp
  in unmasked near blocks, whose position loads are a row pointer minus a column constant: no
  address arithmetic per score), far [H, 2, 64] (time + the clamped position, one gather). Near
  scores add time + position in the reference's order, so the rounding is the reference's;
- SiLU is z + z*tanh(z) with z = s/2 (tanh.approx on GPU), and 1/norm is applied once per output row.

Exact for every table size: any time_buckets (a gap saturates at 2**63 - 1, bucket 63) and
position_buckets up to MAX_POSITION_BUCKETS; unsupported settings raise ValueError
(check_supported). The same kernel serves queries against cached keys: the queries of a user are
the last rows of its key sequence (q_offsets vs kv_offsets), whose keys may also be any range of
k and v (kv_offsets [B, 2]: an arena's entries, read in place).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.tuning import PERSIST

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# A program whose timestamps span less than 2**29 s works with int32 offsets to its user's first
# timestamp (|dt| < 2**29, bucket <= 29). Otherwise (spans over 17 years) a generic loop runs on
# the exact gap saturated at INT64_MAX; the results are identical.
TS_FAST_LIMIT = tl.constexpr(1 << 29)
INT64_MAX = tl.constexpr((1 << 63) - 1)
MAX_BUCKET = 63  # floor(log2(1 + INT64_MAX)): the highest bucket a saturated gap reaches
TIME_SLOTS = MAX_BUCKET + 1  # time-table columns: every reachable bucket, so no clamp in the kernel
SLOTS = tl.constexpr(TIME_SLOTS)
POS_PAD = 256  # position-table padding each side: >= BLOCK_M + BLOCK_N of every config (see _configs)
PAD = tl.constexpr(POS_PAD)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_POSITION_BUCKETS = 1 << 22  # 2P - 1 + 2 POS_PAD positions index the table in int32
NEAR, FAR_LEFT, FAR_RIGHT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# Inline-PTX variants (GPU only; the interpreter cannot run PTX): bit flags of the PTX constexpr
# (written as literals inside the kernels: the interpreter cannot mix ints and constexprs).
PTX_GATHER, PTX_CVT, PTX_SHFL = 1, 4, 8
# Key splits (key_splits): at least two 64-key blocks per part, at most 8 parts. Replayed from a CUDA graph on the
# H200 (one user, 256 / 512 queries against 1,000 / 4,096 cached keys, d 128 and 256), 8 parts were the fastest or
# within noise of it in every case, and 32 parts took ~2x as long (the fp32 partial sums to write and add):
# bench/results/kernels-explore-cached-h200-s15.json.
SPLIT_MIN_KEYS, MAX_SPLITS = 128, 8

# (BLOCK_M, BLOCK_N, warps, stages[, registers]) per padded head dim, each without spills in its key loops
# (ptxas report for sm_90). Measured on the H200 (bench/results/kernels-notes.md) with the kernel
# before the int32/int64 loop split: BLOCK_N 32 / 3 stages best at 128, 128/64/4/3 at 64. With the
# int64 code out of the key loops, 64-key blocks fit too (fewer loop overheads per score). 256
# (mtgr-small's 2 heads of 256): the accumulator alone takes 128 registers per thread at 64 rows /
# 4 warps; 8 warps need 128 rows (at 64 rows both warpgroups computed every score: twice the work).
# A fifth element caps the registers per thread (ptx .maxnreg): left to itself ptxas takes all 255 for
# every shape, so an SM holds two 4-warp programs; at 168 it holds three where shared memory allows, and
# ptxas's sm_90 report shows the key loops still free of spills (the spills it adds sit in the per-user
# segment code, run once per program). Measured on the H200 (kernels-explore-configs-h200-s15.json): at d 64
# 64/64/4/2 went 2.97 -> 2.51 ms (seq 8192) and 0.98 -> 0.84 ms (2048, now the best there); at d 128 the cap
# changed nothing (3.74 ms either way), so none is listed there. Shapes that lost at both lengths were dropped.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    64: ((128, 64, 4, 3), (64, 64, 4, 2, 168), (64, 32, 4, 3, 168)),
    128: ((64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)),
    256: ((128, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2), (128, 16, 8, 2)),
}


def _launch_options(config: tuple[int, ...]) -> dict[str, Any]:
    """The launch options of a config tuple (BLOCK_M, BLOCK_N, warps, stages[, registers])."""
    options: dict[str, Any] = {"BLOCK_M": config[0], "BLOCK_N": config[1], "num_warps": config[2],
                               "num_stages": config[3]}  # fmt: skip
    if len(config) > 4 and config[4]:
        options["maxnreg"] = config[4]
    return options


def _configs() -> list[triton.Config]:
    if INTERPRET:  # every config would be run once per call: keep one
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    shapes = sorted({c for per_dim in CONFIGS.values() for c in per_dim})
    assert all(c[0] + c[1] <= POS_PAD for c in shapes), "near blocks would index past the position padding"
    configs = []
    for shape in shapes:
        options = _launch_options(shape)
        meta = {k: options.pop(k) for k in ("BLOCK_M", "BLOCK_N")}
        configs.append(triton.Config(meta, **options))
    return configs


def _config_tuple(c: triton.Config) -> tuple[int, ...]:
    shape = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    return (*shape, c.maxnreg) if c.maxnreg else shape


def _configs_for_head_dim(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """Autotune only among the shapes listed for the kernel's padded head dim."""
    if INTERPRET:
        return configs
    dim = max(kwargs.get("BLOCK_DQK", 0), kwargs.get("BLOCK_DV", 0))
    wanted = CONFIGS[min((d for d in CONFIGS if d >= dim), default=max(CONFIGS))]
    keep = [c for c in configs if _config_tuple(c) in wanted]
    return keep or configs


# fmt: off
@triton.jit
def _act(z, FAST_SILU: tl.constexpr):
    """SiLU(s) with z = s/2: s*sigmoid(s) = z + z*tanh(z). FAST_SILU: tanh.approx.f32, one
    special-function op (rel. error ~5e-4; for 16-bit inputs on GPU). Else exact: s / (1 + e^-s)."""
    if FAST_SILU:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return z + z * t
    else:
        s = z + z
        return s / (1.0 + tl.exp(-s))


@triton.jit
def _gather(base, idx, PTX: tl.constexpr):
    """base[idx] (float32 table, int32 index >= 0). On the GPU (PTX_GATHER) through inline PTX, the
    address from an unsigned wide multiply: Triton's software pipeliner would otherwise prefetch
    the gather an iteration ahead via cp.async, holding a 64-bit pointer per score in registers."""
    if PTX & 1:  # PTX_GATHER
        return tl.inline_asm_elementwise(
            "{ .reg .u64 a; mul.wide.u32 a, $1, 4; add.u64 a, a, $2; ld.global.nc.f32 $0, [a]; }", "=r,r,l",
            [idx, base + tl.zeros_like(idx)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(base + idx)


@triton.jit
def _load(ptrs, PTX: tl.constexpr):
    """Per-score load at ready addresses (same PTX as _gather): where they are a row pointer minus
    a column constant, ptxas folds the constant into the load (no address arithmetic per score)."""
    if PTX & 1:  # PTX_GATHER
        return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [ptrs], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.load(ptrs)


@triton.jit
def _lane_value(base):
    """base[(laneid + 1) % 32] in each thread (PTX_SHFL): a per-lane register that _shfl reads a table
    from at an index whose low five bits are bucket - 1 (mod 32), as _exponent_bits' are. Triton sees a
    scalar; each thread holds its own lane's entry, which is what shfl needs."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 l; .reg .u64 a; mov.u32 l, %laneid; add.u32 l, l, 1; and.b32 l, l, 31; "
        "mul.wide.u32 a, l, 4; add.u64 a, a, $1; ld.global.nc.f32 $0, [a]; }", "=r,l", [base],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _shfl(lane_value, idx):
    """table[b] for a bucket b < 32 from the warp's registers: lane L holds table[(L + 1) % 32], and shfl
    reads only idx's low five bits, b - 1 mod 32 for idx = 1023 + b (_exponent_bits) or 127 + b
    (_exponent_bits32). One shuffle, no address arithmetic, no load. Every lane of the warp takes part
    (Triton code does not diverge)."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r",
                                     [tl.broadcast_to(lane_value, idx.shape), idx], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32, by integer ops: the interpreter's
    own fp32->bf16 cast truncates, and its round-to-nearest mode loses the carry into the exponent."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bucket32(dt, PTX: tl.constexpr):
    """floor(log2(1 + |dt|)) for int32 |dt| < 2**30, exactly (no clamp: the tables hold every bucket).

    On the GPU (PTX_CVT): the exponent field of |dt| + 1 converted to float rounding toward zero,
    exact (it never rounds up to the next power of two); on the H200 faster than bfind (the index
    of the highest set bit): 3.67 vs 3.91 ms at seq 8192 (bench/results/kernels-notes.md).
    Elsewhere the exponent of the float |dt| + 1 rounded to nearest, which can reach the next
    power of two above 2**24; an integer check corrects that."""
    if PTX & 4:  # PTX_CVT
        return tl.inline_asm_elementwise(
            "{ .reg .s32 t; .reg .f32 f; abs.s32 t, $1; add.s32 t, t, 1; cvt.rz.f32.s32 f, t; mov.b32 t, f; "
            "shr.u32 t, t, 23; sub.s32 $0, t, 127; }", "=r,r", [dt], dtype=tl.int32, is_pure=True, pack=1)
    else:
        x = tl.abs(dt) + 1
        e = (x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
        return tl.where((1 << e) > x, e - 1, e)


@triton.jit
def _offset_f64(t):
    """2**52 + 2**31 + t in float64 for int32 t, exactly, by bits: differences of two such values are the
    int32 differences, exact in float64, with no int -> float conversion per score (a quarter-rate
    instruction; dropping it gained the Gluon kernel 2-4%, not more: the kernel is latency-bound, see
    bench/results/kernels-notes.md, session 17)."""
    bits = (t ^ -2147483648).to(tl.uint32).to(tl.int64) | 0x4330000000000000
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _exponent_bits(d):
    """1023 + floor(log2(1 + |d|)) for an exact integer d in float64 (|d| < 2**53, so |d| + 1 is exact and
    its exponent field is the bucket): two float64 adds and a shift per score (the Gluon kernel's unmasked
    blocks), where _shfl reads only the low five bits."""
    return ((tl.abs(d) + 1.0).to(tl.int64, bitcast=True) >> 52).to(tl.int32)


@triton.jit
def _exponent_bits32(dt):
    """127 + floor(log2(1 + |dt|)) for int32 |dt| < 2**30 (GPU only): _bucket32's PTX without its last
    subtraction, for _shfl, which reads only the low five bits. On the H200 this kernel ran up to 7% slower
    with _exponent_bits' float64 adds in its place (bench/results/kernels-ab-h200-s17a-f64-both.json), while the
    Gluon kernel ran 2-4% faster with them."""
    return tl.inline_asm_elementwise(
        "{ .reg .s32 t; .reg .f32 f; abs.s32 t, $1; add.s32 t, t, 1; cvt.rz.f32.s32 f, t; mov.b32 t, f; "
        "shr.u32 $0, t, 23; }", "=r,r", [dt], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _abs_gap(a, b):
    """|a - b| of int64 timestamps without overflow, saturated at INT64_MAX (the rule of
    grc.model.attention.abs_time_gap): hi - lo can exceed INT64_MAX only when lo < 0, where
    lo + INT64_MAX cannot overflow; the subtraction runs only where the gap fits."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    over = (lo < 0) & (hi > tl.where(lo < 0, lo, -1) + INT64_MAX)
    return tl.where(over, INT64_MAX, hi - tl.where(over, hi, lo))


@triton.jit
def _bucket64(gap):
    """floor(log2(1 + gap)) for int64 gap in [0, INT64_MAX], exactly (at most 63).

    The exponent e of the float gap + 1 is the bucket or one above it (rounding to nearest is
    monotone and keeps powers of two, so it can reach the next power of two but never fall below
    the true one); it is one above when gap < 2**e - 1, built as (2**(e-1) - 1) * 2 + 1 so that
    e = 63 does not overflow. gap = INT64_MAX gives 63."""
    e = ((gap.to(tl.float32) + 1.0).to(tl.int32, bitcast=True) >> 23) - 127
    one = tl.full(gap.shape, 1, tl.int64)
    limit = ((one << tl.maximum(e - 1, 0).to(tl.int64)) - 1) * 2 + 1
    return tl.where((e > 0) & (gap < limit), e - 1, e)


@triton.jit
def _bias(bucket, p_i, n_start, time_base, pos_base, far_base, time_lane, far_lane,
          MASKED: tl.constexpr, REL: tl.constexpr, P: tl.constexpr,
          BLOCK_N: tl.constexpr, PTX: tl.constexpr):
    """bias[h, bucket(i, j), rp(i, j)] / 2 of the pairs of key block [n_start, n_start + BLOCK_N),
    from the tables (halved). pos_base points at rp = 0 of the padded position row."""
    if REL == NEAR:  # history keys: p(j) = j; p(i) = min(i, n_ctx) precomputed per row
        if MASKED:  # the tail may lie past the padding (non-causal: any distance)
            offs_n = n_start + tl.arange(0, BLOCK_N)
            rp = tl.minimum(tl.maximum(p_i[:, None] - offs_n[None, :], 1 - P), P - 1) + (P - 1)  # >= 0
            return _gather(time_base, bucket, PTX) + _gather(pos_base - (P - 1), rp, PTX)
        else:  # rp = p(i) - n_start - c stays within the padding (POS_PAD): a row pointer minus c
            rows = pos_base + (p_i - n_start)
            pos = _load(rows[:, None] - tl.arange(0, BLOCK_N)[None, :], PTX)
            if PTX & 8:  # PTX_SHFL
                return _shfl(time_lane, bucket) + pos
            else:
                return _gather(time_base, bucket, PTX) + pos
    elif (PTX & 8) and not MASKED:  # PTX_SHFL (the int32 path: bucket <= 29)
        return _shfl(far_lane, bucket)
    else:  # rp is clamped to +-(P-1) for every pair: the far row of the table
        return _gather(far_base, bucket, PTX)


@triton.jit
def _attn_block(acc, q, p_i, ts_i, offs_m, n_start, n_ctx, k_base, v_base, ts_base, ts_ref,
                time_base, pos_base, far_base, time_lane, far_lane, stride_kt, stride_vt, offs_dk, offs_dv,
                alpha, MASKED: tl.constexpr, REL: tl.constexpr, CAUSAL: tl.constexpr, TS64: tl.constexpr,
                FAST_SILU: tl.constexpr, P: tl.constexpr, DQK: tl.constexpr,
                DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, PTX: tl.constexpr, ABLATE: tl.constexpr):
    """acc += act(s) @ V over history keys [n_start, n_start + BLOCK_N). ts_i: the rows' int32
    offsets to ts_ref, or (TS64) their raw int64 timestamps."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[None, :] * stride_kt + offs_dk[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_dv[None, :]
    # No mask where none is needed: a mask along the contiguous head dim (even an always-true
    # one) stops 16-byte vector loads and with them the async-copy pipeline.
    if MASKED:
        col_ok = offs_n < n_ctx
        k_mask = col_ok[None, :]
        v_mask = col_ok[:, None]
        if BLOCK_DQK != DQK:
            k_mask = k_mask & (offs_dk[:, None] < DQK)
        if BLOCK_DV != DV:
            v_mask = v_mask & (offs_dv[None, :] < DV)
        kt = tl.load(k_ptrs, mask=k_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        ts_j = tl.where(col_ok, tl.load(ts_base + offs_n, mask=col_ok, other=0), ts_ref)
    else:
        kt = tl.load(k_ptrs, mask=offs_dk[:, None] < DQK, other=0.0) if BLOCK_DQK != DQK else tl.load(k_ptrs)
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0) if BLOCK_DV != DV else tl.load(v_ptrs)
        ts_j = tl.load(ts_base + offs_n)
    if DOT_UPCAST:  # interpreter: see hstu_attention_cached_triton
        kt = kt.to(tl.float32)
    qk = tl.dot(q, kt, input_precision=DOT_PREC)

    z = qk * alpha
    if not ABLATE & 1:  # (ABLATE: benchmarking only, drops stages and so gives WRONG results)
        if TS64:
            bucket = _bucket64(_abs_gap(ts_i[:, None], ts_j[None, :]))
            z = z + _bias(bucket, p_i, n_start, time_base, pos_base, far_base, time_lane, far_lane, MASKED,
                          REL, P, BLOCK_N, PTX)
        else:
            dt = ts_i[:, None] - (ts_j - ts_ref).to(tl.int32)[None, :]
            if (PTX & 8) and not MASKED:  # noqa: SIM108 (PTX_SHFL: the bucket as exponent bits, see _shfl)
                bucket = _exponent_bits32(dt)
            else:
                bucket = _bucket32(dt, PTX)
            z = z + _bias(bucket, p_i, n_start, time_base, pos_base, far_base, time_lane, far_lane, MASKED,
                          REL, P, BLOCK_N, PTX)
    a = z if ABLATE & 4 else _act(z, FAST_SILU)
    if MASKED:
        ok = col_ok[None, :]
        if CAUSAL:  # history rows see j <= i; candidate rows see every history key
            ok = ok & ((offs_n[None, :] <= offs_m[:, None]) | (offs_m[:, None] >= n_ctx))
        a = tl.where(ok, a, 0.0)
    if DOT_UPCAST:  # same rounding of a as the GPU's bf16 matmul operand, kept in fp32
        a = _round_to_bf16(a)
        v = v.to(tl.float32)
    else:
        a = a.to(v.dtype)
    return acc + tl.dot(a, v, input_precision=DOT_PREC)


@triton.jit
def _attn_loop(acc, lo, hi, q, p_i, ts_i, offs_m, n_ctx, k_base, v_base, ts_base, ts_ref,
               time_base, pos_base, far_base, time_lane, far_lane, stride_kt, stride_vt, offs_dk, offs_dv,
               alpha, MASKED: tl.constexpr, REL: tl.constexpr, CAUSAL: tl.constexpr, TS64: tl.constexpr,
               FAST_SILU: tl.constexpr, P: tl.constexpr, DQK: tl.constexpr,
               DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
               DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, PTX: tl.constexpr, ABLATE: tl.constexpr):
    for n_start in range(lo, hi, BLOCK_N):
        acc = _attn_block(acc, q, p_i, ts_i, offs_m, n_start, n_ctx, k_base, v_base, ts_base, ts_ref,
                          time_base, pos_base, far_base, time_lane, far_lane, stride_kt, stride_vt, offs_dk,
                          offs_dv, alpha,
                          MASKED, REL, CAUSAL, TS64, FAST_SILU, P, DQK, DV, BLOCK_N, BLOCK_DQK,
                          BLOCK_DV, DOT_PREC, DOT_UPCAST, PTX, ABLATE)
    return acc


@triton.jit
def _key_loops(acc, k_lo, k_hi, left_end, right_start, full_end, q, p_i, ts_i32, offs_m, n_ctx, k_base,
               v_base, ts_base, ts_ref, time_base, pos_base, far_base, stride_kt, stride_vt, offs_dk,
               offs_dv, alpha, CAUSAL: tl.constexpr, FAST_SILU: tl.constexpr,
               P: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
               DOT_UPCAST: tl.constexpr, PTX: tl.constexpr, ABLATE: tl.constexpr):
    """The key blocks [k_lo, k_hi) of one tile on the int32 time path, by kind: far-left, near,
    far-right (non-causal), then the masked tail."""
    if PTX & 8:  # PTX_SHFL: bucket <= 29 here, so one register per lane holds a table's entries
        time_lane = _lane_value(time_base)
        far_lane = _lane_value(far_base)
        far_right_lane = _lane_value(far_base + SLOTS)
    else:
        time_lane = 0.0
        far_lane = 0.0
        far_right_lane = 0.0
    acc = _attn_loop(acc, k_lo, tl.minimum(left_end, k_hi), q, p_i, ts_i32, offs_m, n_ctx, k_base, v_base,
                     ts_base, ts_ref, time_base, pos_base, far_base, time_lane, far_lane, stride_kt,
                     stride_vt, offs_dk, offs_dv, alpha, False, FAR_LEFT, CAUSAL, False, FAST_SILU, P, DQK,
                     DV, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PREC, DOT_UPCAST, PTX, ABLATE)
    acc = _attn_loop(acc, tl.maximum(left_end, k_lo), tl.minimum(right_start, k_hi), q, p_i, ts_i32, offs_m,
                     n_ctx, k_base, v_base, ts_base, ts_ref, time_base, pos_base, far_base, time_lane,
                     far_lane, stride_kt, stride_vt, offs_dk, offs_dv, alpha, False, NEAR, CAUSAL, False,
                     FAST_SILU, P, DQK, DV, BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PREC, DOT_UPCAST, PTX, ABLATE)
    if not CAUSAL:  # causal rows never see keys right of themselves
        acc = _attn_loop(acc, tl.maximum(right_start, k_lo), tl.minimum(full_end, k_hi), q, p_i, ts_i32, offs_m,
                         n_ctx, k_base, v_base, ts_base, ts_ref, time_base, pos_base,
                         far_base + SLOTS, time_lane, far_right_lane, stride_kt, stride_vt, offs_dk, offs_dv, alpha,
                         False, FAR_RIGHT, CAUSAL, False, FAST_SILU, P, DQK, DV, BLOCK_N, BLOCK_DQK,
                         BLOCK_DV, DOT_PREC, DOT_UPCAST, PTX, ABLATE)
    acc = _attn_loop(acc, tl.maximum(full_end, k_lo), k_hi, q, p_i, ts_i32, offs_m, n_ctx, k_base, v_base,
                     ts_base, ts_ref, time_base, pos_base, far_base, time_lane, far_lane, stride_kt,
                     stride_vt, offs_dk, offs_dv, alpha, True, NEAR, CAUSAL, False, FAST_SILU, P, DQK, DV,
                     BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PREC, DOT_UPCAST, PTX, ABLATE)
    return acc


@triton.jit
def _attend_segment(Q, K, V, Out, ts, time_tab, pos_tab, far_tab, q_row0, kv_start, n_ctx, m0, m_end, h,
                    split, n_split, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot,
                    stride_oh, alpha, inv_norm,
                    CAUSAL: tl.constexpr, FAST_SILU: tl.constexpr, ALLOW_TS_FAST: tl.constexpr,
                    P: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, PTX: tl.constexpr,
                    ABLATE: tl.constexpr, PARTIAL: tl.constexpr):
    """Output rows [m0, m_end) (positions in the user's sequence, at most BLOCK_M of them) of the
    user whose keys start at token `kv_start`, head h. Row m is query/output token q_row0 + m.
    With n_split > 1 only key blocks of part `split` of the row's key range are summed (PARTIAL:
    an fp32 partial sum, added to the others' by the launcher)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < m_end
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + (q_row0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_dk[None, :]
    q_mask = row_ok[:, None]
    if BLOCK_DQK != DQK:
        q_mask = q_mask & (offs_dk[None, :] < DQK)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
    p_i = tl.minimum(offs_m, n_ctx)  # candidates all sit at position n_ctx
    ts_base = ts + kv_start  # timestamps follow the keys' layout; a row's is its key's
    ts_ref = tl.load(ts_base)
    ts_i = tl.where(row_ok, tl.load(ts_base + offs_m, mask=row_ok, other=0), tl.load(ts_base + m0))
    k_base = K + kv_start * stride_kt + h * stride_kh
    v_base = V + kv_start * stride_vt + h * stride_vh
    # Table pointers: time / far indexed by the bucket, position pointing at rp = 0.
    h64 = h.to(tl.int64)
    time_base = time_tab + h64 * SLOTS
    pos_base = pos_tab + h64 * (2 * P - 1 + 2 * PAD) + PAD + P - 1
    far_base = far_tab + h64 * (2 * SLOTS)

    # Key ranges. History keys a row of this tile may see: causal j <= i (candidate rows: all
    # history keys), non-causal all history keys. Blocks below full_end need no mask.
    m1 = m_end
    p_lo = tl.minimum(m0, n_ctx)  # smallest / largest position among the tile's rows
    p_hi = tl.minimum(m1 - 1, n_ctx)
    if CAUSAL:
        hi = tl.minimum(m1, n_ctx)
        full_end = (tl.minimum(m0 + 1, n_ctx) // BLOCK_N) * BLOCK_N
    else:
        hi = n_ctx
        full_end = (n_ctx // BLOCK_N) * BLOCK_N
    # Split over keys: HSTU has no softmax, so partial sums over disjoint key blocks simply add.
    per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N), n_split) * BLOCK_N
    k_lo = tl.minimum(split * per_split, hi)
    k_hi = tl.minimum(k_lo + per_split, hi)
    # far-left blocks: n0 + BLOCK_N - 1 <= p_lo - (P-1); far-right: n0 >= p_hi + P - 1.
    left_end = tl.minimum((tl.maximum(p_lo - P + 2, 0) // BLOCK_N) * BLOCK_N, full_end)
    right_start = tl.minimum(tl.maximum(((p_hi + P - 1 + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, left_end), full_end)

    fast = False
    if ALLOW_TS_FAST:  # int32 offsets (to ts_ref) if every timestamp this program reads lies within 2**29
        # (wide steps, elementwise min / max, one reduction at the end: this scan is overhead)
        lo_j = tl.full([256], 0, tl.int64) + ts_ref
        hi_j = lo_j
        for n_start in range(k_lo, k_hi, 256):
            offs_n = n_start + tl.arange(0, 256)
            ts_j = tl.load(ts_base + offs_n, mask=offs_n < k_hi, other=0)
            lo_j = tl.minimum(lo_j, tl.where(offs_n < k_hi, ts_j, ts_ref))
            hi_j = tl.maximum(hi_j, tl.where(offs_n < k_hi, ts_j, ts_ref))
        t_min = tl.minimum(tl.min(ts_i), tl.min(lo_j))
        t_max = tl.maximum(tl.max(ts_i), tl.max(hi_j))
        fast = _abs_gap(t_max, t_min) < TS_FAST_LIMIT  # no wrap-around even for INT64_MIN..INT64_MAX

    # Either the loops by kind on the int32 time path or, where the span is too wide, one generic
    # masked loop on the saturated int64 gap; chosen by empty ranges, not by an if/else around the
    # loops (ptxas then serialises every wgmma of the kernel: warning C7515).
    k_mid = tl.where(fast, k_hi, k_lo)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc = _key_loops(acc, k_lo, k_mid, left_end, right_start, full_end, q, p_i, (ts_i - ts_ref).to(tl.int32),
                     offs_m, n_ctx, k_base, v_base, ts_base, ts_ref, time_base, pos_base, far_base,
                     stride_kt, stride_vt, offs_dk, offs_dv, alpha, CAUSAL, FAST_SILU, P, DQK, DV,
                     BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PREC, DOT_UPCAST, PTX, ABLATE)
    acc = _attn_loop(acc, k_mid, k_hi, q, p_i, ts_i, offs_m, n_ctx, k_base, v_base, ts_base, ts_ref,
                     time_base, pos_base, far_base, 0.0, 0.0, stride_kt, stride_vt, offs_dk, offs_dv,
                     alpha, True, NEAR, CAUSAL, True, FAST_SILU, P, DQK, DV, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                     DOT_PREC, DOT_UPCAST, PTX, ABLATE)

    # Candidate rows also see themselves (rp = 0, dt = 0): the only allowed key past the history
    # (added by part 0 of a split).
    if (m_end > n_ctx) & (split == 0):
        cand = row_ok & (offs_m >= n_ctx)
        kd_mask = cand[:, None] & (offs_dk[None, :] < DQK)
        vd_mask = cand[:, None] & (offs_dv[None, :] < DV)
        kd = tl.load(k_base + offs_m[:, None] * stride_kt + offs_dk[None, :], mask=kd_mask, other=0.0)
        vd = tl.load(v_base + offs_m[:, None] * stride_vt + offs_dv[None, :], mask=vd_mask, other=0.0)
        # q is re-read rather than kept live in registers through the key loops (register pressure).
        qd = tl.load(q_ptrs, mask=kd_mask, other=0.0)
        diag_bias = tl.load(time_base) + tl.load(pos_base)  # bucket 0, rp 0
        z_d = alpha * tl.sum(qd.to(tl.float32) * kd.to(tl.float32), axis=1) + diag_bias
        acc += tl.where(cand, _act(z_d, FAST_SILU), 0.0)[:, None] * vd.to(tl.float32)

    out = acc * inv_norm  # 1/norm once per output instead of once per score
    if DOT_UPCAST and not PARTIAL:
        out = _round_to_bf16(out)  # now exact in bf16, so the interpreter's truncating cast is exact
    o_ptrs = Out + (q_row0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


# SEQ_BUCKET (keys per user, a power of two) keys the tuning: the best shape differs between seq
# 512 and 8192, and the first call's shape must not decide for every later one.
AUTOTUNE_KEY = ["H", "CAUSAL", "BLOCK_DQK", "BLOCK_DV", "FAST_SILU", "ALLOW_TS_FAST", "PARTIAL",
                "SEQ_BUCKET"]


# Sizes that vary from call to call are not specialised on (value 1, multiples of 16): each new combination
# would compile every autotuning config again (~4.5 s each on the H200), on a served request's path (the
# history cache's batched steps stalled for seconds that way: bench/results/history-cache-notes.md, session 9).
NOT_SPECIALISED = ["T", "B", "stride_os", "SEQ_BUCKET"]


@triton.autotune(
    configs=_configs(), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _configs_for_head_dim}, **PERSIST
)
@triton.jit(do_not_specialize=NOT_SPECIALISED)
def _hstu_fwd_kernel(Q, K, V, Out, q_offsets, kv_offsets, ts, ncand, time_tab, pos_tab, far_tab, T, B,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     stride_os, alpha, inv_norm, H, SEQ_BUCKET,
                     CAUSAL: tl.constexpr, FAST_SILU: tl.constexpr, ALLOW_TS_FAST: tl.constexpr,
                     P: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                     DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, PTX: tl.constexpr,
                     ABLATE: tl.constexpr, SEARCH: tl.constexpr, PARTIAL: tl.constexpr, KV_STRIDE: tl.constexpr):
    """One program per window of BLOCK_M consecutive query tokens (all users flattened) and head.

    Per user b the queries q_offsets[b]..q_offsets[b+1] are the last rows of the sequence whose
    keys, values and timestamps kv_offsets[b]..kv_offsets[b+1] hold (full attention: the same
    offsets; cached keys: a suffix), or with KV_STRIDE 2 kv_offsets[b, 0]..kv_offsets[b, 1] (key
    ranges). The grid needs only T (query tokens) and H, no host-side tile list. A window inside
    one user is one tile; one that spans users is cut at their boundaries. Windows run last-first:
    late rows of a causal user see the most keys, so the longest work starts first and the launch
    has a short tail. Grid axis 2 splits each window's key range (PARTIAL: Out is an fp32
    [splits, T, H, Dv] buffer of partial sums).
    """
    h = tl.program_id(1)
    split = tl.program_id(2)
    Out += split.to(tl.int64) * stride_os
    # torch.compile / AOTInductor may pass Python-float arguments as fp64 (Inductor's default for
    # unbacked floats since torch 2.10): fp64 scalars would promote the fp32 accumulator
    alpha = tl.cast(alpha, tl.float32)
    inv_norm = tl.cast(inv_norm, tl.float32)
    win_lo = ((tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M).to(tl.int64)
    win_hi = tl.minimum(win_lo + BLOCK_M, T)
    # First user of the window: how many users' queries end at or before win_lo (vector scan).
    b = 0
    for c in range(0, B, SEARCH):
        idx = c + tl.arange(0, SEARCH)
        ends = tl.load(q_offsets + 1 + idx, mask=idx < B, other=T + 1)
        b += tl.sum((ends <= win_lo).to(tl.int32))
    seg_lo = win_lo
    while seg_lo < win_hi:
        q_start = tl.load(q_offsets + b)
        q_end = tl.load(q_offsets + b + 1)
        seg_hi = tl.minimum(q_end, win_hi)
        if seg_hi > seg_lo:  # users without queries give empty segments
            kv_start = tl.load(kv_offsets + b * KV_STRIDE)  # KV_STRIDE 1: offsets [B+1]; 2: ranges [B, 2]
            length = (tl.load(kv_offsets + b * KV_STRIDE + 1) - kv_start).to(tl.int32)
            shift = length - (q_end - q_start).to(tl.int32)  # sequence position of the user's first query
            if shift >= 0:
                n_ctx = length - tl.load(ncand + b).to(tl.int32)
                _attend_segment(Q, K, V, Out, ts, time_tab, pos_tab, far_tab, q_start - shift, kv_start,
                                n_ctx, (seg_lo - q_start).to(tl.int32) + shift,
                                (seg_hi - q_start).to(tl.int32) + shift, h, split, tl.num_programs(2),
                                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                                alpha, inv_norm, CAUSAL, FAST_SILU, ALLOW_TS_FAST, P, DQK, DV, BLOCK_M,
                                BLOCK_N, BLOCK_DQK, BLOCK_DV, DOT_PREC, DOT_UPCAST, PTX, ABLATE, PARTIAL)
            else:  # more queries than keys: not a suffix. NaN rows, never a plausible result
                rows = seg_lo + tl.arange(0, BLOCK_M)
                offs_dv = tl.arange(0, BLOCK_DV)
                o_ptrs = Out + rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :]
                nan = tl.full([BLOCK_M, BLOCK_DV], float("nan"), tl.float32)
                tl.store(o_ptrs, nan.to(Out.dtype.element_ty), mask=(rows < seg_hi)[:, None] & (offs_dv[None, :] < DV))
            seg_lo = seg_hi
        b += 1


@triton.jit
def _tables_kernel(pos_w, ts_w, time_tab, pos_tab, far_tab, stride_p, stride_t, scale,
                   P: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per head h (axis 0) and chunk of BLOCK_R columns (axis 1), every value scale * (...):
    pos_tab[h, c] = pos_w[h, clamp(c - PAD, 0, 2P-2)] (padded with the clamped ends); chunk 0 also
    time_tab[h, b] = ts_w[h, min(b, NB-1)] and far_tab[h, 0 / 1, b] = ts_w[h, min(b, NB-1)] +
    pos_w[h, 2P-2 / 0]. One launch, any P."""
    h = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    width = 2 * P - 1 + 2 * PAD
    src = tl.minimum(tl.maximum(c - PAD, 0), 2 * P - 2)
    pw = tl.load(pos_w + h * stride_p + src, mask=c < width, other=0.0).to(tl.float32)
    tl.store(pos_tab + h * width + c, pw * scale, mask=c < width)
    bk = tl.arange(0, SLOTS)
    tw = tl.load(ts_w + h * stride_t + tl.minimum(bk, NB - 1)).to(tl.float32)
    if tl.program_id(1) == 0:
        p_max = tl.load(pos_w + h * stride_p + 2 * P - 2).to(tl.float32)
        p_min = tl.load(pos_w + h * stride_p).to(tl.float32)
        tl.store(time_tab + h * SLOTS + bk, tw * scale)
        tl.store(far_tab + h * (2 * SLOTS) + bk, (tw + p_max) * scale)
        tl.store(far_tab + h * (2 * SLOTS) + SLOTS + bk, (tw + p_min) * scale)


@triton.jit
def _sum_parts_kernel(Parts, Out, n, stride_part, PARTS: tl.constexpr, ROUND_BF16: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Out[i] = Parts[0, i] + Parts[1, i] + ... in float32, in part order (deterministic), one rounding."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(Parts + offs, mask=mask, other=0.0)
    for p in tl.static_range(1, PARTS):
        acc += tl.load(Parts + p * stride_part + offs, mask=mask, other=0.0)
    if ROUND_BF16:  # the interpreter's fp32 -> bf16 cast truncates
        acc = _round_to_bf16(acc)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)
# fmt: on


# The bias tables of each eager call's weights, kept: they depend on the layer's weights alone, and served layers
# call the kernel with the same weights every time (one _tables_kernel launch and three allocations per layer and
# call: 8 us of session 19's 0.386 ms history step, 4.6 us of the 0.29 ms mtgr-small latency call, H200). Keyed by
# the weights' storage and version counter, so an in-place update (load_state_dict, copy_) computes anew; an entry
# holds its weights, so their storage cannot be freed and its address reused by other weights while the key stands.
# Never evicted (a CUDA graph captured with a hit reads the entry's tables at replay); past TABLE_CACHE_SIZE entries,
# calls compute their own.
TABLE_CACHE_SIZE = 256
Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_TABLE_CACHE: dict[tuple[Any, ...], tuple[Tables, tuple[torch.Tensor, torch.Tensor]]] = {}


def _table_key(pos_w: torch.Tensor, ts_w: torch.Tensor, scale: float) -> tuple[Any, ...] | None:
    """The cache key of eager weights, or None where an entry cannot be trusted: traced (fake, functional or other
    tensor subclasses) or inference tensors (no version counter)."""
    if torch.compiler.is_compiling() or any(type(w) not in (torch.Tensor, torch.nn.Parameter) for w in (pos_w, ts_w)):
        return None
    try:
        versions = (pos_w._version, ts_w._version)
    except RuntimeError:  # an inference tensor
        return None
    layout = tuple((w.data_ptr(), tuple(w.shape), w.stride(), w.dtype) for w in (pos_w, ts_w))
    return (pos_w.device, layout, versions, float(scale))


def bias_tables(
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    scale: float,
    wrap: Callable[[Any], Any] = lambda kernel: kernel,
) -> Tables:
    """The kernel's bias tables, float32, every value times ``scale`` (0.5 feeds z = s/2, exact):
    time [H, TIME_SLOTS], position [H, 2P-1 + 2 POS_PAD], far [H, 2, TIME_SLOTS] (position clamped
    to +(P-1), then -(P-1)). The tables of eager weights are kept (_TABLE_CACHE): never write to them."""
    key = _table_key(pos_w, ts_w, scale)
    if key is not None and key in _TABLE_CACHE:
        return _TABLE_CACHE[key][0]
    heads = ts_w.shape[0]
    num_pos = (pos_w.shape[1] + 1) // 2
    width = 2 * num_pos - 1 + 2 * POS_PAD
    dev = ts_w.device
    time_tab = torch.empty((heads, TIME_SLOTS), dtype=torch.float32, device=dev)
    pos_tab = torch.empty((heads, width), dtype=torch.float32, device=dev)
    far = torch.empty((heads, 2, TIME_SLOTS), dtype=torch.float32, device=dev)
    block_r = 128 if INTERPRET else 256
    wrap(_tables_kernel)[(heads, triton.cdiv(width, block_r))](
        pos_w, ts_w, time_tab, pos_tab, far, pos_w.stride(0), ts_w.stride(0), float(scale),
        P=num_pos, NB=ts_w.shape[1], BLOCK_R=block_r, num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    # not inside a CUDA graph capture: its kernels run only at replay, so these tables are not written yet
    capturing = pos_w.is_cuda and torch.cuda.is_current_stream_capturing()
    if key is not None and not capturing and len(_TABLE_CACHE) < TABLE_CACHE_SIZE:
        _TABLE_CACHE[key] = ((time_tab, pos_tab, far), (pos_w, ts_w))
    return time_tab, pos_tab, far


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_w: torch.Tensor) -> None:
    """Raise ValueError naming any setting the kernel does not run (no other code path runs it)."""
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"hstu attention kernel: q, k, v must share one dtype of {[str(d) for d in KERNEL_DTYPES]}, "
            f"got {q.dtype}, {k.dtype}, {v.dtype} (float64: use impl='pytorch')"
        )
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"hstu attention kernel: head dims up to {MAX_HEAD_DIM}, got qk {q.shape[-1]}, v {v.shape[-1]}"
        )
    num_pos = (pos_w.shape[1] + 1) // 2
    if num_pos > MAX_POSITION_BUCKETS:
        raise ValueError(
            f"hstu attention kernel: position_buckets up to {MAX_POSITION_BUCKETS} (int32 bias-table index), "
            f"got {num_pos}"
        )


def launch_buffers(
    q: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    splits: int | None,
    kernel: str,
    num_keys: int,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """What a launch of either attention kernel writes (this one, kernels/hstu_hopper.py): -> (the output, ``out`` or
    a new [Tq, H, Dv] in q's dtype; the key parts, ``splits`` or key_splits' choice for ``num_keys`` (key_count);
    the kernel's destination, the output itself for one part, else fp32 partial sums [parts, Tq, H, Dv] the launcher
    adds in a fixed order). Raises ValueError (prefixed ``kernel``) for fewer than one part."""
    total, heads, _ = q.shape
    dv = v.shape[-1]
    if out is None:
        out = torch.empty((total, heads, dv), dtype=q.dtype, device=q.device)
    if total == 0:
        return out, 1, out
    n_split = key_splits(q, num_keys) if splits is None else splits
    if n_split < 1:
        raise ValueError(f"{kernel}: splits must be >= 1, got {n_split}")
    dest = out if n_split == 1 else torch.empty((n_split, total, heads, dv), dtype=torch.float32, device=q.device)
    return out, n_split, dest


def finish_parts(dest: torch.Tensor, out: torch.Tensor, wrap: Callable[[Any], Any] = lambda kernel: kernel) -> None:
    """out = the key parts' fp32 partial sums ``dest`` [parts, Tq, H, Dv] added in part order, rounded once to out's
    dtype: one kernel (torch's ``out.copy_(dest.sum(0))`` was two, a reduce and a cast: 0.031 of mtgr-small's
    0.294 ms latency call on the H200, e2e-h200-s19-mtgr-small-silu.json)."""
    n = out.numel()
    if not out.is_contiguous():
        raise ValueError(f"attention output must be contiguous to finish a key split, got strides {out.stride()}")
    block = 1024
    wrap(_sum_parts_kernel)[(triton.cdiv(n, block),)](
        dest, out, n, dest.stride(0), PARTS=dest.shape[0], ROUND_BF16=INTERPRET and out.dtype == torch.bfloat16,
        BLOCK=block, num_warps=1 if INTERPRET else 4,
    )  # fmt: skip


def key_count(k: torch.Tensor, q_offsets: torch.Tensor, kv_offsets: torch.Tensor, max_user_keys: int | None) -> int:
    """All users' keys, bounded on the host (no device read), for key_splits and the autotuning key; checks the key
    layout. Offsets [B+1] (q_offsets' shape): k's rows. Ranges [B, 2] (an arena's entries, anywhere in k): k's rows
    say nothing, so the caller's bound on one user's keys is required, times the users."""
    users = q_offsets.numel() - 1
    if kv_offsets.dim() == 2:
        if tuple(kv_offsets.shape) != (users, 2):
            raise ValueError(f"kv ranges must be [users, 2] = [{users}, 2] (start, end), got {tuple(kv_offsets.shape)}")
        if max_user_keys is None:
            raise ValueError("kv ranges need max_user_keys, a bound on one user's keys (read on the host: no sync)")
        return users * max_user_keys
    if q_offsets.shape != kv_offsets.shape:
        raise ValueError(f"q_offsets {tuple(q_offsets.shape)} and kv_offsets {tuple(kv_offsets.shape)} must match")
    return k.shape[0]


def key_splits(q: torch.Tensor, num_keys: int) -> int:
    """Parts to cut each window's key range into (``split_count`` for this launch): 1 on a CPU, under the interpreter
    and for symbolic shapes (torch.compile / export: no shape guards)."""
    if not q.is_cuda or INTERPRET or not isinstance(q.shape[0], int) or not isinstance(num_keys, int):
        return 1
    return split_count(triton.cdiv(q.shape[0], 64) * q.shape[1], int(q.shape[2]), num_keys, _sm_count(q.device))


def split_count(windows: int, head_dim: int, num_keys: int, sms: int) -> int:
    """Parts to cut each of ``windows`` (query windows x heads, BLOCK_M 64: the smallest tuned window) key ranges
    into: 1 when the windows already fill the GPU's resident program slots, else enough parts for that, each at least
    SPLIT_MIN_KEYS keys (of all users' keys: a host-side bound, no device sync), at most MAX_SPLITS. One user's few
    queries against a long cached history is the case this is for. Slots: 2 programs per SM up to head dim 128, 1
    above (a head dim 256 program's K/V stages take most of an SM's shared memory). Measured on the H200 (the Gluon
    kernel, one user, graph replays; kernels-explore-hopper-oneuser-h200-s24.json): at 2 heads of d 256 x 1,515
    tokens (48 windows) 3 parts took 33.7 us and 2 parts 33.4, the rule of two slots per SM for every head dim
    37.9 us; at 4 heads of d 128 (96 windows) 3 parts 29.2 us, 2 parts 32.3; 4 heads of d 256 x 256 queries
    against 4,352 keys (16 windows) 8 parts 30.3 us, 4 / 11 / 16 parts 36-41."""
    slots = sms * (2 if head_dim <= 128 else 1)
    return max(1, min(-(-slots // max(windows, 1)), num_keys // SPLIT_MIN_KEYS, MAX_SPLITS))


def tuning_buckets(max_seq_len: int) -> list[int]:
    """Every SEQ_BUCKET (autotuning key) a model of ``max_seq_len`` can meet: a user holds at most
    max_seq_len keys, so keys per user never round past its power of two."""
    top = min(max(triton.next_power_of_2(max_seq_len), 256), 16384)
    return [1 << e for e in range(8, top.bit_length())]


def seq_bucket(num_keys: Any, users: int) -> int:
    """Keys per user rounded up to a power of two in [256, 16384] (the autotuning key); 0 for
    symbolic shapes (torch.compile / export: no shape guards)."""
    if not isinstance(num_keys, int) or not isinstance(users, int):
        return 0
    return min(max(triton.next_power_of_2(triton.cdiv(num_keys, max(users, 1))), 256), 16384)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def ptx_variants(q: torch.Tensor, ptx: int | None) -> int:
    if not q.is_cuda or INTERPRET:
        return 0
    return PTX_GATHER | PTX_CVT | PTX_SHFL if ptx is None else ptx


def hstu_attention_cached_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    fast_silu: bool | None = None,
    allow_ts_fast: bool = True,
    wrap: Callable[[Any], Any] = lambda kernel: kernel,
    out: torch.Tensor | None = None,
    config: tuple[int, ...] | None = None,
    ablate: int = 0,
    ptx: int | None = None,
    splits: int | None = None,
    max_user_keys: int | None = None,
) -> torch.Tensor:
    """Launch the kernel: per user the queries q[q_offsets[b]:q_offsets[b+1]] are the last rows of
    the sequence k, v, timestamps[kv_offsets[b]:kv_offsets[b+1]], or with kv_offsets [B, 2] of
    k, v, timestamps[kv_offsets[b, 0]:kv_offsets[b, 1]] (key ranges: an arena's entries; then
    max_user_keys, a host-side bound on one user's keys, sizes the key split and the autotuning key)
    (contract: reference.hstu_attention_cached). -> [Tq, H, Dv]. A user with more queries than keys gets NaN
    rows (the kernel cannot raise). ``wrap`` is torch.library.wrap_triton inside the custom op;
    ``out`` (optional, [Tq, H, Dv] in q's dtype) lets tests pass a poisoned buffer.

    fast_silu: None picks tanh.approx for 16-bit inputs on a GPU (never under the interpreter,
    which cannot run inline PTX). allow_ts_fast=False forces the int64 time-gap path (tests).
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages[, max registers]) to skip autotuning (checks that compile many
    variants). ablate: benchmarking only, a bitmask of per-score stages to drop, which makes the
    result WRONG: 1 bias (time bucket and gathers), 4 activation. ptx: which inline-PTX variants
    to use (PTX_GATHER: table loads; PTX_CVT: the time bucket; PTX_SHFL: time and far tables read by
    warp shuffles on the int32 path); None = all three on a GPU, none under the interpreter.
    splits: how many parts each query window's key range is cut into (fp32 partial sums, added
    in a fixed order: deterministic); None = key_splits' choice (> 1 only when the grid is small).
    """
    check_supported(q, k, v, pos_w)
    num_keys = key_count(k, q_offsets, kv_offsets, max_user_keys)
    out, n_split, dest = launch_buffers(q, v, out, splits, "hstu attention kernel", num_keys)
    total, heads, dqk = q.shape
    dv = v.shape[-1]
    if total == 0:
        return out
    if fast_silu is None:
        fast_silu = q.dtype != torch.float32 and q.is_cuda and not INTERPRET
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    # The interpreter's tl.dot (triton 3.9) multiplies bfloat16 operands as their raw uint16 bits
    # and its fp32->bf16 casts truncate; there, bf16 dot operands are upcast to fp32 (the same
    # exact products) and roundings to bf16 are done by integer ops (see _round_to_bf16).
    upcast = INTERPRET and q.dtype == torch.bfloat16
    num_pos = (pos_w.shape[1] + 1) // 2
    if pos_w.stride(1) != 1 or ts_w.stride(1) != 1:
        pos_w, ts_w = pos_w.contiguous(), ts_w.contiguous()
    time_tab, pos_tab, far_tab = bias_tables(pos_w, ts_w, 0.5, wrap)  # z = s / 2, see _act
    kernel, fixed = _hstu_fwd_kernel, {}
    if config is not None:  # (BLOCK_M, BLOCK_N, warps, stages[, registers])
        kernel = _hstu_fwd_kernel.fn
        fixed = _launch_options(config)

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(total, meta["BLOCK_M"]), heads, n_split)

    users = q_offsets.numel() - 1
    wrap(kernel)[grid](
        q,
        k,
        v,
        dest,
        q_offsets.contiguous(),
        kv_offsets.contiguous(),
        timestamps.contiguous(),
        num_candidates.contiguous(),
        time_tab,
        pos_tab,
        far_tab,
        total,
        users,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dest.stride(-3),
        dest.stride(-2),
        dest.stride(0) if n_split > 1 else 0,
        0.5 * float(alpha),
        1.0 / float(norm),
        heads,
        seq_bucket(num_keys, users),
        CAUSAL=bool(causal),
        FAST_SILU=bool(fast_silu),
        ALLOW_TS_FAST=bool(allow_ts_fast),
        P=num_pos,
        DQK=dqk,
        DV=dv,
        BLOCK_DQK=max(16, triton.next_power_of_2(dqk)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        DOT_PREC="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        DOT_UPCAST=upcast,
        PTX=ptx_variants(q, ptx),
        ABLATE=ablate,
        SEARCH=256,
        PARTIAL=n_split > 1,
        KV_STRIDE=kv_offsets.dim(),  # offsets [B+1]: 1; ranges [B, 2]: 2
        **fixed,
    )
    if n_split > 1:
        finish_parts(dest, out, wrap)
    return out


def tune_cached(
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    max_seq_len: int,
    head_qk: int,
    head_v: int,
    dtype: torch.dtype,
    ranges: bool = False,
) -> list[tuple[int, bool]]:
    """Autotune the kernel for every key a model's steps can meet (``tuning_buckets`` x one part / split parts), on
    synthetic inputs of each key's size, so that a server does it at load and no request waits for it (~18 s per
    key when its configs compile, ~1 s when they are compiled, on the H200). Where the eager path runs the Gluon sm90
    kernel instead (kernels.hstu_hopper.runs), that one is compiled (no autotuning: one config per head dim).
    ``pos_w`` / ``ts_w``: one layer's tables, on the device (their shapes fix the kernel's constants). -> the
    (bucket, split) keys run."""
    from kernels import hstu_hopper  # (imports this module)

    heads, device = pos_w.shape[0], pos_w.device
    gen = torch.Generator().manual_seed(0)
    done = []
    for bucket in tuning_buckets(max_seq_len):
        queries = min(bucket, 128)
        q, k, v = (
            torch.randn(n, heads, d, generator=gen).to(device, dtype)
            for n, d in ((queries, head_qk), (bucket, head_qk), (bucket, head_v))
        )
        stamps = (1_750_000_000 - torch.arange(bucket, 0, -1) * 60).to(device)
        q_off = torch.tensor([0, queries], device=device)
        # ranges: the keys as [users, 2] (start, end), the addressing the history cache's arena step uses (KV_STRIDE
        # 2, its own compiled variants: tuned here, or a capture on a request's path compiles them, session 19)
        kv_off = torch.tensor([[0, bucket]] if ranges else [0, bucket], device=device)
        bound = bucket if ranges else None
        candidates = torch.tensor([min(16, queries)], device=device)
        launch = hstu_hopper.hstu_attention_hopper if hstu_hopper.runs(q, k, v) else hstu_attention_cached_triton
        for splits in (1, 2):
            launch(q, k, v, q_off, kv_off, stamps, candidates, pos_w, ts_w, alpha, norm, causal, splits=splits,
                   max_user_keys=bound)  # fmt: skip
            done.append((bucket, splits > 1))
    return done


def hstu_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    **options: Any,
) -> torch.Tensor:
    """Full jagged attention: the same kernel with every token a query (q_offsets = kv_offsets).
    ``options``: those of hstu_attention_cached_triton."""
    return hstu_attention_cached_triton(
        q, k, v, offsets, offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal, **options
    )
