"""Runs the Triton kernels under TRITON_INTERPRET=1 and prints one JSON line of results.

Started as a subprocess by test_interpreter.py: TRITON_INTERPRET must be set before the kernels
are decorated, and the rest of the suite (one pytest process, xdist workers) must not see it.
Usage: python interp_worker.py JOB DTYPE SEED   (JOB: attention | cached | norm_gate | bucket)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.hstu_attention import (  # noqa: E402
    _abs_gap,
    _bucket32,
    _bucket64,
    _exponent_bits,
    _offset_f64,
    finish_parts,
    hstu_attention_cached_triton,
    hstu_attention_triton,
)
from kernels.norm_gate import norm_gate_parts_triton, norm_gate_triton  # noqa: E402
from kernels.silu import silu_triton  # noqa: E402
from tests.kernels.arena import arena  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere (an unwritten poisoned element) -> inf."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def attention_case(
    gen: torch.Generator,
    dtype: torch.dtype,
    lengths: list[int],
    ncands: list[int],
    causal: bool,
    dqk: int = 32,
    dv: int = 32,
    heads: int = 2,
    ts_high: int = 20_000,
    allow_ts_fast: bool = True,
    increasing: bool = False,
    num_pos: int = 8,  # small P and NB so position clamping and saturation both occur
    num_buckets: int = 12,
    extremes: bool = False,
) -> float:
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    total = int(offsets[-1])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(total, heads, dqk).to(dtype), randn(total, heads, dqk).to(dtype), randn(total, heads, dv).to(dtype)
    if increasing:  # history order with gaps: far key blocks often share one bucket (scalar bias)
        ts = torch.randint(0, ts_high, (total,), generator=gen, dtype=torch.int64).cumsum(0)
    else:
        ts = torch.randint(0, ts_high, (total,), generator=gen, dtype=torch.int64)
        ts[::5] = ts[0]  # some exact ties: dt = 0
    if extremes:  # the int64 ends: gaps past INT64_MAX must saturate (last bucket), not wrap
        ends = torch.tensor([INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, -1, 0], dtype=torch.int64)
        pick = torch.randint(0, len(ends), (total,), generator=gen)
        ts = torch.where(torch.rand(total, generator=gen) < 0.5, ends[pick], ts)
    nc = torch.tensor(ncands, dtype=torch.int64)
    pos_w, ts_w = randn(heads, 2 * num_pos - 1), randn(heads, num_buckets)
    alpha, norm = 0.3, 7.0
    poisoned = torch.full((total, heads, dv), float("nan"), dtype=dtype)
    out = hstu_attention_triton(
        q,
        k,
        v,
        offsets,
        ts,
        nc,
        pos_w,
        ts_w,
        alpha,
        norm,
        causal,
        allow_ts_fast=allow_ts_fast,
        out=poisoned,
    )
    ref = reference.hstu_attention(
        q.double(), k.double(), v.double(), offsets, ts, nc, pos_w.double(), ts_w.double(), alpha, norm, causal
    )
    return rel_err(out, ref)


def attention_job(dtype: torch.dtype, gen: torch.Generator) -> dict[str, float]:
    # Lengths 1 and the batch max (64: several 16-row tiles and key blocks), an empty user;
    # 0, 1, many and all-candidate users.
    lengths, ncands = [1, 45, 17, 0, 64, 30], [0, 5, 17, 0, 40, 1]
    return {
        "causal": attention_case(gen, dtype, lengths, ncands, True),
        "full": attention_case(gen, dtype, lengths, ncands, False),
        # Long histories: far-left and (non-causal) far-right key blocks with a constant position.
        "long_causal": attention_case(gen, dtype, [64, 50], [2, 0], True),
        "long_full": attention_case(gen, dtype, [64, 50], [2, 0], False),
        "increasing_timestamps_causal": attention_case(
            gen, dtype, [64, 50], [2, 0], True, ts_high=300, increasing=True
        ),
        "increasing_timestamps_full": attention_case(gen, dtype, [64, 50], [2, 0], False, ts_high=300, increasing=True),
        # Every spec's table sizes: MTGR's 32 buckets, 64 (the most a saturated gap reaches), more
        # than 64 (never read past 64), one bucket, one position bucket, and a P past the block.
        "time_buckets_32_huge_gaps": attention_case(
            gen, dtype, [40, 37], [3, 0], True, ts_high=1 << 40, num_buckets=32
        ),
        "time_buckets_64_huge_gaps": attention_case(
            gen, dtype, [40, 37], [3, 0], False, ts_high=1 << 62, num_buckets=64
        ),
        "time_buckets_100": attention_case(gen, dtype, [40, 37], [3, 0], True, ts_high=1 << 62, num_buckets=100),
        "one_bucket_each": attention_case(gen, dtype, [40, 37], [3, 0], True, num_pos=1, num_buckets=1),
        "position_buckets_300": attention_case(gen, dtype, [64, 50], [2, 0], False, num_pos=300, num_buckets=32),
        # Timestamps at the int64 ends (history at INT64_MIN, request at INT64_MAX).
        "int64_extremes_causal": attention_case(gen, dtype, [40, 37], [3, 0], True, num_buckets=64, extremes=True),
        "int64_extremes_full": attention_case(gen, dtype, [40, 37], [3, 0], False, num_buckets=33, extremes=True),
        "single_token_candidate": attention_case(gen, dtype, [1, 2], [1, 1], True),
        "odd_head_dims": attention_case(gen, dtype, [23, 40], [3, 0], True, dqk=20, dv=24),
        # Timestamps far apart (span > 2**29 and > 2**32): the int64 time-delta path.
        "huge_timestamps": attention_case(gen, dtype, [40, 37], [3, 0], True, ts_high=1 << 40),
        "int64_path_forced": attention_case(gen, dtype, lengths, ncands, False, allow_ts_fast=False),
    }


def cached_case(
    gen: torch.Generator,
    dtype: torch.dtype,
    lengths: list[int],
    ncands: list[int],
    n_queries: list[int],
    causal: bool,
    num_buckets: int = 12,
    ts_high: int = 20_000,
    heads: int = 2,
    d: int = 32,
    via_op: bool = False,
    splits: int = 1,
    ranged: bool = False,
) -> float:
    """Queries = the last n_queries[b] tokens of each user's sequence, against all its keys.
    via_op: through kernels.hstu_attention_cached (the grc::hstu_attention_cached triton_op,
    which launches the kernel on CPU tensors under the interpreter) instead of the launcher.
    splits: key-range parts summed as fp32 partials (the GPU picks them for small grids).
    ranged: the keys also as ranges of an arena (users in shuffled order, NaN keys and values and
    far-off timestamps between them); inf unless that launch equals the contiguous one bit for bit."""
    num_pos = 8
    kv_offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    q_offsets = torch.tensor([0, *torch.tensor(n_queries).cumsum(0).tolist()], dtype=torch.int64)
    total, total_q = int(kv_offsets[-1]), int(q_offsets[-1])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    q, k, v = randn(total_q, heads, d).to(dtype), randn(total, heads, d).to(dtype), randn(total, heads, d).to(dtype)
    ts = torch.randint(0, ts_high, (total,), generator=gen, dtype=torch.int64).cumsum(0)  # history order
    nc = torch.tensor(ncands, dtype=torch.int64)
    pos_w, ts_w = randn(heads, 2 * num_pos - 1), randn(heads, num_buckets)
    args = (q_offsets, kv_offsets, ts, nc)
    poisoned = torch.full((total_q, heads, d), float("nan"), dtype=dtype)
    if via_op:
        out = kernels.hstu_attention_cached(q, k, v, *args, pos_w, ts_w, 0.3, 7.0, causal, impl="triton")
    else:
        out = hstu_attention_cached_triton(q, k, v, *args, pos_w, ts_w, 0.3, 7.0, causal, out=poisoned, splits=splits)
    ref = reference.hstu_attention_cached(
        q.double(), k.double(), v.double(), *args, pos_w.double(), ts_w.double(), 0.3, 7.0, causal
    )
    if ranged:
        k_a, v_a, ts_a, ranges = arena(gen, k, v, ts, kv_offsets)
        poisoned = torch.full((total_q, heads, d), float("nan"), dtype=dtype)
        got = hstu_attention_cached_triton(q, k_a, v_a, q_offsets, ranges, ts_a, nc, pos_w, ts_w, 0.3, 7.0, causal,
                                           out=poisoned, splits=splits, max_user_keys=max(lengths))  # fmt: skip
        ref_r = reference.hstu_attention_cached(q.double(), k_a.double(), v_a.double(), q_offsets, ranges, ts_a, nc,
                                                pos_w.double(), ts_w.double(), 0.3, 7.0, causal)  # fmt: skip
        if not (torch.equal(got, out) and torch.equal(ref_r, ref)):
            return float("inf")
    return rel_err(out, ref)


def cached_job(dtype: torch.dtype, gen: torch.Generator) -> dict[str, float]:
    lengths, ncands = [45, 17, 64, 30, 5], [5, 17, 40, 1, 0]
    results: dict[str, float] = {}
    for causal in (True, False):
        tag = "causal" if causal else "full"
        results |= {
            f"suffix_is_whole_sequence_{tag}": cached_case(gen, dtype, lengths, ncands, lengths, causal),
            f"candidates_only_{tag}": cached_case(gen, dtype, lengths, ncands, ncands, causal),
            # history rows and candidates (user 0: 3 history + 5 candidates), 1-row suffixes
            f"mixed_suffix_{tag}": cached_case(gen, dtype, lengths, ncands, [8, 1, 41, 1, 5], causal),
            # some users with an empty suffix (no queries), one whose whole sequence is queried
            f"empty_suffixes_{tag}": cached_case(gen, dtype, lengths, ncands, [0, 17, 0, 3, 0], causal),
            # a cached history of 150 keys (ten 16-key blocks) under 5 or 20 new queries
            f"long_cached_history_{tag}": cached_case(gen, dtype, [155, 170], [5, 3], [5, 20], causal),
            f"time_buckets_64_huge_gaps_{tag}": cached_case(
                gen, dtype, [70, 9], [4, 0], [10, 9], causal, num_buckets=64, ts_high=1 << 56
            ),
            f"through_the_op_{tag}": cached_case(gen, dtype, lengths, ncands, [8, 1, 41, 1, 5], causal, via_op=True),
            # the key range cut into parts: uneven (ten blocks / 3), more parts than some rows'
            # blocks (empty parts), and the int64 time path per part
            f"split_keys_3_{tag}": cached_case(gen, dtype, [155, 170], [5, 3], [5, 20], causal, splits=3),
            f"split_keys_4_mixed_{tag}": cached_case(gen, dtype, lengths, ncands, [8, 1, 41, 1, 5], causal, splits=4),
            f"split_keys_2_huge_gaps_{tag}": cached_case(
                gen, dtype, [70, 9], [4, 0], [10, 9], causal, num_buckets=64, ts_high=1 << 56, splits=2
            ),
            # keys as ranges of an arena (the history cache's entries read in place), equal to the contiguous launch
            f"ranged_mixed_suffix_{tag}": cached_case(
                gen, dtype, lengths, ncands, [8, 1, 41, 1, 5], causal, ranged=True
            ),
            f"ranged_split_keys_3_{tag}": cached_case(
                gen, dtype, [155, 170], [5, 3], [5, 20], causal, splits=3, ranged=True
            ),
            f"ranged_huge_gaps_{tag}": cached_case(
                gen, dtype, [70, 9], [4, 0], [10, 9], causal, num_buckets=64, ts_high=1 << 56, ranged=True
            ),
        }
    return results


def not_a_suffix_job() -> dict[str, float]:
    """A user with more queries than keys gets NaN rows; the other users stay exact."""
    gen = torch.Generator().manual_seed(0)
    heads, d = 2, 16
    kv_offsets, q_offsets = torch.tensor([0, 10, 13]), torch.tensor([0, 4, 9])  # user 1: 5 queries, 3 keys
    q, k, v = (
        torch.randn(9, heads, d, generator=gen),
        torch.randn(13, heads, d, generator=gen),
        torch.randn(13, heads, d, generator=gen),
    )
    ts, nc = torch.arange(13, dtype=torch.int64) * 100, torch.tensor([2, 1])
    pos_w, ts_w = torch.randn(heads, 7, generator=gen), torch.randn(heads, 9, generator=gen)
    out = hstu_attention_cached_triton(q, k, v, q_offsets, kv_offsets, ts, nc, pos_w, ts_w, 0.3, 7.0, True,
                                       out=torch.zeros(9, heads, d))  # fmt: skip
    ref = reference.hstu_attention_cached(q[:4].double(), k.double(), v.double(), q_offsets[:2], kv_offsets[:2], ts,
                                          nc[:1], pos_w.double(), ts_w.double(), 0.3, 7.0, True)  # fmt: skip
    return {"valid_user_rel_err": rel_err(out[:4], ref), "bad_user_nan_fraction": float(out[4:].isnan().float().mean())}


def norm_gate_job(gen: torch.Generator) -> dict[str, float]:
    results: dict[str, float] = {}
    for name, dtype in DTYPES.items():
        for shape in ((37, 48), (5, 256), (1, 16), (2, 7, 40)):
            channels = shape[-1]
            a = (torch.randn(*shape, generator=gen) * 3 + 1).to(dtype)
            u = torch.randn(*shape, generator=gen).to(dtype)
            w, b = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
            out = norm_gate_triton(a, u, w, b, 1e-5, out=torch.full(shape, float("nan"), dtype=dtype))
            ref = reference.norm_gate(a.double(), u.double(), w.double(), b.double(), 1e-5)
            results[f"{name}_{'x'.join(map(str, shape))}"] = rel_err(out, ref)
            # silu_u: u before SiLU, a column slice of a wider projection output (row stride 3 C), as compiled
            # models pass it; both SiLU signs
            raw = (torch.randn(*shape[:-1], 3 * channels, generator=gen) * 3).to(dtype)[..., channels : 2 * channels]
            out = norm_gate_triton(a, raw, w, b, 1e-5, out=torch.full(shape, float("nan"), dtype=dtype), silu_u=True)
            ref = reference.norm_gate(a.double(), torch.nn.functional.silu(raw.double()), w.double(), b.double(), 1e-5)
            results[f"{name}_silu_u_{'x'.join(map(str, shape))}"] = rel_err(out, ref)
        results.update(norm_gate_parts_case(name, dtype, gen))
    return results


def norm_gate_parts_case(name: str, dtype: torch.dtype, gen: torch.Generator) -> dict[str, float]:
    """norm_gate_parts_triton: an attention's fp32 key parts [P, T, H, Dv] (P 2 and 3) into a poisoned output, vs
    float64 of the parts' sum; and bit for bit what finish_parts (the sum kernel) then norm_gate_triton give, the
    two kernels it replaces (grc.model.hstu.ATTENTION_GATE)."""
    results: dict[str, float] = {}
    same = True
    for parts_n in (2, 3):
        parts = torch.randn(parts_n, 9, 2, 24, generator=gen) * 2 + 0.5
        raw = (torch.randn(9, 3 * 48, generator=gen) * 3).to(dtype)[:, 48:96]
        w, b = torch.randn(48, generator=gen), torch.randn(48, generator=gen)
        out = norm_gate_parts_triton(parts, raw, w, b, 1e-5, dtype, out=torch.full((9, 48), float("nan"), dtype=dtype),
                                     silu_u=True)  # fmt: skip
        summed = parts.double().sum(0).reshape(9, 48)
        ref = reference.norm_gate(summed, torch.nn.functional.silu(raw.double()), w.double(), b.double(), 1e-5)
        results[f"{name}_parts{parts_n}_9x48"] = rel_err(out, ref)
        finished = torch.full((9, 2, 24), float("nan"), dtype=dtype)
        finish_parts(parts, finished)
        apart = norm_gate_triton(finished.reshape(9, 48), raw, w, b, 1e-5, silu_u=True)
        same = same and torch.equal(out, apart) and not out.isnan().any()
    results[f"parts_equal_finish_{name}"] = float(same)
    return results


def group_norm_job(gen: torch.Generator) -> dict[str, float]:
    """The group LayerNorm kernel vs float64, each row's affine from its group (3 groups, ids in any order), into
    NaN-poisoned outputs; and the module it stands for (GroupLayerNorm) at float32, which it must match closely."""
    from grc.model.hstu import GroupLayerNorm
    from kernels.fused_linear import group_norm_reference
    from kernels.norm_gate import group_norm_triton

    results: dict[str, float] = {}
    for name, dtype in DTYPES.items():
        for shape in ((37, 48), (5, 256), (1, 16), (2, 7, 40)):
            channels = shape[-1]
            x = (torch.randn(*shape, generator=gen) * 3 + 1).to(dtype)
            group = torch.randint(0, 3, shape[:-1], generator=gen)
            w, b = torch.randn(3, channels, generator=gen), torch.randn(3, channels, generator=gen)
            out = group_norm_triton(x, group, w, b, 1e-5, out=torch.full(shape, float("nan"), dtype=dtype))
            ref = group_norm_reference(x.double(), group, w.double(), b.double(), 1e-5)
            results[f"{name}_{'x'.join(map(str, shape))}"] = rel_err(out, ref)
    norm = GroupLayerNorm(64, 3, 1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
        x, group = torch.randn(19, 64, generator=gen) * 2, torch.randint(0, 3, (19,), generator=gen)
        results["float32_vs_module"] = rel_err(group_norm_triton(x, group, norm.weight, norm.bias, norm.eps),
                                               norm(x.double(), group).double())  # fmt: skip
    return results


def silu_job(gen: torch.Generator) -> dict[str, float]:
    """grc::silu's kernel on a whole tensor (odd sizes: the last block masked), float64 included, vs F.silu in
    float64; and through the op, exactly the kernel."""
    results: dict[str, float] = {}
    for name, dtype in {**DTYPES, "float64": torch.float64}.items():
        for shape in ((37, 48), (3, 1025), (2, 7, 40)):
            x = (torch.randn(*shape, generator=gen) * 4).to(dtype)
            out = silu_triton(x)
            results[f"{name}_{'x'.join(map(str, shape))}"] = rel_err(out, torch.nn.functional.silu(x.double()))
    x = torch.randn(5, 33, generator=gen)
    results["op_equals_kernel"] = float(torch.equal(torch.ops.grc.silu(x), silu_triton(x)))
    return results


@triton.jit
def _bucket_kernel(DT, TS_I, TS_J, A32, B32, OUT32, OUT64, OUTF, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    dt = tl.load(DT + offs, mask=ok, other=0)
    tl.store(OUT32 + offs, _bucket32(dt, 0), mask=ok)
    a = tl.load(A32 + offs, mask=ok, other=0)
    b = tl.load(B32 + offs, mask=ok, other=0)
    tl.store(OUTF + offs, _exponent_bits(_offset_f64(a) - _offset_f64(b)), mask=ok)
    gap = _abs_gap(tl.load(TS_I + offs, mask=ok, other=0), tl.load(TS_J + offs, mask=ok, other=0))
    tl.store(OUT64 + offs, _bucket64(gap), mask=ok)


def want_bucket(a: int, b: int, nb: int) -> int:
    """The rule in Python integers: the exact gap, saturated at INT64_MAX, floor(log2(1 + gap))."""
    return min((min(abs(a - b), INT64_MAX) + 1).bit_length() - 1, nb - 1)


def bucket_job() -> dict[str, float]:
    """Kernel bucket == the integer rule at every power-of-two edge, both signs: the int32 path for
    |dt| < 2**30, and the int64 path for gaps up to and past INT64_MAX (timestamps at the int64
    ends, where a plain subtraction wraps). The kernel's buckets are unclamped (its tables repeat the
    last bucket's weight, so min(bucket, NB-1) is a table lookup); the table rule min(., NB-1) and
    the reference are checked for NB = 24, 31, 32 and 64."""
    edges32 = sorted({max(0, (1 << e) + d) for e in range(31) for d in (-2, -1, 0, 1)} - {(1 << 30), (1 << 30) + 1})
    dt = torch.tensor(edges32 + [-x for x in edges32], dtype=torch.int32)
    pairs = [(base + x, base) for x in edges32 for base in (1 << 45, -(1 << 62))]
    pairs += [(x, 0) for e in range(64) for x in ((1 << e) - 2, (1 << e) - 1, 1 << e) if x <= INT64_MAX]
    pairs += [(INT64_MAX - x, -1 - x) for x in range(4)]  # gap INT64_MAX (and the wrap edge)
    pairs += [(INT64_MAX, INT64_MIN), (INT64_MIN, INT64_MAX), (INT64_MAX, -2), (-2, INT64_MAX), (0, INT64_MIN)]
    pairs += [(INT64_MIN, INT64_MIN), (INT64_MAX, INT64_MAX), (1 << 62, -(1 << 62)), ((1 << 62) - 1, -(1 << 62))]
    pairs += [(b, a) for a, b in pairs]
    n = max(dt.numel(), len(pairs))
    ts_i = torch.tensor([a for a, _ in pairs] + [0] * (n - len(pairs)), dtype=torch.int64)
    ts_j = torch.tensor([b for _, b in pairs] + [0] * (n - len(pairs)), dtype=torch.int64)
    dt = torch.cat([dt, torch.zeros(n - dt.numel(), dtype=torch.int32)])
    # The Gluon kernel's unmasked blocks: int32 offsets a, b as float64 by bits, the bucket as exponent bits (+ 1023),
    # for the same gaps with both offsets away from 0 and of either sign (the program's span below 2**29).
    shifts = (0, (1 << 28) - 5, -(1 << 28) + 3)
    a32 = torch.tensor([x + c for x in dt[: len(edges32) * 2].tolist() for c in shifts], dtype=torch.int32)
    b32 = torch.tensor([c for _ in range(len(edges32) * 2) for c in shifts], dtype=torch.int32)
    n = max(n, a32.numel())
    ts_i, ts_j, dt, a32, b32 = (torch.cat([x, x.new_zeros(n - x.numel())]) for x in (ts_i, ts_j, dt, a32, b32))
    results: dict[str, float] = {}
    out32, out64, outf = (torch.full((n,), -7, dtype=torch.int32) for _ in range(3))
    _bucket_kernel[(1,)](dt, ts_i, ts_j, a32, b32, out32, out64, outf, n, BLOCK=triton.next_power_of_2(n))
    wantf = torch.tensor([want_bucket(x, y, 64) for x, y in zip(a32.tolist(), b32.tolist(), strict=True)])
    results["float64_bits_path_mismatches"] = float((outf - 1023 != wantf).sum())
    for nb in (24, 31, 32, 64):
        want32 = torch.tensor([want_bucket(x, 0, nb) for x in dt.tolist()], dtype=torch.int32)
        want64 = torch.tensor(
            [want_bucket(a, b, nb) for a, b in zip(ts_i.tolist(), ts_j.tolist(), strict=True)], dtype=torch.int32
        )
        ref = reference.time_bucket(reference.abs_time_gap(ts_i, ts_j), nb).to(torch.int32)
        results[f"nb{nb}_int32_path_mismatches"] = float((out32.clamp(max=nb - 1) != want32).sum())
        results[f"nb{nb}_int64_path_mismatches"] = float((out64.clamp(max=nb - 1) != want64).sum())
        results[f"nb{nb}_reference_mismatches"] = float((ref != want64).sum())
        results[f"nb{nb}_last_bucket_cases"] = float((want64 == nb - 1).sum())
    return results


def sum_parts_job(gen: torch.Generator) -> dict[str, float]:
    """finish_parts (a key split's fp32 partial sums added in part order, one rounding) vs the same sum done by
    torch in that order: mismatching elements per output dtype and part count (tails past a 1024 block included)."""
    results: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for parts in (2, 3, 8):
            dest = torch.randn(parts, 301, 3, 5, generator=gen) * torch.rand(parts, 1, 1, 1, generator=gen) * 100
            want = dest[0].clone()
            for p in range(1, parts):
                want += dest[p]
            out = torch.full((301, 3, 5), float("nan"), dtype=dtype)
            finish_parts(dest, out)
            results[f"{str(dtype).split('.')[1]}_{parts}_parts_mismatches"] = float((out != want.to(dtype)).sum())
    return results


def tables_cache_job(gen: torch.Generator) -> dict[str, float]:
    """bias_tables keeps the tables of eager weights: the same tensors again for the same weights, new (and right)
    ones after an in-place update of the weights, none kept for inference tensors (no version counter)."""
    from kernels.hstu_attention import bias_tables

    pos, ts = torch.randn(3, 2 * 40 - 1, generator=gen), torch.randn(3, 32, generator=gen)
    first = bias_tables(pos, ts, 0.5)
    again = bias_tables(pos, ts, 0.5)
    with torch.no_grad():
        pos.mul_(2.0)
    updated = bias_tables(pos, ts, 0.5)
    fresh = bias_tables(pos.clone(), ts.clone(), 0.5)  # other storage: computed, not found
    with torch.inference_mode():
        pos_i, ts_i = pos.clone(), ts.clone()
        inference = [bias_tables(pos_i, ts_i, 0.5) for _ in range(2)]
    return {
        "kept": float(all(a is b for a, b in zip(first, again, strict=True))),
        "recomputed_after_update": float(all(a is not b for a, b in zip(first, updated, strict=True))),
        "updated_equals_fresh": float(all(torch.equal(a, b) for a, b in zip(updated, fresh, strict=True))),
        "update_changed_positions": float(not torch.equal(first[1], updated[1])),
        "inference_not_kept": float(inference[0][0] is not inference[1][0]),
    }


def arena_step_job(seed: int) -> dict[str, float]:
    """The history cache's step over a device arena (tests/arena_step.py) in float32 through the Triton kernels
    (key ranges with max_user_keys), against GRDense.score with the float64 reference; unfused, and fused as the
    served step runs it (the UVQK GEMM's epilogue writing the new K/V rows, the heads kernel): the same rows."""
    from tests.arena_step import score_over_arena, users
    from tests.conftest import TEST_SPECS
    from tests.test_model import _model

    _, model, tables = _model(TEST_SPECS / "mtgr-tiny.yaml", seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        u64 = users(model, tables, gen)
        expected, _ = model.dense.score(u64.caches, u64.tokens, u64.offsets, u64.num_candidates, u64.stamps, u64.now)
        model32 = model.float()
        caches = [dataclasses.replace(c, rows=c.rows.float()) for c in u64.caches]
        u32 = dataclasses.replace(u64, caches=caches, tokens=u64.tokens.float())
        run = score_over_arena(model32.dense, u32, "triton")
        fused = score_over_arena(model32.dense, u32, "triton", fuse=True)
    written = torch.isfinite(run.rows).all(1)  # the cached rows and the new ones: every layer's K and V
    return {
        "scores_rel_err": rel_err(run.scores, expected),
        "foreign_rows_nan": float(torch.isnan(run.rows[run.foreign.start : run.foreign.end]).all()),
        "fused_scores_rel_err": rel_err(fused.scores, expected),
        "fused_rows_rel_err": rel_err(fused.rows[written], run.rows[written].double()),
        "fused_wrote_the_same_rows": float(
            torch.equal(torch.isfinite(fused.rows).all(1), written) and bool(torch.isnan(fused.rows[~written]).all())
        ),
    }


def main() -> None:
    job, dtype_name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    gen = torch.Generator().manual_seed(seed)
    if job == "attention":
        results = attention_job(DTYPES[dtype_name], gen)
    elif job == "cached":
        results = cached_job(DTYPES[dtype_name], gen)
    elif job == "not_a_suffix":
        results = not_a_suffix_job()
    elif job == "norm_gate":
        results = norm_gate_job(gen)
    elif job == "silu":
        results = silu_job(gen)
    elif job == "group_norm":
        results = group_norm_job(gen)
    elif job == "arena_step":
        results = arena_step_job(seed)
    elif job == "sum_parts":
        results = sum_parts_job(gen)
    elif job == "tables_cache":
        results = tables_cache_job(gen)
    else:
        results = bucket_job()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
