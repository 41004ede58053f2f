"""GPU correctness of the kernels at real sizes, and capture of the ops (run on a lent GPU).

Every case: fresh random inputs (the seed is recorded), output poisoned with NaN, ||out - ref|| /
||ref|| against the float64 reference (the float32 reference's own error is recorded beside it).
On a GPU the 16-bit cases run the GPU-only variant: tanh.approx SiLU and the inline-PTX bias
gather, which the CPU interpreter cannot run. Covered: the full kernel and the cached-keys
kernel, time_buckets 24 / 32 / 64 (with int64-end timestamps: saturated gaps) and 100, P up to
512, head dims 64 / 128, the int64 time-gap path. Then the ops through torch.ops.grc,
torch.compile (inductor, fullgraph), torch.export and (--aoti) AOTInductor. Prints one line per
check; writes JSON through bench/_common.write_result.

--kernel hopper checks the Gluon sm90 kernel (kernels/hstu_hopper.py) on the same cases instead: its 16-bit
cases run (the others, float32 and the Triton kernel's PTX-variant switches, are listed as not its case) and
capture is skipped (it is not behind the ops).

    python bench/gpu_kernels_check.py [--out-dir DIR] [--aoti] [--skip-capture] [--budget-s S] [--kernel hopper]
    python bench/gpu_kernels_check.py --dry-run   # CPU: small cases through the Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before triton/kernels are imported: the interpreter flag is read at import
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.kernels as bench
from bench._common import RESULTS, write_result
from kernels import reference
from kernels.hstu_attention import (
    INTERPRET,
    PTX_CVT,
    PTX_GATHER,
    _bucket32,
    hstu_attention_cached_triton,
)
from kernels.hstu_hopper import HOPPER_CONFIGS
from kernels.norm_gate import norm_gate_triton

DEVICE = bench.DEVICE
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FIXED = (128, 64, 8, 2)  # (BLOCK_M, BLOCK_N, warps, stages): no autotuning per variant, or compiling dominates
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
SCALE = 16 if INTERPRET else 1  # the interpreter runs the same cases with lengths / SCALE


def with_int64_ends(ts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Some timestamps moved to the int64 ends: gaps up to 2**64 - 1, which saturate."""
    ends = torch.tensor([INT64_MIN, INT64_MAX, INT64_MIN + 1, -1], device=ts.device)
    pick = torch.randint(0, 4, ts.shape, generator=gen, device=ts.device)
    return torch.where(torch.rand(ts.shape, generator=gen, device=ts.device) < 0.2, ends[pick], ts)


def floats_as(args: tuple, dtype: torch.dtype) -> list[Any]:
    return [x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in args]


def attention_case(
    name: str,
    dtype: torch.dtype,
    lengths: list[int],
    ncands: list[int],
    causal: bool = True,
    d: int = 128,
    heads: int = 4,
    queries: list[int] | None = None,
    tables: tuple[int, int] = (64, 24),
    ts_gap: int = 20_000,
    int64_ends: bool = False,
    kernel: str = "triton",
    **kw: Any,
) -> dict[str, Any]:
    """One check of hstu_attention_cached_triton (queries = each user's last `queries[b]` tokens;
    None: all of them, i.e. the full attention) against the float64 reference."""
    lengths = [max(1, n // SCALE) if n else 0 for n in lengths]
    ncands = [min(c, n) for c, n in zip(ncands, lengths, strict=True)]
    queries = (
        lengths if queries is None else [min(max(1, n // SCALE), m) for n, m in zip(queries, lengths, strict=True)]
    )
    seed = random.getrandbits(31)
    q, k, v, kv_offsets, ts, nc, pos_w, ts_w, alpha, norm, _ = bench.make_case(
        lengths, ncands, heads, d, dtype, seed=seed, ts_gap=ts_gap, tables=tables
    )
    if int64_ends:
        ts = with_int64_ends(ts, torch.Generator(device=DEVICE).manual_seed(seed + 1))
    keep = torch.cat([torch.arange(int(kv_offsets[b + 1]) - n, int(kv_offsets[b + 1])) for b, n in enumerate(queries)])
    q = q[keep.to(DEVICE)]
    q_offsets = torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)
    args = (q, k, v, q_offsets, kv_offsets, ts, nc, pos_w, ts_w, alpha, norm, causal)
    out = torch.full((q.shape[0], heads, d), float("nan"), dtype=dtype, device=DEVICE)
    if kernel == "hopper":
        from kernels.hstu_hopper import hstu_attention_hopper

        out = hstu_attention_hopper(*args, out=out, **kw)
    else:
        out = hstu_attention_cached_triton(*args, out=out, config=None if INTERPRET else FIXED, **kw)
    ref64 = reference.hstu_attention_cached(*floats_as(args, torch.float64))
    ref32 = reference.hstu_attention_cached(*floats_as(args, torch.float32))
    err = bench.rel_err(out, ref64)
    return {
        "check": name,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "gpu_variant": dtype != torch.float32 and not INTERPRET and kw.get("fast_silu") is not False,
        "rel_err": err,
        "fp32_reference_rel_err": bench.rel_err(ref32, ref64),
        "bound": BOUNDS[dtype],
        "ok": err <= BOUNDS[dtype],
    }


@triton.jit
def _bucket_kernel(DT, OUT, n, PTX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + offs, _bucket32(tl.load(DT + offs, mask=offs < n, other=0), PTX), mask=offs < n)


def bucket_edges() -> list[dict[str, Any]]:
    """The time bucket on the GPU (cvt.rz: inline PTX, which the interpreter cannot run) and the float path
    against floor(log2(1 + |dt|)) in Python integers at every power-of-two edge, both signs."""
    edges = sorted({max(0, (1 << e) + d) for e in range(30) for d in (-2, -1, 0, 1)})
    dt = torch.tensor(edges + [-x for x in edges], dtype=torch.int32, device=DEVICE)
    want = torch.tensor([(abs(x) + 1).bit_length() - 1 for x in dt.tolist()], dtype=torch.int32, device=DEVICE)
    results = []
    for name, ptx in (("cvt.rz", PTX_CVT), ("float exponent", 0)):
        if ptx and INTERPRET:
            continue
        out = torch.full_like(dt, -7)
        _bucket_kernel[(1,)](dt, out, dt.numel(), PTX=ptx, BLOCK=triton.next_power_of_2(dt.numel()))
        wrong = int((out != want).sum())
        results.append({"check": f"time bucket at power-of-two edges, {name}", "dtype": "int32", "mismatches": wrong,
                        "cases": dt.numel(), "ok": wrong == 0})  # fmt: skip
    return results


def correctness(deadline: float, kernel: str = "triton") -> list[dict[str, Any]]:
    rng = random.Random()
    lengths = [1, 2048, 0, *[rng.randint(1, 2048) for _ in range(5)]]
    ncands = [1, 0, 0, *[rng.choice([0, 1, rng.randint(0, n)]) for n in lengths[3:]]]
    suffix = [min(n, rng.choice([1, 64, 300, n])) for n in lengths]  # cached keys: a suffix of each user
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    # Most important first (a time budget may cut the tail): the GPU variant on the int64 loop
    # (saturated gaps, spans past 2**29), then both kernels at the MTGR table sizes. The mtgr tables
    # and config match the benchmark's, so its compiles come from Triton's cache.
    mtgr_base, mtgr_small = {"d": 128, "tables": (512, 32)}, {"d": 64, "heads": 2, "tables": (256, 24)}
    ends64 = {"tables": (64, 64), "int64_ends": True}
    cases: list[tuple[str, torch.dtype, dict[str, Any]]] = [
        ("full NB 64, int64-end timestamps", bf16, ends64),
        ("full huge spans (int64 gap path)", bf16, {"ts_gap": 1 << 28, **mtgr_base}),
        ("full mtgr-base tables (P 512, NB 32)", bf16, mtgr_base),
        ("cached mtgr-base tables (P 512, NB 32)", bf16, {"queries": suffix, **mtgr_base}),
        ("cached NB 64, int64-end timestamps", bf16, {"queries": suffix, **ends64}),
        ("full mtgr-small tables (d 64)", bf16, mtgr_small),
        ("cached mtgr-small tables (d 64)", bf16, {"queries": suffix, **mtgr_small}),
        ("cached candidates only, NB 32", bf16, {"queries": [max(1, c) for c in ncands], **mtgr_base}),
        (
            "full NB 32, int64-end timestamps, non-causal",
            bf16,
            {"tables": (64, 32), "int64_ends": True, "causal": False},
        ),
        ("cached non-causal, NB 32", bf16, {"queries": suffix, "causal": False, "tables": (64, 32)}),
        ("full NB 100 (buckets past 63 unread)", bf16, {"tables": (64, 100), "ts_gap": 1 << 58}),
        ("full int64 path forced", bf16, {"allow_ts_fast": False, **mtgr_base}),
        ("full, exact SiLU path", bf16, {"fast_silu": False, **mtgr_base}),
        ("full, float-exponent bucket (no PTX bucket)", bf16, {"ptx": PTX_GATHER, **mtgr_base}),
        ("full, gathered tables (no shuffles)", bf16, {"ptx": PTX_GATHER | PTX_CVT, **mtgr_base}),
        ("full causal", f16, mtgr_base),
        ("cached causal", f16, {"queries": suffix, **mtgr_base}),
        ("full non-causal", f16, {"causal": False, **mtgr_base}),
        ("full causal", f32, mtgr_base),
        ("cached causal", f32, {"queries": suffix, **mtgr_base}),
    ]
    results = bucket_edges() if kernel == "triton" else []
    if kernel == "hopper":  # its own cases: config shapes per head dim, key splits, one-user cached suffixes
        cases += [(f"full d 128 {cfg}", bf16, {"config": cfg, **mtgr_base}) for cfg in HOPPER_CONFIGS[128][1:]]
        cases += [(f"full d 256 {cfg}", bf16, {"config": cfg, "d": 256, "heads": 2, "tables": (256, 32)})
                  for cfg in HOPPER_CONFIGS[256]]  # fmt: skip
        cases += [(f"full d 64 {cfg}", bf16, {"config": cfg, **mtgr_small}) for cfg in HOPPER_CONFIGS[64]]
        cases += [("cached, keys split in 5", bf16, {"queries": suffix, "splits": 5, **mtgr_base})]
    for name, dtype, kw in cases:
        if kernel == "hopper" and (dtype == torch.float32 or "ptx" in kw):
            results.append({"check": name, "dtype": str(dtype).removeprefix("torch."),
                            "not_applicable": "not this kernel's case", "ok": None})  # fmt: skip
            continue
        if time.monotonic() > deadline:
            # not run: neither passed nor failed (print_report counts it apart; the exit status says incomplete)
            results.append({"check": name, "dtype": str(dtype).removeprefix("torch."), "skipped": "time budget spent",
                            "ok": None})  # fmt: skip
            continue
        try:
            results.append(attention_case(name, dtype, lengths, ncands, kernel=kernel, **kw))
        except Exception:  # report and go on: the other checks still count
            error = traceback.format_exc()[-1500:]
            results.append({"check": name, "dtype": str(dtype).removeprefix("torch."), "error": error, "ok": False})
    for dtype in (bf16, f16, f32) if kernel == "triton" else ():
        for shape in ((4096 // SCALE, 1024 // SCALE), (77, 300)):
            a = (torch.randn(*shape, device=DEVICE) * 2 + 0.5).to(dtype)
            u = torch.randn(*shape, device=DEVICE).to(dtype)
            w, b = torch.randn(shape[1], device=DEVICE), torch.randn(shape[1], device=DEVICE)
            y = norm_gate_triton(a, u, w, b, 1e-5, out=torch.full(shape, float("nan"), dtype=dtype, device=DEVICE))
            err = bench.rel_err(y, reference.norm_gate(a.double(), u.double(), w.double(), b.double(), 1e-5))
            results.append({"check": f"norm_gate {shape}", "dtype": str(dtype).removeprefix("torch."), "rel_err": err,
                            "bound": BOUNDS[dtype], "ok": err <= BOUNDS[dtype]})  # fmt: skip
    return results


class Block(torch.nn.Module):
    def forward(self, q, k, v, offsets, ts, nc, pos_w, ts_w, u, w, b, q_offsets):  # type: ignore[no-untyped-def]
        o = torch.ops.grc.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.088, 1024.0, True)
        y = torch.ops.grc.norm_gate(o.reshape(o.shape[0], -1), u, w, b, 1e-5)
        last = q[q.shape[0] - int(q_offsets.shape[0]) + 1 :]  # (not data dependent: a static slice)
        c = torch.ops.grc.hstu_attention_cached(
            last, k, v, q_offsets, offsets, ts, nc, pos_w, ts_w, 0.088, 1024.0, True
        )
        return y, c


def capture(aoti: bool) -> list[dict[str, Any]]:
    """The ops eager, under torch.compile and torch.export (and AOTInductor) against the reference."""
    lengths, ncands = [300, 1024, 5, 700], [10, 0, 5, 1]
    lengths = [max(2, n // SCALE) for n in lengths]
    ncands = [min(c, n) for c, n in zip(ncands, lengths, strict=True)]
    q, k, v, offsets, ts, nc, pos_w, ts_w, *_ = bench.make_case(
        lengths, ncands, 2, 64, torch.bfloat16, seed=random.getrandbits(31), tables=(256, 32)
    )
    total = q.shape[0]
    u = torch.randn(total, 128, device=DEVICE, dtype=torch.bfloat16)
    w, b = torch.randn(128, device=DEVICE), torch.randn(128, device=DEVICE)
    # the cached op's queries: the last token of every user but the last, whose last 1 + (B-1) tokens
    q_offsets = torch.tensor([0, 0, 0, 0, len(lengths)], device=DEVICE)
    inputs = (q, k, v, offsets, ts, nc, pos_w, ts_w, u, w, b, q_offsets)
    eager_y, eager_c = Block()(*inputs)
    att = reference.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.088, 1024.0, True)
    want_y = reference.norm_gate(att.reshape(total, -1), u, w, b, 1e-5)
    want_c = att[total - len(lengths) :]
    results: list[dict[str, Any]] = [
        {
            "check": "ops eager vs reference",
            "rel_err": max(bench.rel_err(eager_y, want_y), bench.rel_err(eager_c, want_c)),
        }
    ]

    def attempt(name: str, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        start = time.time()
        try:
            y, c = fn()
            err = max(bench.rel_err(y, eager_y), bench.rel_err(c, eager_c))
            results.append({"check": name, "rel_err": err, "s": time.time() - start})
        except Exception:  # report, don't stop: the table still matters
            results.append({"check": name, "error": traceback.format_exc()[-1500:]})

    attempt("torch.compile inductor fullgraph", lambda: torch.compile(Block(), fullgraph=True)(*inputs))
    program = torch.export.export(Block(), inputs)
    attempt("torch.export module", lambda: program.module()(*inputs))
    if aoti:

        def run_aoti() -> tuple[torch.Tensor, torch.Tensor]:
            path = torch._inductor.aoti_compile_and_package(program, package_path=tempfile.mktemp(suffix=".pt2"))
            return torch._inductor.aoti_load_package(path)(*inputs)

        attempt("AOTInductor package", run_aoti)
    return results


def print_report(results: dict[str, Any]) -> int:
    """One line per check -> 0 when every check passed, 1 when one failed, 2 when none failed but some were cut by
    the time budget (not run: a result file written before session 10 marks those ok false, read the same)."""
    checks = [r for r in results.get("correctness", []) if "not_applicable" not in r]
    for r in checks:
        figures = f"{r['rel_err']:.2e} (bound {r['bound']})" if "rel_err" in r else r.get("skipped") or r.get("error")
        if "mismatches" in r:
            figures = f"{r['mismatches']} of {r['cases']} wrong"
        variant = "gpu-variant" if r.get("gpu_variant") else ""
        mark = "CUT" if "skipped" in r else "ok " if r["ok"] else "BAD"
        print(f"{mark} {r['check']:<40} {r['dtype']:<9} {variant:<11} {figures}")
    for r in results.get("capture", []):
        print(f"capture {r['check']:<34} " + (f"rel_err {r['rel_err']:.2e}" if "rel_err" in r else r["error"]))
    cut = sum("skipped" in r for r in checks)
    failed = sum(not r["ok"] for r in checks if "skipped" not in r)
    where = f"{len(checks)} checks, {results.get('device', '')}"
    if failed or not checks:
        print("CORRECTNESS FAILED", f"({failed} failed, {cut} cut by the time budget; {where})")
        return 1
    if cut:
        print("CORRECTNESS INCOMPLETE", f"({len(checks) - cut} passed, {cut} not run: the time budget; {where})")
        return 2
    print("CORRECTNESS PASSED", f"({where})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="writes kernels-<gpu>-check.json there")
    parser.add_argument("--aoti", action="store_true")
    parser.add_argument("--skip-capture", action="store_true")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting checks after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, small cases")
    parser.add_argument("--print", type=Path, dest="show", help="only print the report of a result file")
    parser.add_argument("--kernel", choices=("triton", "hopper"), default="triton", help="which attention kernel")
    opts = parser.parse_args()
    if opts.show:
        return print_report(json.loads(opts.show.read_text()))
    deadline = time.monotonic() + opts.budget_s
    tag = "" if opts.kernel == "triton" else f"-{opts.kernel}"
    out = opts.out_dir / f"kernels-{bench.gpu_tag()}{tag}-check.json"
    results: dict[str, Any] = {"kernel": opts.kernel, "correctness": correctness(deadline, opts.kernel)}
    write_result(out, results)  # keep what we have if capture hangs
    skip_capture = opts.skip_capture or INTERPRET or opts.kernel != "triton"
    results["capture"] = [] if skip_capture else capture(opts.aoti)
    path = write_result(out, results)
    status = print_report(json.loads(path.read_text()))
    print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
