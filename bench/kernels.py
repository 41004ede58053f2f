"""Benchmark of the HSTU attention and norm-gate kernels on one CUDA GPU.

Attention rows: head dim 128 (mtgr-base's P = 512, NB = 32) and 64 (mtgr-small's P = 256,
NB = 24) x seq in {512, ..., 8192} x heads in {4, 8} x {no candidates, seq/4 candidates}, ~64k
tokens, bf16, causal. Cached-keys rows: 1 user x {1000, 4096} cached history x {256, 512}
candidates (the candidates are the queries, against history + themselves), beside the full
attention over the same sequence, each timed as eager calls and replayed from a CUDA graph (as
the served step runs it: an eager call at one user is mostly host launch time). TFLOP/s count
only unmasked pairs: 2 matmuls (QK^T, AV) -> 4 * d FLOPs per pair per head. In the same run: the
measured bf16 matmul peak (8192^3) and, for rows without candidates, a dense causal
scaled_dot_product_attention of the same shape (softmax yardstick, FLOPs counted the same way).
Results go through bench/_common.write_result (provenance: argv, commit + dirty flag, date, device,
versions).

    python bench/kernels.py [--out-dir DIR] [--quick] [--ref-timing] [--budget-s S] [--variants | --explore]
    python bench/kernels.py --dry-run   # CPU: tiny shapes through the Triton interpreter (checks the script)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before triton/kernels are imported: the interpreter flag is read at import
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import kernels` / `bench` from a checkout

import kernels
from bench._common import RESULTS, write_result
from kernels import hstu_hopper, reference
from kernels.hstu_attention import _hstu_fwd_kernel, bias_tables, hstu_attention_triton

DRY = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if DRY else "cuda"
TOTAL_TOKENS = 256 if DRY else 65536
SEQS = (32, 64) if DRY else (512, 1024, 2048, 4096, 8192)
HEADS = (2,) if DRY else (4, 8)
# head dim -> (P, NB): 128 and 64 as issue 17 states its targets (mtgr-base's and the earlier
# mtgr-small's tables); 256: mtgr-small (2 heads of 256) as served now.
TABLES = {128: (512, 32), 64: (256, 24), 256: (256, 32)}
HEADS_AT = {128: HEADS, 64: HEADS, 256: (2,) if DRY else (2, 4)}  # mtgr-small has 2 heads
CACHED = ((40, 8), (70, 16)) if DRY else tuple((c, n) for c in (1000, 4096) for n in (256, 512))


@dataclass(frozen=True)
class Shape:
    """One attention row: `batch` users of `seq` tokens, the last `cands` of each candidates."""

    d: int
    seq: int
    heads: int
    cands: int

    @property
    def batch(self) -> int:
        return max(1, TOTAL_TOKENS // self.seq)


def attention_shapes(quick: bool, seqs: tuple[int, ...] = SEQS) -> list[Shape]:
    if quick:
        return [Shape(128, SEQS[-3 if len(SEQS) > 2 else 0], HEADS[-1], 0), Shape(128, SEQS[-1], HEADS[-1], 0)]
    return [
        Shape(d, seq, heads, cands) for d in TABLES for seq in seqs for heads in HEADS_AT[d] for cands in (0, seq // 4)
    ]


def make_case(
    lengths: list[int],
    ncands: list[int],
    heads: int,
    d: int,
    dtype: torch.dtype,
    seed: int,
    ts_gap: int = 20_000,
    tables: tuple[int, int] = (64, 24),
) -> tuple:
    """Jagged inputs: random q/k/v, increasing timestamps (random gaps up to ts_gap s), bias tables
    with tables = (P, NB). The argument tuple of kernels.hstu_attention (causal)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)
    total = int(offsets[-1])
    q, k, v = (torch.randn(total, heads, d, generator=gen, device=DEVICE).to(dtype) for _ in range(3))
    gaps = torch.randint(0, ts_gap, (total,), generator=gen, device=DEVICE, dtype=torch.int64)
    ts = 1_700_000_000 + torch.cumsum(gaps, 0)
    nc = torch.tensor(ncands, dtype=torch.int64, device=DEVICE)
    num_pos, num_buckets = tables
    pos_w = torch.randn(heads, 2 * num_pos - 1, generator=gen, device=DEVICE) * 0.5
    ts_w = torch.randn(heads, num_buckets, generator=gen, device=DEVICE) * 0.5
    return q, k, v, offsets, ts, nc, pos_w, ts_w, d**-0.5, float(max(lengths)), True


def unmasked_pairs(lengths: list[int], ncands: list[int], causal: bool, queries: list[int] | None = None) -> int:
    """Allowed (i, j) pairs per head under the contract's mask; `queries`: only each user's last
    queries[b] rows count (queries against cached keys)."""
    total = 0
    for b, (length, nc) in enumerate(zip(lengths, ncands, strict=True)):
        n_ctx = length - nc
        first = 0 if queries is None else length - queries[b]
        hist = range(first, n_ctx)  # history rows: i + 1 keys (causal) or n_ctx
        total += sum(i + 1 for i in hist) if causal else len(hist) * n_ctx
        total += (length - max(first, n_ctx)) * (n_ctx + 1)  # candidates: the history and themselves
    return total


def median_ms(fn: Callable[[], Any], rep_ms: int = 200) -> float:
    if DRY:  # the interpreter: one timed run (the numbers mean nothing; the code path is what is checked)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def graph_ms(fn: Callable[[], Any]) -> float:
    """Median ms of fn replayed from a CUDA graph (as the history cache's served step runs it): no host launch
    time, which at one user's few queries would be most of an eager call. Call fn once first (autotuning and
    compiles stay outside the capture). The interpreter: median_ms (no graphs on the CPU)."""
    if DRY:
        return median_ms(fn)
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def slow_ms(fn: Callable[[], Any], runs: int = 3) -> float:
    """Median of a few event-timed runs after one warm-up, for the slow reference."""
    if DRY:
        return median_ms(fn)
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
    n = 256 if DRY else 8192
    dtype = torch.float32 if DRY else torch.bfloat16
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_ms(lambda: a @ b) * 1e-9


def copy_bandwidth_gbs() -> float:
    x = torch.randn(1 << (16 if DRY else 28), device=DEVICE)  # 1 GiB on the GPU
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / median_ms(lambda: y.copy_(x)) * 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float("inf") if not torch.isfinite(out).all() else float((out - ref).norm() / ref.norm())


def best_config(*qkv: torch.Tensor) -> str | None:
    """The config the last call ran: the Gluon kernel's default where kernels.ops launched it for q, k, v, else the
    Triton autotuner's pick."""
    if qkv and hstu_hopper.runs(qkv[0], qkv[1], qkv[2]):
        return f"hopper {hstu_hopper.HOPPER_CONFIGS[qkv[0].shape[-1]][0]}"
    best = getattr(_hstu_fwd_kernel, "best_config", None)
    return str(best) if best is not None else None


def bench_attention_row(shape: Shape, peak: float, ref_timing: bool) -> dict[str, Any]:
    lengths, ncands = [shape.seq] * shape.batch, [shape.cands] * shape.batch
    seed = shape.seq * 10 + shape.heads + shape.d
    args = make_case(lengths, ncands, shape.heads, shape.d, torch.bfloat16, seed, tables=TABLES[shape.d])
    flops = 4 * shape.d * shape.heads * unmasked_pairs(lengths, ncands, True)
    ours = median_ms(lambda: kernels.hstu_attention(*args))
    out = kernels.hstu_attention(*args)
    row: dict[str, Any] = {**asdict(shape), "batch": shape.batch, "P": TABLES[shape.d][0], "NB": TABLES[shape.d][1]}
    row |= {"ours_ms": ours, "ours_tflops": flops / ours * 1e-9, "pct_of_matmul_peak": 100 * flops / ours * 1e-9 / peak}
    row["rel_err_vs_ref"] = rel_err(out, reference.hstu_attention(*args))
    if ref_timing:
        ref_ms = slow_ms(lambda: reference.hstu_attention(*args))
        row |= {"ref_ms": ref_ms, "speedup_vs_ref": ref_ms / ours}
    if shape.cands == 0 and not DRY:
        q, k, v = (x.view(shape.batch, shape.seq, shape.heads, shape.d).transpose(1, 2) for x in args[:3])
        sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        row |= {"sdpa_ms": sdpa, "sdpa_tflops": flops / sdpa * 1e-9}
    row["config"] = best_config(*args[:3])
    row["kernel"] = "hopper" if hstu_hopper.runs(*args[:3]) else "triton"
    return row


def bench_cached_row(cached: int, cands: int, d: int, heads: int, peak: float) -> dict[str, Any]:
    """One user: `cached` history keys plus `cands` candidates, which are the queries."""
    length = cached + cands
    q, k, v, offsets, ts, nc, pos_w, ts_w, alpha, norm, causal = make_case(
        [length], [cands], heads, d, torch.bfloat16, seed=cached + cands, tables=TABLES[d]
    )
    q_offsets = torch.tensor([0, cands], dtype=torch.int64, device=DEVICE)
    args = (q[cached:], k, v, q_offsets, offsets, ts, nc, pos_w, ts_w, alpha, norm, causal)
    flops = 4 * d * heads * unmasked_pairs([length], [cands], True, queries=[cands])
    cached_call = functools.partial(kernels.hstu_attention_cached, *args)
    full_call = functools.partial(kernels.hstu_attention, q, k, v, offsets, ts, nc, pos_w, ts_w, alpha, norm, causal)
    ours, full = median_ms(cached_call), median_ms(full_call)  # eager: one user's launch is mostly host time
    ours_graph, full_graph = graph_ms(cached_call), graph_ms(full_call)
    out = kernels.hstu_attention_cached(*args)
    return {
        "users": 1,
        "cached": cached,
        "cands": cands,
        "d": d,
        "heads": heads,
        "ours_ms": ours,
        "ours_tflops": flops / ours * 1e-9,
        "pct_of_matmul_peak": 100 * flops / ours * 1e-9 / peak,
        "full_sequence_ms": full,
        "ours_graph_ms": ours_graph,
        "ours_graph_tflops": flops / ours_graph * 1e-9,
        "full_sequence_graph_ms": full_graph,
        "rel_err_vs_ref": rel_err(out, reference.hstu_attention_cached(*args)),
        "config": best_config(q, k, v),
        "kernel": "hopper" if hstu_hopper.runs(q, k, v) else "triton",
    }


def bench_variants(peak: float) -> list[dict[str, Any]]:
    """The versions tried, on one shape (seq 2048, 8 heads): what each change bought."""
    seq, heads = 2048, 8
    batch = TOTAL_TOKENS // seq
    lengths, ncands = [seq] * batch, [0] * batch
    args = make_case(lengths, ncands, heads, 128, torch.bfloat16, seed=7, tables=TABLES[128])
    flops = 4 * 128 * heads * unmasked_pairs(lengths, ncands, True)
    rows = []
    for name, fast_silu, ts_fast in (
        ("v1 exact SiLU (exp + div), int64 time deltas", False, False),
        ("v2 + int32 time deltas", False, True),
        ("v3 + tanh.approx SiLU", True, True),
    ):
        ms = median_ms(functools.partial(hstu_attention_triton, *args, fast_silu=fast_silu, allow_ts_fast=ts_fast))
        rows.append(
            {"version": name, "ms": ms, "tflops": flops / ms * 1e-9, "pct_of_peak": 100 * flops / ms * 1e-9 / peak}
        )
    return rows


Variant = tuple[str, tuple[int, int, int, int] | None, Any, int]
EXPLORE: tuple[
    Variant, ...
] = (  # (name, (BLOCK_M, BLOCK_N, warps, stages) or None = autotuned op, launcher options, ts_gap)
    ("op, autotuned", None, {}, 20_000),
    ("bm128 bn64 w8 s2", (128, 64, 8, 2), {}, 20_000),
    ("bm64 bn64 w4 s2", (64, 64, 4, 2), {}, 20_000),
    ("op, dense timestamps (gaps <= 20 s)", None, {}, 20),
    ("bm64 w4 s2 float-exponent bucket (no PTX bucket)", (64, 64, 4, 2), {"ptx": 1}, 20_000),
    ("bm128 w8 s2 float-exponent bucket (no PTX bucket)", (128, 64, 8, 2), {"ptx": 1}, 20_000),
    ("bm64 w4 s2 -bias", (64, 64, 4, 2), {"ablate": 1}, 20_000),
    ("bm64 w4 s2 -act", (64, 64, 4, 2), {"ablate": 4}, 20_000),
    ("bm64 w4 s2 -bias -act", (64, 64, 4, 2), {"ablate": 5}, 20_000),
)


def explore(peak: float) -> list[dict[str, Any]]:
    """Block shapes, timestamp density and ablations (ablated variants compute the wrong function)."""
    rows: list[dict[str, Any]] = []
    for seq, heads in ((8192, 8), (2048, 8)):
        batch = TOTAL_TOKENS // seq
        lengths, ncands = [seq] * batch, [0] * batch
        flops = 4 * 128 * heads * unmasked_pairs(lengths, ncands, True)
        for name, cfg, options, gap in EXPLORE:
            args = make_case(lengths, ncands, heads, 128, torch.bfloat16, seed=3, ts_gap=gap, tables=TABLES[128])
            fn: Callable[[], Any] = (
                functools.partial(kernels.hstu_attention, *args)
                if cfg is None
                else functools.partial(hstu_attention_triton, *args, config=cfg, **options)
            )
            try:
                ms = median_ms(fn)
            except Exception as exc:  # an unlaunchable config (e.g. shared memory) is a result too
                rows.append({"variant": name, "seq": seq, "heads": heads, "error": repr(exc)[:200]})
                continue
            rows.append({"variant": name, "seq": seq, "heads": heads, "ms": ms, "tflops": flops / ms * 1e-9,
                         "pct_of_peak": 100 * flops / ms * 1e-9 / peak})  # fmt: skip
        ms = median_ms(functools.partial(bias_tables, args[6], args[7], 0.5))
        rows.append({"variant": "host-side bias tables only", "seq": seq, "heads": heads, "ms": ms})
    return rows


def bench_norm_gate(bandwidth: float) -> dict[str, Any]:
    rows, channels = TOTAL_TOKENS, 64 if DRY else 1024
    a, u = (torch.randn(rows, channels, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    w, b = torch.randn(channels, device=DEVICE), torch.randn(channels, device=DEVICE)
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


def gpu_tag() -> str:
    """'h200' from 'NVIDIA H200' (the default result file's name)."""
    if DRY:
        return "dry-run"
    words = re.findall(r"[A-Za-z]+\d+\w*", torch.cuda.get_device_name())
    return words[-1].lower() if words else "gpu"


def timed_rows(
    make: Callable[[Any], dict[str, Any]],
    items: list[Any],
    deadline: float,
    rows: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Append to `rows` until the time budget is spent, the rest listed as skipped (never silently
    dropped); `save` after each row, so a run cut short by a timeout still leaves its numbers."""
    for item in items:
        if time.monotonic() > deadline:
            rows.append({"skipped": "time budget spent", "shape": str(item)})
            continue
        try:
            rows.append(make(item))
        except Exception as exc:  # one failing row must not lose the others' numbers
            rows.append({"error": repr(exc)[:400], "shape": str(item)})
        if not DRY:
            torch.cuda.empty_cache()
        save()


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}  matmul peak {result['matmul_peak_tflops']:.0f} TFLOP/s")
    print("   d   seq  H  cands |  ours ms  TFLOP/s  %peak | sdpa TF/s | rel err | config")
    for r in result.get("attention", []):
        if "ours_ms" not in r:
            print(f"  {r['shape']}: {r.get('error') or r.get('skipped')}")
            continue
        sdpa = f"{r['sdpa_tflops']:9.1f}" if "sdpa_tflops" in r else " " * 9
        print(f"{r['d']:4d} {r['seq']:5d} {r['heads']:2d} {r['cands']:6d} | {r['ours_ms']:8.3f} "
              f"{r['ours_tflops']:8.1f} {r['pct_of_matmul_peak']:5.1f}% | {sdpa} | {r['rel_err_vs_ref']:.1e} | "
              f"{r['config']}")  # fmt: skip
    print(
        "cached keys: users cached cands d H | eager: ours ms  full-seq ms | CUDA graph: ours ms  TFLOP/s  "
        "full-seq ms | rel err"
    )
    for r in result.get("cached", []):
        if "ours_ms" not in r:
            print(f"  {r['shape']}: {r.get('error') or r.get('skipped')}")
            continue
        graphed = (f"{r['ours_graph_ms']:19.3f} {r['ours_graph_tflops']:8.1f} {r['full_sequence_graph_ms']:12.3f}"
                   if "ours_graph_ms" in r else " " * 41)  # fmt: skip
        eager = f"{r['ours_ms']:14.3f} {r['full_sequence_ms']:12.3f}"
        print(f"             {r['users']:5d} {r['cached']:6d} {r['cands']:5d} {r['d']:3d} {r['heads']} | "
              f"{eager} | {graphed} | {r['rel_err_vs_ref']:.1e}")  # fmt: skip
    ng = result.get("norm_gate")
    if ng:
        print(f"norm_gate {ng['shape']}: {ng['ours_gbs']:.0f} GB/s ({ng['pct_of_copy_bw']:.0f}% of copy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="writes kernels-<gpu>.json there")
    parser.add_argument("--quick", action="store_true", help="two attention rows only")
    parser.add_argument("--seqs", help="comma-separated sequence lengths (default: all of SEQS)")
    parser.add_argument("--ref-timing", action="store_true", help="also time the PyTorch reference per row")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting rows after this")
    parser.add_argument("--variants", action="store_true", help="also time the earlier kernel versions")
    parser.add_argument("--explore", action="store_true", help="only block shapes and ablations")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--print", type=Path, dest="show", help="only print the table of a result file")
    opts = parser.parse_args()
    if opts.show:
        print_table(json.loads(opts.show.read_text()))
        return
    deadline = time.monotonic() + opts.budget_s
    torch.manual_seed(0)
    out = opts.out_dir / f"kernels-{gpu_tag()}.json"
    peak = matmul_peak_tflops()
    if opts.explore:
        rows = explore(peak)
        print(f"explore: {write_result(out, {'matmul_peak_tflops': peak, 'explore': rows})}")
        for r in rows:
            print(r)
        return
    result: dict[str, Any] = {
        "setup": {
            "total_tokens": TOTAL_TOKENS,
            "dtype": "bfloat16",
            "causal": True,
            "tables": {f"d{d}": {"P": p, "NB": nb} for d, (p, nb) in TABLES.items()},
            "flops": "4*d*heads*unmasked_pairs",
            "timing": "single run (interpreter dry run)" if DRY else "triton.testing.do_bench median",
        },
        "matmul_peak_tflops": peak,
        "attention": [],
        "cached": [],
    }

    def save() -> None:
        write_result(out, result)

    timed_rows(
        lambda s: bench_attention_row(s, peak, opts.ref_timing),
        attention_shapes(opts.quick, tuple(int(x) for x in opts.seqs.split(",")) if opts.seqs else SEQS),
        deadline,
        result["attention"],
        save,
    )
    cached_items = [(c, n, d, HEADS_AT[d][-1]) for d in TABLES for c, n in CACHED]
    cached_row = lambda it: bench_cached_row(it[0], it[1], it[2], it[3], peak)  # noqa: E731
    timed_rows(cached_row, cached_items, deadline, result["cached"], save)
    if opts.variants:
        result["variants"] = bench_variants(peak)
    if time.monotonic() < deadline:
        result |= {"copy_bandwidth_gbs": (bw := copy_bandwidth_gbs()), "norm_gate": bench_norm_gate(bw)}
    path = write_result(out, result)
    print_table(json.loads(path.read_text()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
