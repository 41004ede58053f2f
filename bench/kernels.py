"""Benchmark of the HSTU attention and norm-gate kernels on one CUDA GPU (run on the lent H100).

Table rows: seq in {512, ..., 8192} x heads in {4, 8}, head dim 128, ~64k tokens, bf16, causal,
no candidates. TFLOP/s count only unmasked pairs: 2 matmuls (QK^T, AV) -> 4 * d FLOPs per pair per
head. Side by side in the same run: the PyTorch reference (kernels.reference, fp32 compute), a
dense causal attention of the same shape via torch's scaled_dot_product_attention (softmax
yardstick; its FLOPs counted the same way), and the measured bf16 matmul peak (8192^3).

    python bench/kernels.py --out bench/results/kernels-h100.json [--quick] [--variants]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import kernels` from a checkout

import kernels
from kernels import reference
from kernels.hstu_attention import _hstu_fwd_kernel, hstu_attention_triton

TOTAL_TOKENS = 65536
HEAD_DIM = 128
NUM_POS, NUM_BUCKETS = 64, 24  # the spec defaults (P, NB)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "uncommitted"
    except OSError:
        return "uncommitted"


def make_case(
    lengths: list[int], ncands: list[int], heads: int, d: int, dtype: torch.dtype, seed: int, ts_gap: int = 20_000
) -> tuple:
    """Jagged inputs on the GPU: random q/k/v, increasing timestamps (random gaps up to ts_gap s)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=dev)
    total = int(offsets[-1])
    q, k, v = (torch.randn(total, heads, d, generator=gen, device=dev).to(dtype) for _ in range(3))
    gaps = torch.randint(0, ts_gap, (total,), generator=gen, device=dev, dtype=torch.int64)
    ts = 1_700_000_000 + torch.cumsum(gaps, 0)
    nc = torch.tensor(ncands, dtype=torch.int64, device=dev)
    pos_w = torch.randn(heads, 2 * NUM_POS - 1, generator=gen, device=dev) * 0.5
    ts_w = torch.randn(heads, NUM_BUCKETS, generator=gen, device=dev) * 0.5
    return q, k, v, offsets, ts, nc, pos_w, ts_w, d**-0.5, float(max(lengths)), True


def unmasked_pairs(lengths: list[int], ncands: list[int], causal: bool) -> int:
    """Allowed (i, j) pairs per head under the contract's mask."""
    total = 0
    for length, nc in zip(lengths, ncands, strict=True):
        n_ctx = length - nc
        history = n_ctx * (n_ctx + 1) // 2 if causal else n_ctx * n_ctx
        total += history + nc * (n_ctx + 1)
    return total


def median_ms(fn: Callable[[], Any], rep_ms: int = 200) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def slow_ms(fn: Callable[[], Any], runs: int = 3) -> float:
    """Median of a few event-timed runs after one warm-up, for the slow reference."""
    fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops() -> float:
    n = 8192
    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    return 2 * n**3 / median_ms(lambda: a @ b) * 1e-9


def copy_bandwidth_gbs() -> float:
    x = torch.randn(1 << 28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / median_ms(lambda: y.copy_(x)) * 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if not torch.isfinite(out).all() else float((out - ref).norm() / ref.norm())


def bench_attention_row(seq: int, heads: int, peak: float) -> dict[str, Any]:
    batch = TOTAL_TOKENS // seq
    lengths, ncands = [seq] * batch, [0] * batch
    args = make_case(lengths, ncands, heads, HEAD_DIM, torch.bfloat16, seed=seq * 10 + heads)
    flops = 4 * HEAD_DIM * heads * unmasked_pairs(lengths, ncands, True)
    ours = median_ms(lambda: kernels.hstu_attention(*args))
    out = kernels.hstu_attention(*args)
    ref_out = reference.hstu_attention(*args)
    ref_ms = slow_ms(lambda: reference.hstu_attention(*args))
    q, k, v = (x.view(batch, seq, heads, HEAD_DIM).transpose(1, 2) for x in args[:3])
    sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    best = _hstu_fwd_kernel.best_config
    row = {
        "seq": seq,
        "heads": heads,
        "batch": batch,
        "ours_ms": ours,
        "ours_tflops": flops / ours * 1e-9,
        "ref_ms": ref_ms,
        "ref_tflops": flops / ref_ms * 1e-9,
        "sdpa_ms": sdpa,
        "sdpa_tflops": flops / sdpa * 1e-9,
        "speedup_vs_ref": ref_ms / ours,
        "pct_of_matmul_peak": 100 * flops / ours * 1e-9 / peak,
        "rel_err_vs_ref": rel_err(out, ref_out),
        "config": str(best) if best is not None else None,
    }
    torch.cuda.empty_cache()
    return row


def bench_variants(peak: float) -> list[dict[str, Any]]:
    """The versions tried, on one shape (seq 2048, 8 heads): what each change bought."""
    seq, heads = 2048, 8
    batch = TOTAL_TOKENS // seq
    lengths, ncands = [seq] * batch, [0] * batch
    args = make_case(lengths, ncands, heads, HEAD_DIM, torch.bfloat16, seed=7)
    flops = 4 * HEAD_DIM * heads * unmasked_pairs(lengths, ncands, True)
    rows = []
    for name, fast_silu, ts_fast in (
        ("v1 exact SiLU (exp + div), int64 time deltas", False, False),
        ("v2 + int32 time deltas", False, True),
        ("v3 + tanh.approx SiLU", True, True),
    ):
        ms = median_ms(lambda f=fast_silu, t=ts_fast: hstu_attention_triton(*args, fast_silu=f, allow_ts_fast=t))
        rows.append(
            {"version": name, "ms": ms, "tflops": flops / ms * 1e-9, "pct_of_peak": 100 * flops / ms * 1e-9 / peak}
        )
    return rows


EXPLORE = (  # (name, (BLOCK_M, BLOCK_N, warps, stages) or None = autotuned op, ablate, ts_gap)
    ("op, autotuned", None, 0, 20_000),
    ("bm128 bn64 w8 s2", (128, 64, 8, 2), 0, 20_000),
    ("bm64 bn64 w4 s2", (64, 64, 4, 2), 0, 20_000),
    ("op, dense timestamps (gaps <= 20 s)", None, 0, 20),
    ("bm64 w4 s2 +const-bucket shortcut", (64, 64, 4, 2), 8, 20_000),
    ("bm128 w8 s2 +const-bucket shortcut", (128, 64, 8, 2), 8, 20_000),
    ("bm64 w4 s2 -bias", (64, 64, 4, 2), 1, 20_000),
    ("bm64 w4 s2 -act", (64, 64, 4, 2), 4, 20_000),
    ("bm64 w4 s2 -bias -act", (64, 64, 4, 2), 5, 20_000),
)


def host_side(args: tuple) -> None:
    """The op's host-side work besides the attention kernel: the bias tables."""
    importlib.import_module("kernels.hstu_attention").bias_tables(args[6], args[7], 0.5)


def explore(peak: float) -> list[dict[str, Any]]:
    """Block shapes, timestamp density and ablations (ablated variants compute the wrong function)."""
    rows = []
    for seq, heads in ((8192, 8), (2048, 8)):
        batch = TOTAL_TOKENS // seq
        lengths, ncands = [seq] * batch, [0] * batch
        flops = 4 * HEAD_DIM * heads * unmasked_pairs(lengths, ncands, True)
        for name, cfg, ablate, gap in EXPLORE:
            args = make_case(lengths, ncands, heads, HEAD_DIM, torch.bfloat16, seed=3, ts_gap=gap)
            if cfg is None:
                fn = lambda x=args: kernels.hstu_attention(*x)  # noqa: E731
            else:
                fn = lambda c=cfg, a=ablate, x=args: hstu_attention_triton(*x, config=c, ablate=a)  # noqa: E731
            try:
                ms = median_ms(fn)
            except Exception as exc:  # an unlaunchable config (e.g. shared memory) is a result too
                rows.append({"variant": name, "seq": seq, "heads": heads, "error": repr(exc)[:200]})
                continue
            tflops = flops / ms * 1e-9
            rows.append({"variant": name, "seq": seq, "heads": heads, "ms": ms, "tflops": tflops,
                         "pct_of_peak": 100 * tflops / peak})  # fmt: skip
        ms = median_ms(lambda x=args: host_side(x))
        rows.append({"variant": "host-side bias tables only", "seq": seq, "heads": heads, "ms": ms})
    return rows


def bench_norm_gate(bandwidth: float) -> dict[str, Any]:
    rows, channels = TOTAL_TOKENS, 1024
    a, u = (torch.randn(rows, channels, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = torch.randn(channels, device="cuda"), torch.randn(channels, device="cuda")
    ours = median_ms(lambda: kernels.norm_gate(a, u, w, b, 1e-5))
    ref = median_ms(lambda: kernels.norm_gate(a, u, w, b, 1e-5, impl="pytorch"))
    moved = 3 * a.numel() * a.element_size()  # read a, read u, write y
    return {
        "shape": [rows, channels],
        "ours_ms": ours,
        "ours_gbs": moved / ours * 1e-6,
        "ref_ms": ref,
        "pct_of_copy_bw": 100 * moved / ours * 1e-6 / bandwidth,
        "rel_err_vs_ref": rel_err(kernels.norm_gate(a, u, w, b, 1e-5), reference.norm_gate(a, u, w, b, 1e-5)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="two rows only")
    parser.add_argument("--variants", action="store_true", help="also time the earlier kernel versions")
    parser.add_argument("--explore", action="store_true", help="only block shapes and ablations")
    opts = parser.parse_args()
    torch.manual_seed(0)
    peak, bandwidth = matmul_peak_tflops(), copy_bandwidth_gbs()
    if opts.explore:
        rows = explore(peak)
        opts.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "peak": peak, "rows": rows}, indent=2))
        print(f"explore, {torch.cuda.get_device_name()}, matmul peak {peak:.0f} TFLOP/s")
        for r in rows:
            print(
                f"{r['seq']:5d} {r['heads']} {r['variant']:<34} "
                + (
                    f"{r['ms']:8.3f} ms "
                    + (f"{r['tflops']:6.1f} TF/s {r['pct_of_peak']:5.1f}%" if "tflops" in r else "")
                    if "ms" in r
                    else r["error"]
                )
            )
        return
    shapes = [(2048, 8), (8192, 8)] if opts.quick else [(s, h) for s in (512, 1024, 2048, 4096, 8192) for h in (4, 8)]
    rows = [bench_attention_row(seq, heads, peak) for seq, heads in shapes]
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "setup": {
            "total_tokens": TOTAL_TOKENS,
            "head_dim": HEAD_DIM,
            "dtype": "bfloat16",
            "causal": True,
            "num_candidates": 0,
            "P": NUM_POS,
            "NB": NUM_BUCKETS,
            "flops": "4*d*heads*unmasked_pairs",
        },
        "matmul_peak_tflops": peak,
        "copy_bandwidth_gbs": bandwidth,
        "attention": rows,
        "variants": bench_variants(peak) if opts.variants else [],
        "norm_gate": bench_norm_gate(bandwidth),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}  matmul peak {peak:.0f} TFLOP/s  copy {bandwidth:.0f} GB/s")
    for var in result["variants"]:
        print(f"  {var['version']:<48} {var['ms']:7.3f} ms {var['tflops']:6.1f} TFLOP/s {var['pct_of_peak']:5.1f}%")
    ng = result["norm_gate"]
    print(
        f"norm_gate {ng['shape']}: {ng['ours_gbs']:.0f} GB/s ({ng['pct_of_copy_bw']:.0f}% of copy), "
        f"{ng['ref_ms'] / ng['ours_ms']:.1f}x ref, err {ng['rel_err_vs_ref']:.1e}"
    )
    print(" seq  H | ours TF/s  %peak | ref TF/s  x ref | sdpa TF/s | rel err | config")
    for r in rows:
        print(
            f"{r['seq']:5d} {r['heads']:2d} | {r['ours_tflops']:9.1f} {r['pct_of_matmul_peak']:5.1f}% | "
            f"{r['ref_tflops']:8.2f} {r['speedup_vs_ref']:6.1f} | {r['sdpa_tflops']:9.1f} | "
            f"{r['rel_err_vs_ref']:.1e} | {r['config']}"
        )


if __name__ == "__main__":
    main()
