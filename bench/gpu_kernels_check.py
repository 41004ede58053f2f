"""GPU correctness of the kernels at real sizes, and capture of the ops (run on the lent H100).

Every case: fresh random inputs, output poisoned with NaN, ||out - ref|| / ||ref|| against the
float64 reference. Then the ops through torch.ops.grc, torch.compile (inductor, fullgraph) and
torch.export + AOTInductor. Prints one line per check and writes JSON to --out.

    python bench/gpu_kernels_check.py --out check.json [--aoti]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import reference  # noqa: E402
from kernels.hstu_attention import hstu_attention_triton  # noqa: E402
from kernels.norm_gate import norm_gate_triton  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def to64(args: tuple) -> tuple:
    return tuple(x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in args)


def attention_case(
    name: str,
    dtype: torch.dtype,
    lengths: list[int],
    ncands: list[int],
    causal: bool,
    d: int = 128,
    heads: int = 4,
    **kw: Any,
) -> dict[str, Any]:
    args = list(
        bench.make_case(lengths, ncands, heads, d, dtype, seed=random.getrandbits(31), ts_gap=kw.pop("ts_gap", 20_000))
    )
    args[-1] = causal
    out = torch.full(args[2].shape, float("nan"), dtype=dtype, device="cuda")
    out = hstu_attention_triton(*args, out=out, **kw)
    err = bench.rel_err(out, reference.hstu_attention(*to64(tuple(args))))
    return {"check": name, "dtype": str(dtype), "rel_err": err, "bound": BOUNDS[dtype], "ok": err <= BOUNDS[dtype]}


FIXED = (128, 64, 8, 2)  # (BLOCK_M, BLOCK_N, warps, stages): no autotuning per variant, or compiling dominates


def correctness() -> list[dict[str, Any]]:
    rng = random.Random()
    lengths = [1, 2048, 0, *[rng.randint(1, 2048) for _ in range(5)]]
    ncands = [1, 0, 0, *[rng.choice([0, 1, rng.randint(0, n)]) for n in lengths[3:]]]
    results = []

    def case(name: str, dtype: torch.dtype, causal: bool = True, **kw: Any) -> None:
        results.append(
            attention_case(
                name, dtype, kw.pop("lengths", lengths), kw.pop("ncands", ncands), causal, config=FIXED, **kw
            )
        )

    case("jagged causal", torch.bfloat16)
    case("jagged full", torch.bfloat16, causal=False)
    case("exact SiLU path", torch.bfloat16, fast_silu=False)
    case("d=64, heads=2", torch.bfloat16, d=64, heads=2)
    # Gaps up to 2**28 s: spans past 2**29, so the int64 time-delta path runs.
    case("huge timestamp spans", torch.bfloat16, ts_gap=1 << 28, lengths=lengths[:4], ncands=ncands[:4])
    case("int64 path forced", torch.bfloat16, allow_ts_fast=False)
    case("jagged causal", torch.float16)
    case("jagged full", torch.float16, causal=False)
    case("jagged causal", torch.float32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in ((4096, 1024), (77, 300)):
            a = (torch.randn(*shape, device="cuda") * 2 + 0.5).to(dtype)
            u = torch.randn(*shape, device="cuda").to(dtype)
            w, b = torch.randn(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
            y = norm_gate_triton(a, u, w, b, 1e-5, out=torch.full(shape, float("nan"), dtype=dtype, device="cuda"))
            err = bench.rel_err(y, reference.norm_gate(a.double(), u.double(), w.double(), b.double(), 1e-5))
            results.append(
                {
                    "check": f"norm_gate {shape}",
                    "dtype": str(dtype),
                    "rel_err": err,
                    "bound": BOUNDS[dtype],
                    "ok": err <= BOUNDS[dtype],
                }
            )
    return results


class Block(torch.nn.Module):
    def forward(self, q, k, v, offsets, ts, nc, pos_w, ts_w, u, w, b):  # type: ignore[no-untyped-def]
        o = torch.ops.grc.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.088, 1024.0, True)
        return torch.ops.grc.norm_gate(o.reshape(o.shape[0], -1), u, w, b, 1e-5)


def capture(aoti: bool) -> list[dict[str, Any]]:
    lengths, ncands = [300, 1024, 5, 700], [10, 0, 5, 1]
    q, k, v, offsets, ts, nc, pos_w, ts_w, *_ = bench.make_case(lengths, ncands, 2, 64, torch.bfloat16, seed=11)
    total = q.shape[0]
    u = torch.randn(total, 128, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")
    inputs = (q, k, v, offsets, ts, nc, pos_w, ts_w, u, w, b)
    eager = Block()(*inputs)
    want = reference.norm_gate(
        reference.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.088, 1024.0, True).reshape(total, -1),
        u,
        w,
        b,
        1e-5,
    )
    results = [{"check": "op eager vs reference", "rel_err": bench.rel_err(eager, want)}]

    def attempt(name: str, fn: Callable[[], torch.Tensor]) -> None:
        start = time.time()
        try:
            results.append({"check": name, "rel_err": bench.rel_err(fn(), eager), "s": time.time() - start})
        except Exception:  # report, don't stop: the table still matters
            results.append({"check": name, "error": traceback.format_exc()[-1500:]})

    attempt("torch.compile inductor fullgraph", lambda: torch.compile(Block(), fullgraph=True)(*inputs))
    program = torch.export.export(Block(), inputs)
    attempt("torch.export module", lambda: program.module()(*inputs))
    if aoti:

        def run_aoti() -> torch.Tensor:
            path = torch._inductor.aoti_compile_and_package(program, package_path=tempfile.mktemp(suffix=".pt2"))
            return torch._inductor.aoti_load_package(path)(*inputs)

        attempt("AOTInductor package", run_aoti)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--aoti", action="store_true")
    parser.add_argument("--skip-capture", action="store_true")
    opts = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "correctness": correctness()}
    opts.out.write_text(json.dumps(results, indent=2))  # keep what we have if capture hangs
    results["capture"] = [] if opts.skip_capture else capture(opts.aoti)
    opts.out.write_text(json.dumps(results, indent=2))
    for r in results["correctness"]:
        print(
            f"{'ok ' if r['ok'] else 'BAD'} {r['check']:<28} {r['dtype']:<15} {r['rel_err']:.2e} (bound {r['bound']})"
        )
    for r in results["capture"]:
        print(f"capture {r['check']:<34} " + (f"rel_err {r['rel_err']:.2e}" if "rel_err" in r else r["error"]))
    bad = [r for r in results["correctness"] if not r["ok"]]
    print("CORRECTNESS", "FAILED" if bad else "PASSED")


if __name__ == "__main__":
    main()
