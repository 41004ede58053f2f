"""Runs the Triton kernels under TRITON_INTERPRET=1 and prints one JSON line of results.

Started as a subprocess by test_interpreter.py: TRITON_INTERPRET must be set before the kernels
are decorated, and the rest of the suite (one pytest process, xdist workers) must not see it.
Usage: python interp_worker.py JOB DTYPE SEED   (JOB: attention | norm_gate | bucket)
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels import reference  # noqa: E402
from kernels.hstu_attention import _biased_bucket, _time_delta, hstu_attention_triton  # noqa: E402
from kernels.norm_gate import norm_gate_triton  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    ablate: int = 0,
) -> float:
    num_pos, num_buckets = 8, 12  # small P and NB so position clamping and saturation both occur
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
        ablate=ablate,
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
        # ablate=8: the experimental (exact, off by default) constant-bucket shortcut for far blocks.
        "const_bucket_shortcut": attention_case(
            gen, dtype, [64, 50], [2, 0], False, ts_high=300, increasing=True, ablate=8
        ),
        "single_token_candidate": attention_case(gen, dtype, [1, 2], [1, 1], True),
        "odd_head_dims": attention_case(gen, dtype, [23, 40], [3, 0], True, dqk=20, dv=24),
        # Timestamps far apart (span > 2**29 and > 2**32): the int64 time-delta path.
        "huge_timestamps": attention_case(gen, dtype, [40, 37], [3, 0], True, ts_high=1 << 40),
        "int64_path_forced": attention_case(gen, dtype, lengths, ncands, False, allow_ts_fast=False),
    }


def norm_gate_job(gen: torch.Generator) -> dict[str, float]:
    results = {}
    for name, dtype in DTYPES.items():
        for shape in ((37, 48), (5, 256), (1, 16), (2, 7, 40)):
            channels = shape[-1]
            a = (torch.randn(*shape, generator=gen) * 3 + 1).to(dtype)
            u = torch.randn(*shape, generator=gen).to(dtype)
            w, b = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
            out = norm_gate_triton(a, u, w, b, 1e-5, out=torch.full(shape, float("nan"), dtype=dtype))
            ref = reference.norm_gate(a.double(), u.double(), w.double(), b.double(), 1e-5)
            results[f"{name}_{'x'.join(map(str, shape))}"] = rel_err(out, ref)
    return results


@triton.jit
def _bucket_kernel(DT, TS_I, TS_J, OUT32, OUT64, n, NB: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    dt = tl.load(DT + offs, mask=ok, other=0)
    tl.store(OUT32 + offs, _biased_bucket(dt, NB) - 127, mask=ok)
    ts_i = tl.load(TS_I + offs, mask=ok, other=0)
    ts_j = tl.load(TS_J + tl.arange(0, 1))  # [1]: _time_delta forms the outer difference
    d64 = tl.sum(_time_delta(dt, dt, ts_i, ts_j, False, False), axis=1)
    tl.store(OUT64 + offs, _biased_bucket(d64, NB) - 127, mask=ok)


def bucket_job() -> dict[str, float]:
    """Kernel bucket == integer floor(log2(1 + |dt|)) at every power-of-two edge, both signs, for
    the int32 path and the int64 path (timestamps near 2**45), with NB = 24 and NB = 31."""
    edges = sorted({max(0, (1 << e) + d) for e in range(31) for d in (-2, -1, 0, 1)} - {(1 << 30) + 1})
    dt = torch.tensor(edges + [-x for x in edges], dtype=torch.int32)
    base = 1 << 45
    ts_i = base + dt.to(torch.int64) * torch.where(torch.arange(dt.numel()) % 2 == 0, 1, -1)
    ts_j = torch.tensor([base], dtype=torch.int64)
    results = {}
    for nb in (24, 31):
        out32 = torch.full((dt.numel(),), -7, dtype=torch.int32)
        out64 = torch.full((dt.numel(),), -7, dtype=torch.int32)
        block = triton.next_power_of_2(dt.numel())
        _bucket_kernel[(1,)](dt, ts_i, ts_j, out32, out64, dt.numel(), NB=nb, BLOCK=block)
        want = torch.tensor([min((abs(x) + 1).bit_length() - 1, nb - 1) for x in dt.tolist()], dtype=torch.int32)
        ref = reference.time_bucket(dt.to(torch.int64).abs(), nb).to(torch.int32)
        results[f"nb{nb}_int32_path_mismatches"] = float((out32 != want).sum())
        results[f"nb{nb}_int64_path_mismatches"] = float((out64 != want).sum())
        results[f"nb{nb}_reference_mismatches"] = float((ref != want).sum())
    return results


def main() -> None:
    job, dtype_name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    gen = torch.Generator().manual_seed(seed)
    if job == "attention":
        results = attention_job(DTYPES[dtype_name], gen)
    elif job == "norm_gate":
        results = norm_gate_job(gen)
    else:
        results = bucket_job()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
