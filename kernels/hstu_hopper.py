"""Hopper (sm90) HSTU attention forward in Gluon: the math of kernels/hstu_attention.py (same tables, same
time buckets, same key-block kinds, same results), with the overlap Triton 3.6 cannot express.

Why a second kernel: in the Triton kernel each warpgroup runs QK^T, waits for it, computes the scores (bias,
SiLU), runs PV and waits again: a serial chain in which the tensor cores idle through the score math (the
pipeliner waits right after any wgmma whose result is not its own accumulator: bench/results/kernels-notes.md,
session 15). Here, per key block j:

    issue S(j+1) = Q K(j+1)^T (async) | scores of block j (ALU, MUFU) | issue O += P(j) V(j) (async) | wait S(j+1)

so the tensor cores work on S(j+1) and PV(j) while the warps compute block j's scores (FlashAttention-3's
intra-warpgroup overlap). Q, K and V tiles arrive by TMA into rings of shared-memory slots (K stages,
V stages), each guarded by an mbarrier; a slot is refilled once the wgmma that read it is known complete.

Contract: hstu_attention_cached_triton's (queries of a user are the last rows of its keys; full attention is
q_offsets = kv_offsets), for 16-bit q/k/v with one head dim in SUPPORTED_HEAD_DIMS and heads contiguous within
a token's row (what TMA reads). Anything else raises ValueError naming the setting (check_hopper); on a GPU
that is not sm90 the launcher raises too. No interpreter: Gluon runs only on the GPU (the CPU suite compiles it
for sm_90a; correctness runs on the device).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
import triton

from kernels import hstu_attention
from kernels.hstu_attention import (
    NOT_SPECIALISED,
    PAD,
    SLOTS,
    TS_FAST_LIMIT,
    bias_tables,
    check_supported,
    finish_parts,
    key_count,
    launch_buffers,
)

try:  # Gluon's Hopper pieces (triton >= 3.5); absent, every entry point raises naming it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA global -> shared: `async_load` from Triton 3.7 on (3.9 removed the older name the device's 3.6 has)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed in 3.9
    GLUON_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the installed triton
    GLUON_ERROR = f"triton {triton.__version__} has no Gluon Hopper API ({exc})"

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
# (BLOCK_M, BLOCK_N, warps, K stages, V stages, Q in registers[, max registers]) per head dim: the first is the
# default, the rest are timed by bench/kernels_explore.py's "hopper" section (each also checked on the device by
# bench/gpu_kernels_check.py --kernel hopper). Shared memory: Q tile + K stages x K tile + V stages x V tile; two
# programs share an SM only below ~113 KB each. Measured on the H200 (seq 8192 / 2048 / 512,
# bench/results/kernels-explore-hopper-h200-s16*.json, notes in kernels-notes.md, session 16):
# - d 128: 64/64 with Q in registers 3.29-3.37 / 1.09-1.15 / 0.51-0.58 ms (the Triton kernel 3.71-3.74 / 1.31-1.32 /
#   0.67); Q in shared memory 3.39 / 1.14 / 0.55; a third K/V stage (one program per SM) 5.53 / 1.91 / 0.92;
#   a third V stage alone within 1.5% (also when its tile is issued beside K's, with 3 instead of 5 CTA barriers
#   per block: the barriers are not what limits); 32-key blocks 4.04 / 1.27 / 0.57, capped at 168 registers
#   (three programs per SM) 4.81 / 1.59 / 0.70; 128-key blocks spill 0.5-4 KB per thread (not run).
# - d 256: 64/32 with Q in shared memory 3.04 / 0.95 / 0.43 (Q in registers spills: 4.22 / 1.30 / 0.55), 128/32 on
#   8 warps 3.20 / 1.06 / 0.51 (the Triton kernel 3.18 / 1.07 / 0.53).
# - d 64: 64/64 2.73-2.81 / 0.87-0.90 / 0.39-0.42, 64/32 capped at 168 registers 2.67 / 0.81 / 0.36 (the Triton
#   kernel 2.30 / 0.85 / 0.42): slower at long sequences, so kernels.ops keeps the Triton kernel there.
# K 2 / V 3 stages with Q in shared memory returned NaN rows on the device in every check (three runs) while its
# Q-in-registers twin was exact; the cause is not found, so the launcher refuses that combination (UNEXPLAINED).
# d 128's 128/64 on 8 warps with Q in registers (two warpgroups sharing each K/V tile, one program per SM; session 24,
# kernels-explore-hopper-oneuser-h200-s24.json): 3.78 / 1.35 / 0.71 ms against the default's 3.21 / 1.10 / 0.57
# at seq 8192 / 2048 / 512: slower at every length, so not listed.
HopperConfig = tuple[int, ...]
HOPPER_CONFIGS: dict[int, tuple[HopperConfig, ...]] = {
    64: ((64, 64, 4, 2, 2, 1), (64, 32, 4, 2, 2, 1, 168)),
    128: ((64, 64, 4, 2, 2, 1), (64, 64, 4, 2, 2, 0)),
    256: ((64, 32, 4, 2, 2, 0), (128, 32, 8, 2, 2, 0)),
}
SEARCH = triton.language.constexpr(256)  # users scanned per step when a window looks for its first user


if not GLUON_ERROR:
    # fmt: off
    # The per-score helpers are kernels/hstu_attention.py's own, compiled as Gluon (the generated code is the same
    # as with twins written here: PTX compared offline). Not these: those that broadcast a scalar into a tensor
    # (Gluon needs a layout for that): _gather, _shfl and _bucket64 below. PTX flags are literals here, as there.
    _act = gluon.jit(hstu_attention._act.fn)
    _load = gluon.jit(hstu_attention._load.fn)
    _bucket32 = gluon.jit(hstu_attention._bucket32.fn)
    _lane_value = gluon.jit(hstu_attention._lane_value.fn)
    _offset_f64 = gluon.jit(hstu_attention._offset_f64.fn)
    _exponent_bits = gluon.jit(hstu_attention._exponent_bits.fn)
    _abs_gap = gluon.jit(hstu_attention._abs_gap.fn)

    @gluon.jit
    def _gather(base, idx):
        """hstu_attention._gather's PTX path with the scalar base passed as is."""
        return gl.inline_asm_elementwise(
            "{ .reg .u64 a; mul.wide.u32 a, $1, 4; add.u64 a, a, $2; ld.global.nc.f32 $0, [a]; }", "=r,r,l",
            [idx, base], dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _shfl(lane_value, idx):
        """hstu_attention._shfl with the lane's scalar passed as is: table[idx] for idx < 32, one shuffle."""
        return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r",
                                         [lane_value, idx], dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _bucket64(gap):
        """floor(log2(1 + gap)) for int64 gap in [0, INT64_MAX] (hstu_attention._bucket64's rule)."""
        e = ((gap.to(gl.float32) + 1.0).to(gl.int32, bitcast=True) >> 23) - 127
        one = gl.full(gap.shape, 1, gl.int64, gap.type.layout)
        limit = ((one << gl.maximum(e - 1, 0).to(gl.int64)) - 1) * 2 + 1
        return gl.where((e > 0) & (gap < limit), e - 1, e)

    @gluon.jit
    def _scores(s, n_start, offs_m, p_i, ts_i32, ts_f, ts_i64, fast, n_ctx, left_end, right_start, full_end, ts_base,
                ts_ref, time_base, pos_base, far_base, time_lane, far_lane, far_right_lane, alpha,
                CAUSAL: gl.constexpr, FAST_SILU: gl.constexpr, P: gl.constexpr, BLOCK_N: gl.constexpr,
                DTYPE: gl.constexpr, P_LAYOUT: gl.constexpr):
        """act(alpha * s + bias) of key block [n_start, n_start + BLOCK_N), masked, as the PV operand.
        The block's kind (a uniform branch) picks the bias code: unmasked far-left / near / far-right blocks
        on int32 time offsets, else the masked form (end of history or causal diagonal; int64 gaps when the
        program's timestamps span 2**29 s or more)."""
        col_layout: gl.constexpr = gl.SliceLayout(0, s.type.layout)
        cols = gl.arange(0, BLOCK_N, layout=col_layout)
        offs_n = n_start + cols
        z = s * alpha
        if fast & (n_start + BLOCK_N <= full_end):
            ts_j = gl.load(ts_base + offs_n)
            bucket = _exponent_bits(ts_f[:, None] - _offset_f64((ts_j - ts_ref).to(gl.int32))[None, :])
            if n_start < left_end:
                z = z + _shfl(far_lane, bucket)
            elif n_start < right_start:
                pos = _load((pos_base + (p_i - n_start))[:, None] - cols[None, :], 1)  # PTX_GATHER
                z = z + (_shfl(time_lane, bucket) + pos)
            else:
                z = z + _shfl(far_right_lane, bucket)
            a = _act(z, FAST_SILU)
        else:
            col_ok = offs_n < n_ctx
            ts_j = gl.where(col_ok, gl.load(ts_base + offs_n, mask=col_ok, other=0), ts_ref)
            if fast:
                bucket = _bucket32(ts_i32[:, None] - (ts_j - ts_ref).to(gl.int32)[None, :], 4)  # PTX_CVT
            else:
                bucket = _bucket64(_abs_gap(ts_i64[:, None], ts_j[None, :])).to(gl.int32)
            rp = gl.minimum(gl.maximum(p_i[:, None] - offs_n[None, :], 1 - P), P - 1) + (P - 1)
            z = z + (_gather(time_base, bucket) + _gather(pos_base - (P - 1), rp))
            a = _act(z, FAST_SILU)
            ok = col_ok[None, :]
            if CAUSAL:  # history rows see j <= i; candidate rows every history key
                ok = ok & ((offs_n[None, :] <= offs_m[:, None]) | (offs_m[:, None] >= n_ctx))
            a = gl.where(ok, a, 0.0)
        return gl.convert_layout(a.to(DTYPE), P_LAYOUT)

    @gluon.jit
    def _load_kv(desc, smem, bars, g, row, col, pred, STAGES: gl.constexpr):
        """TMA of one key-block tile (global block number g) into its ring slot, if pred."""
        slot = g % STAGES
        mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [row, col], bars.index(slot), smem.index(slot), pred=pred)

    @gluon.jit
    def _clear_rows(v_tile, n_start, n_ctx, BLOCK_N: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
        """Zero the rows of a V tile at or past n_ctx: they are never attended (P is 0 there) but may hold
        anything (another user's rows, or a buffer's unwritten padding: 0 * NaN would leak)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        v = v_tile.load(layout)
        rows = n_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        v_tile.store(gl.where((rows < n_ctx)[:, None], v, gl.zeros_like(v)))
        fence_async_shared()
        _cta_barrier()

    @gluon.jit
    def _segment(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bars, v_bars, Q, K, V, Out, ts,
                 time_tab, pos_tab, far_tab, q_row0, kv_start, n_ctx, m0, m_end, h, split, n_split, count, seg,
                 stride_qt, stride_kt, stride_vt, stride_ot, stride_oh, alpha, inv_norm,
                 CAUSAL: gl.constexpr, FAST_SILU: gl.constexpr, ALLOW_TS_FAST: gl.constexpr, P: gl.constexpr,
                 D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KS: gl.constexpr, VS: gl.constexpr,
                 Q_REGS: gl.constexpr, PARTIAL: gl.constexpr, TS_SCAN: gl.constexpr, num_warps: gl.constexpr):
        """Output rows [m0, m_end) of the user whose keys start at token kv_start, head h (see
        hstu_attention._attend_segment). count: key blocks this program loaded before (ring slot and
        barrier phase); seg: segments before (Q barrier phase). -> count after."""
        DTYPE: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        scan: gl.constexpr = gl.BlockedLayout([TS_SCAN // (32 * num_warps)], [32], [num_warps], [0])

        # Q tile by TMA while the key ranges are worked out.
        col = h * D
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [(q_row0 + m0).to(gl.int32), col], q_bar, q_smem)

        offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)
        row_ok = offs_m < m_end
        p_i = gl.minimum(offs_m, n_ctx)
        ts_base = ts + kv_start
        ts_ref = gl.load(ts_base)
        ts_i64 = gl.where(row_ok, gl.load(ts_base + offs_m, mask=row_ok, other=0), gl.load(ts_base + m0))
        h64 = h.to(gl.int64)
        time_base = time_tab + h64 * SLOTS
        pos_base = pos_tab + h64 * (2 * P - 1 + 2 * PAD) + PAD + P - 1
        far_base = far_tab + h64 * (2 * SLOTS)

        p_lo = gl.minimum(m0, n_ctx)
        p_hi = gl.minimum(m_end - 1, n_ctx)
        if CAUSAL:
            hi = gl.minimum(m_end, n_ctx)
            full_end = (gl.minimum(m0 + 1, n_ctx) // BLOCK_N) * BLOCK_N
        else:
            hi = n_ctx
            full_end = (n_ctx // BLOCK_N) * BLOCK_N
        per_split = gl.cdiv(gl.cdiv(hi, BLOCK_N), n_split) * BLOCK_N
        k_lo = gl.minimum(split * per_split, hi)
        k_hi = gl.minimum(k_lo + per_split, hi)
        left_end = gl.minimum((gl.maximum(p_lo - P + 2, 0) // BLOCK_N) * BLOCK_N, full_end)
        right_start = gl.minimum(gl.maximum(((p_hi + P - 1 + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, left_end),
                                 full_end)

        fast = k_hi < 0  # False, as a tensor
        if ALLOW_TS_FAST:  # int32 offsets if every timestamp this program reads lies within 2**29 s
            lo_j = gl.full([TS_SCAN], 0, gl.int64, scan) + ts_ref
            hi_j = lo_j
            for n0 in range(k_lo, k_hi, TS_SCAN):  # a chain of dependent loads: its length is one user's latency
                offs = n0 + gl.arange(0, TS_SCAN, layout=scan)
                t = gl.load(ts_base + offs, mask=offs < k_hi, other=0)
                lo_j = gl.minimum(lo_j, gl.where(offs < k_hi, t, ts_ref))
                hi_j = gl.maximum(hi_j, gl.where(offs < k_hi, t, ts_ref))
            t_min = gl.minimum(gl.min(ts_i64, axis=0), gl.min(lo_j, axis=0))
            t_max = gl.maximum(gl.max(ts_i64, axis=0), gl.max(hi_j, axis=0))
            fast = _abs_gap(t_max, t_min) < TS_FAST_LIMIT
        ts_i32 = (ts_i64 - ts_ref).to(gl.int32)  # used only where fast
        ts_f = _offset_f64(ts_i32)  # likewise
        time_lane = _lane_value(time_base)
        far_lane = _lane_value(far_base)
        far_right_lane = _lane_value(far_base + SLOTS)

        # Key blocks [k_lo, k_hi): prologue loads, S(0), then the overlapped loop and its last block.
        n_blocks = gl.cdiv(k_hi - k_lo, BLOCK_N)
        row0 = (kv_start + k_lo).to(gl.int32)
        for i in gl.static_range(KS):
            _load_kv(k_desc, k_smem, k_bars, count + i, row0 + i * BLOCK_N, col, i < n_blocks, KS)
        for i in gl.static_range(VS):
            _load_kv(v_desc, v_smem, v_bars, count + i, row0 + i * BLOCK_N, col, i < n_blocks, VS)
        mbarrier.wait(q_bar, seg & 1)
        if Q_REGS:  # noqa: SIM108 (Q as the register operand: the S wgmmas then read only K from shared memory)
            q = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        else:
            q = q_smem

        s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        p_prev = gl.zeros([BLOCK_M, BLOCK_N], DTYPE, p_layout)
        for _ in range(0, gl.minimum(n_blocks, 1)):  # S(0): a loop of 0 or 1 trips, not an if (see below)
            mbarrier.wait(k_bars.index(count % KS), (count // KS) & 1)
            s0 = warpgroup_mma(q, k_smem.index(count % KS).permute((1, 0)), s, use_acc=False,
                               is_async=True)
            s = warpgroup_mma_wait(0, deps=(s0,))
        # Every branch around a wgmma makes ptxas serialise all of the kernel's wgmmas (warning C7515):
        # the last block is a loop of 0 or 1 trips after the main loop instead of an `if` inside it.
        for j in range(0, n_blocks - 1):
            g = count + j
            # K of block j + KS into block j's slot: S(j) is complete.
            _load_kv(k_desc, k_smem, k_bars, g + KS, row0 + (j + KS) * BLOCK_N, col, j + KS < n_blocks, KS)
            g1 = g + 1
            mbarrier.wait(k_bars.index(g1 % KS), (g1 // KS) & 1)
            s_next = warpgroup_mma(q, k_smem.index(g1 % KS).permute((1, 0)), s, use_acc=False,
                                   is_async=True)
            n_start = k_lo + j * BLOCK_N
            p = _scores(s, n_start, offs_m, p_i, ts_i32, ts_f, ts_i64, fast, n_ctx, left_end, right_start, full_end,
                        ts_base, ts_ref, time_base, pos_base, far_base, time_lane, far_lane, far_right_lane,
                        alpha, CAUSAL, FAST_SILU, P, BLOCK_N, DTYPE, p_layout)
            mbarrier.wait(v_bars.index(g % VS), (g // VS) & 1)
            if n_start + BLOCK_N > n_ctx:
                _clear_rows(v_smem.index(g % VS), n_start, n_ctx, BLOCK_N, D, num_warps)
            acc_t = warpgroup_mma(p, v_smem.index(g % VS), acc, is_async=True)
            # S(j+1) and PV(j-1) complete; PV(j) may still run (its operand p stays live to the next wait).
            s, acc, p_prev, p = warpgroup_mma_wait(1, deps=(s_next, acc_t, p_prev, p))
            p_prev = p
            # V of block j - 1 + VS into block j - 1's slot: PV(j-1) is complete.
            _load_kv(v_desc, v_smem, v_bars, g - 1 + VS, row0 + (j - 1 + VS) * BLOCK_N, col,
                     (j >= 1) & (j - 1 + VS < n_blocks), VS)
        for j in range(gl.maximum(n_blocks - 1, 0), n_blocks):
            g = count + j
            n_start = k_lo + j * BLOCK_N
            p = _scores(s, n_start, offs_m, p_i, ts_i32, ts_f, ts_i64, fast, n_ctx, left_end, right_start, full_end,
                        ts_base, ts_ref, time_base, pos_base, far_base, time_lane, far_lane, far_right_lane,
                        alpha, CAUSAL, FAST_SILU, P, BLOCK_N, DTYPE, p_layout)
            mbarrier.wait(v_bars.index(g % VS), (g // VS) & 1)
            if n_start + BLOCK_N > n_ctx:
                _clear_rows(v_smem.index(g % VS), n_start, n_ctx, BLOCK_N, D, num_warps)
            acc_t = warpgroup_mma(p, v_smem.index(g % VS), acc, is_async=True)
            acc, p_prev, p = warpgroup_mma_wait(0, deps=(acc_t, p_prev, p))

        # Candidate rows also see themselves (rp = 0, dt = 0), added by part 0 of a split.
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        rows_o = m0 + gl.arange(0, BLOCK_M, layout=row_o)
        cols_o = gl.arange(0, D, layout=col_o)
        if (m_end > n_ctx) & (split == 0):
            blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
            rows_b = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blk))
            cols_b = gl.arange(0, D, layout=gl.SliceLayout(0, blk))
            cand = (rows_b < m_end) & (rows_b >= n_ctx)
            msk = cand[:, None] & (cols_b[None, :] < D)
            qd = gl.load(Q + (q_row0 + rows_b)[:, None] * stride_qt + col + cols_b[None, :], mask=msk, other=0.0)
            kd = gl.load(K + (kv_start + rows_b)[:, None] * stride_kt + col + cols_b[None, :], mask=msk, other=0.0)
            vd = gl.load(V + (kv_start + rows_b)[:, None] * stride_vt + col + cols_b[None, :], mask=msk, other=0.0)
            diag_bias = gl.load(time_base) + gl.load(pos_base)  # bucket 0, rp 0
            z_d = alpha * gl.sum(qd.to(gl.float32) * kd.to(gl.float32), axis=1) + diag_bias
            extra = gl.where(cand, _act(z_d, FAST_SILU), 0.0)[:, None] * vd.to(gl.float32)
            acc = acc + gl.convert_layout(extra, o_layout)

        out = acc * inv_norm
        o_ptrs = Out + (q_row0 + rows_o)[:, None] * stride_ot + h * stride_oh + cols_o[None, :]
        gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows_o < m_end)[:, None] & (cols_o[None, :] < D))
        return count + n_blocks

    @gluon.jit(do_not_specialize=NOT_SPECIALISED)
    def _hstu_hopper_kernel(q_desc, k_desc, v_desc, Q, K, V, Out, q_offsets, kv_offsets, ts, ncand, time_tab,
                            pos_tab, far_tab, T, B, stride_qt, stride_kt, stride_vt, stride_ot, stride_oh,
                            stride_os, alpha, inv_norm,
                            CAUSAL: gl.constexpr, FAST_SILU: gl.constexpr, ALLOW_TS_FAST: gl.constexpr,
                            P: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            KS: gl.constexpr, VS: gl.constexpr, Q_REGS: gl.constexpr, PARTIAL: gl.constexpr,
                            KV_STRIDE: gl.constexpr, TS_SCAN: gl.constexpr, num_warps: gl.constexpr):
        """One program per window of BLOCK_M query tokens (users flattened, last window first) and head;
        grid axis 2 splits the key range (PARTIAL: fp32 partial sums). As hstu_attention._hstu_fwd_kernel."""
        h = gl.program_id(1)
        split = gl.program_id(2)
        Out += split.to(gl.int64) * stride_os
        alpha = alpha.to(gl.float32)
        inv_norm = inv_norm.to(gl.float32)
        win_lo = ((gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M).to(gl.int64)
        win_hi = gl.minimum(win_lo + BLOCK_M, T)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [KS] + k_desc.block_type.shape, k_desc.layout)  # noqa: RUF005
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [VS] + v_desc.block_type.shape, v_desc.layout)  # noqa: RUF005
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [KS, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [VS, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(KS):
            mbarrier.init(k_bars.index(i), count=1)
        for i in gl.static_range(VS):
            mbarrier.init(v_bars.index(i), count=1)

        scan: gl.constexpr = gl.BlockedLayout([SEARCH // (32 * num_warps)], [32], [num_warps], [0])
        b = 0
        for c in range(0, B, SEARCH):
            idx = c + gl.arange(0, SEARCH, layout=scan)
            ends = gl.load(q_offsets + 1 + idx, mask=idx < B, other=T + 1)
            b += gl.sum((ends <= win_lo).to(gl.int32), axis=0)
        count = 0
        seg = 0
        seg_lo = win_lo
        while seg_lo < win_hi:
            q_start = gl.load(q_offsets + b)
            q_end = gl.load(q_offsets + b + 1)
            seg_hi = gl.minimum(q_end, win_hi)
            if seg_hi > seg_lo:  # users without queries give empty segments
                kv_start = gl.load(kv_offsets + b * KV_STRIDE)  # KV_STRIDE 1: offsets [B+1]; 2: ranges [B, 2]
                length = (gl.load(kv_offsets + b * KV_STRIDE + 1) - kv_start).to(gl.int32)
                shift = length - (q_end - q_start).to(gl.int32)
                if shift >= 0:
                    n_ctx = length - gl.load(ncand + b).to(gl.int32)
                    count = _segment(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bars, v_bars, Q, K,
                                     V, Out, ts, time_tab, pos_tab, far_tab, q_start - shift, kv_start, n_ctx,
                                     (seg_lo - q_start).to(gl.int32) + shift, (seg_hi - q_start).to(gl.int32) + shift,
                                     h, split, gl.num_programs(2), count, seg, stride_qt, stride_kt, stride_vt,
                                     stride_ot, stride_oh, alpha, inv_norm, CAUSAL, FAST_SILU, ALLOW_TS_FAST, P, D,
                                     BLOCK_M, BLOCK_N, KS, VS, Q_REGS, PARTIAL, TS_SCAN, num_warps)
                    seg += 1
                else:  # more queries than keys: not a suffix. NaN rows, never a plausible result
                    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
                    rows = seg_lo + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, blk))
                    cols = gl.arange(0, D, layout=gl.SliceLayout(0, blk))
                    nan = gl.full([BLOCK_M, D], float("nan"), gl.float32, blk)
                    gl.store(Out + rows[:, None] * stride_ot + h * stride_oh + cols[None, :],
                             nan.to(Out.dtype.element_ty), mask=(rows < seg_hi)[:, None] & (cols[None, :] < D))
                seg_lo = seg_hi
            b += 1
    # fmt: on


# Which kernel the attention runs on an sm90 GPU: "auto" (this one where it measured faster: DEFAULT_HEAD_DIMS),
# "triton" (always the Triton kernel) or "hopper" (this one, and an error naming why where it cannot run). Eager and
# graph-captured calls launch it directly; compiled code (torch.compile, AOTInductor packages) calls it as the opaque
# grc::hstu_attention_hopper op (kernels/ops.py), since Inductor compiles Triton kernels, not Gluon ones. The
# environment picks for a process; a package build picks by its spec (engine.aoti.attention, kernel_choice below).
KERNEL_ENV = "GRC_ATTENTION_KERNEL"
KERNEL_CHOICES = ("auto", "triton", "hopper")
# Measured on the H200 (HOPPER_CONFIGS' notes: seq 512-8192, 64k tokens, bf16): d 128 1.11-1.16x and d 256
# 1.05-1.24x the Triton kernel's speed; d 64 0.86x at seq 8192 (there the Triton kernel runs three programs per SM
# under a register cap; this one spills at that cap), so d 64 stays on the Triton kernel.
DEFAULT_HEAD_DIMS = (128, 256)


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pointers: bool = True) -> str:
    """'' when this kernel runs these tensors, else what stops it. pointers=False leaves out the data pointers'
    alignment: a traced (fake) tensor has none, and the launch checks it again (check_hopper)."""
    if GLUON_ERROR:
        return GLUON_ERROR
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"16-bit q/k/v of one dtype only, got {q.dtype}, {k.dtype}, {v.dtype}"
    dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    if len(dims) != 1 or q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"one head dim of {SUPPORTED_HEAD_DIMS} for q, k and v, got {sorted(dims)}"
    for name, x in (("q", q), ("k", k), ("v", v)):
        row_bytes = x.stride(0) * x.element_size()
        misaligned = x.data_ptr() % 16 if pointers else 0
        if x.stride(2) != 1 or x.stride(1) != x.shape[2] or row_bytes % 16 or misaligned:
            return (f"{name} must hold its heads contiguously in 16-byte-aligned rows (TMA), got strides "
                    f"{tuple(x.stride())} at {misaligned} bytes past 16-byte alignment")  # fmt: skip
    if not q.is_cuda or _capability(q.device)[0] != 9:
        return f"needs an sm90 GPU (wgmma, TMA), got {q.device}"
    return ""


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


_forced: list[str] = []  # kernel_choice's stack: the innermost block's choice wins over KERNEL_ENV


@contextlib.contextmanager
def kernel_choice(choice: str) -> Iterator[None]:
    """Inside the block the choice is ``choice`` whatever KERNEL_ENV says: a package compiled here holds the kernel
    its spec names (engine.aoti.attention), not the one the building shell's environment happens to pick."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"attention kernel {choice!r}: expected one of {KERNEL_CHOICES}")
    _forced.append(choice)
    try:
        yield
    finally:
        _forced.pop()


def chosen() -> str:
    if _forced:
        return _forced[-1]
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: expected one of {KERNEL_CHOICES}")
    return choice


def runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, traced: bool = False) -> bool:
    """Whether a call on these tensors runs this kernel (else the Triton kernel), per kernel_choice / KERNEL_ENV.
    traced: q, k, v are a compile's fake tensors (no data pointers to check: the launch checks them)."""
    choice = chosen()
    if choice == "triton":
        return False
    reason = why_not(q, k, v, pointers=not traced)
    if choice == "hopper" and reason:
        raise ValueError(f"attention kernel hopper: the Gluon sm90 attention kernel cannot run this call: {reason}")
    return not reason and (choice == "hopper" or q.shape[-1] in DEFAULT_HEAD_DIMS)


def describe(head_qk: int, head_v: int, dtype: torch.dtype, device: torch.device) -> str:
    """Which attention kernel the eager ops launch for a model of these head dims, in words (servers log it at load;
    with GRC_ATTENTION_KERNEL=hopper where this kernel cannot run, the ValueError naming why)."""
    heads_qk, heads_v = (torch.empty(1, 1, d, dtype=dtype, device=device) for d in (head_qk, head_v))
    if runs(heads_qk, heads_qk, heads_v):
        return f"the Gluon sm90 kernel (kernels/hstu_hopper.py, config {HOPPER_CONFIGS[head_qk][0]})"
    return f"the Triton kernel (kernels/hstu_attention.py; {KERNEL_ENV}={chosen()})"


def check_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_w: torch.Tensor) -> None:
    """Raise ValueError naming what this kernel does not run (the Triton kernel runs every other case)."""
    check_supported(q, k, v, pos_w)
    reason = why_not(q, k, v)
    if reason:
        raise ValueError(f"hstu hopper kernel: {reason}")


@functools.cache
def _smem_layout(rows: int, cols: int, dtype: torch.dtype) -> Any:
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def descriptor(x: torch.Tensor, rows: int) -> Any:
    """A TMA descriptor over x [T, H, D] seen as [T, H*D] (row stride kept), tiles [rows, D]."""
    total, heads, dim = x.shape
    return TensorDescriptor(x, [max(total, 1), heads * dim], [x.stride(0), 1], [rows, dim],
                            _smem_layout(rows, dim, x.dtype))  # fmt: skip


def hstu_attention_hopper(
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
    fast_silu: bool = True,
    allow_ts_fast: bool = True,
    out: torch.Tensor | None = None,
    config: tuple[int, ...] | None = None,
    splits: int | None = None,
    max_user_keys: int | None = None,
    ts_scan: int = 256,
    finish: bool = True,
) -> torch.Tensor:
    """hstu_attention_cached_triton's contract on the Gluon kernel (see the module docstring), key ranges included
    (kv_offsets [B, 2] with max_user_keys). finish False: where the keys were cut into parts, their fp32 partial sums
    [parts, Tq, H, Dv] as the kernel left them, for a consumer that adds them itself (kernels.norm_gate.
    norm_gate_parts_triton); the output otherwise. config:
    (BLOCK_M, BLOCK_N, warps, K stages, V stages, Q in registers[, max registers per thread]), default
    HOPPER_CONFIGS' first for the head dim. ts_scan: timestamps a program reads per step of its check for the int32
    time path (a power of two >= 32 x warps; bench/kernels_explore.py times it where one user's chain is the call)."""
    if config is not None and config[3] != config[4] and not config[5]:
        raise ValueError(f"hstu hopper kernel: config {config}: unequal K / V stages with Q in shared memory gave "
                         "NaN rows on the H200 (cause not found: see HOPPER_CONFIGS); use Q in registers")  # fmt: skip
    check_hopper(q, k, v, pos_w)
    num_keys = key_count(k, q_offsets, kv_offsets, max_user_keys)
    out, n_split, dest = launch_buffers(q, v, out, splits, "hstu hopper kernel", num_keys)
    total, heads, dim = q.shape
    if total == 0:
        return out
    block_m, block_n, warps, k_stages, v_stages, q_regs, *cap = config or HOPPER_CONFIGS[dim][0]
    launch = {"maxnreg": cap[0]} if cap and cap[0] else {}
    num_pos = (pos_w.shape[1] + 1) // 2
    time_tab, pos_tab, far_tab = bias_tables(pos_w.contiguous(), ts_w.contiguous(), 0.5)
    grid = (triton.cdiv(total, block_m), heads, n_split)
    _hstu_hopper_kernel[grid](
        descriptor(q, block_m), descriptor(k, block_n), descriptor(v, block_n), q, k, v, dest,
        q_offsets.contiguous(), kv_offsets.contiguous(), timestamps.contiguous(), num_candidates.contiguous(),
        time_tab, pos_tab, far_tab, total, q_offsets.numel() - 1, q.stride(0), k.stride(0), v.stride(0),
        dest.stride(-3), dest.stride(-2), dest.stride(0) if n_split > 1 else 0, 0.5 * float(alpha),
        1.0 / float(norm), CAUSAL=bool(causal), FAST_SILU=bool(fast_silu), ALLOW_TS_FAST=bool(allow_ts_fast),
        TS_SCAN=ts_scan,
        P=num_pos, D=dim, BLOCK_M=block_m, BLOCK_N=block_n, KS=k_stages, VS=v_stages,
        Q_REGS=bool(q_regs), PARTIAL=n_split > 1, KV_STRIDE=kv_offsets.dim(), num_warps=warps, **launch,
    )  # fmt: skip
    if n_split > 1 and finish:
        finish_parts(dest, out)
    return out if finish else dest
