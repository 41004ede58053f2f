"""Does each fusion of kernels/fused_*.py pay? One HSTU layer's pieces at a spec's throughput shape
(64 users x 1,515 tokens), timed alone on the GPU against what Inductor makes of the unfused math:

  uvqk:  GroupLN -> GEMM -> SiLU (and the split, free: views) as torch.compile fuses it (Inductor's
         norm kernel + cuBLAS + pointwise), vs the fused GEMM with the norm as prologue, vs the norm
         compiled apart + the fused GEMM with the SiLU epilogue only (which of the two fusions pays),
         vs cuBLAS alone on normalised x (the GEMM floor) and the Triton GEMM alone (its efficiency).
  out:   x + Linear(LN(a) * u) compiled vs the fused GEMM (norm-gate prologue, residual epilogue).
  heads: final group norm + heads on every row, masked, compiled vs the candidate-only kernel.
  tma:   on an sm90 GPU, the same GEMMs through kernels/tma_linear.py (persistent, TMA tiles; fused_linear's
         gemm "tma"), each listed config, against cuBLAS + Inductor's SiLU pass: the pass it is meant to remove.

Each row: median ms (triton.testing.do_bench), TFLOP/s of the GEMM it holds, max relative
error against the compiled unfused form (both bf16). Results through bench/_common.write_result.
    python bench/fused_gemm.py --spec mtgr-small --out FILE     (GPU)
    TRITON_INTERPRET=1 python bench/fused_gemm.py --dry-run      (CPU: hstu-tiny, tiny shapes, no timing claims)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import RESULTS, write_result  # noqa: E402

from grc.aoti.inputs import random_inputs, seeded_dense  # noqa: E402
from grc.aoti.model import jagged_positions  # noqa: E402
from grc.model.gr import token_groups  # noqa: E402
from grc.spec.loader import load_spec  # noqa: E402
from kernels import tma_linear  # noqa: E402
from kernels.fused_heads import candidate_heads_triton  # noqa: E402
from kernels.fused_linear import (  # noqa: E402
    GROUP_NORM,
    NO_NORM,
    NORM_GATE,
    RESIDUAL,
    SILU,
    _fused_linear_kernel,
    fused_linear_triton,
)
from kernels.norm_gate import norm_gate_triton  # noqa: E402

T0 = time.perf_counter()


def clock(fn: Callable[[], Any], dry: bool) -> float:
    if dry:
        fn()
        return float("nan")
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def pieces(spec: str, users: int, history: int, candidates: int, device: str) -> dict[str, Any]:
    """Layer 0's weights (seeded init, perturbed norms so the affine terms matter) and its inputs."""
    cfg = load_spec(BENCH.parent / "specs" / f"{spec}.yaml").spec.model
    dense = seeded_dense(cfg).to(device, torch.bfloat16)
    with torch.no_grad():
        for layer in dense.hstu_layers:
            for norm in (layer.norm_in, layer.norm_attn):
                norm.weight.add_(torch.randn_like(norm.weight) * 0.1)
                norm.bias.add_(torch.randn_like(norm.bias) * 0.1)
    inp = random_inputs(cfg, users, history, candidates, torch.Generator().manual_seed(0), ragged=False)
    inp = inp.to(device, torch.bfloat16)
    idx, n_ctx = jagged_positions(inp.offsets, inp.num_candidates, inp.tokens.shape[0])
    return {"cfg": cfg, "dense": dense, "x": inp.tokens, "group": token_groups(cfg, idx, n_ctx), "cand": idx >= n_ctx}


def measure(
    spec: str, users: int, history: int, candidates: int, device: str, dry: bool, save: Callable[[dict], object]
) -> dict[str, Any]:
    """The rows, saved (``save``) after each: a run cut short keeps what it measured."""
    p = pieces(spec, users, history, candidates, device)
    cfg, dense, x, group, cand = p["cfg"], p["dense"], p["x"], p["group"], p["cand"]
    layer = next(iter(dense.hstu_layers))
    n_in, w, b = layer.norm_in, layer.uvqk.weight, layer.uvqk.bias
    tokens, d = x.shape
    lv = cfg.hstu.linear_dim
    compile_ = (lambda f: f) if dry else torch.compile
    rows: dict[str, dict[str, float]] = {}
    result: dict[str, Any] = {
        "shape": {"users": users, "tokens": tokens, "d_model": d, "uvqk_n": int(layer.uvqk.weight.shape[0]),
                  "linear_dim": lv, "candidates": int(cand.sum())},
        "rows": rows,
    }  # fmt: skip

    def row(name: str, fn: Callable[[], torch.Tensor], flops: float, ref: torch.Tensor | None) -> None:
        out = fn()
        ms = clock(fn, dry)
        rows[name] = {"ms": round(ms, 4), "tflops": round(flops / (ms * 1e9), 1) if ms == ms else float("nan")}
        if ref is not None:
            rows[name]["rel_err_vs_unfused"] = rel(out, ref)
        print(f"  {name:<50} {ms:8.4f} ms  (t={time.perf_counter() - T0:.0f}s)", flush=True)
        tuned = getattr(_fused_linear_kernel, "cache", {})  # the autotuner's pick per (N, K, prologue, ...)
        result["fused_linear_configs"] = {str(key): str(config) for key, config in tuned.items()}
        save(result)

    with torch.no_grad():
        group_ln = compile_(lambda: n_in(x, group))
        uvqk_unfused = compile_(lambda: F.silu(F.linear(n_in(x, group), w, b)))
        ref = uvqk_unfused()
        xh = group_ln()
        gemm = 2 * tokens * d * w.shape[0]
        row("uvqk unfused (torch.compile)", uvqk_unfused, gemm, None)
        row("uvqk norm compiled + SiLU-epilogue GEMM",
            lambda: fused_linear_triton(group_ln(), w, b, NO_NORM, SILU), gemm, ref)  # fmt: skip
        row("uvqk fused: norm prologue + SiLU epilogue",
            lambda: fused_linear_triton(x, w, b, GROUP_NORM, SILU, gamma=n_in.weight, beta=n_in.bias, eps=n_in.eps,
                                        group=group), gemm, ref)  # fmt: skip
        a = torch.randn(tokens, lv, device=device, dtype=torch.bfloat16)
        u = torch.randn(tokens, lv, device=device, dtype=torch.bfloat16)
        n_at, wo, bo = layer.norm_attn, layer.out.weight, layer.out.bias
        out_unfused = compile_(
            lambda: x + F.linear(F.layer_norm(a, (lv,), n_at.weight, n_at.bias, n_at.eps) * u, wo, bo)
        )
        ref = out_unfused()
        gemm = 2 * tokens * lv * d
        row("out unfused (torch.compile)", out_unfused, gemm, None)
        row("out fused: norm-gate prologue + residual epilogue",
            lambda: fused_linear_triton(a, wo, bo, NORM_GATE, RESIDUAL, gamma=n_at.weight, beta=n_at.bias,
                                        eps=n_at.eps, u=u, residual=x), gemm, ref)  # fmt: skip
        row("out norm-gate kernel + residual-epilogue GEMM", lambda: fused_linear_triton(
            norm_gate_triton(a, u, n_at.weight, n_at.bias, n_at.eps), wo, bo, NO_NORM, RESIDUAL, residual=x),
            gemm, ref)  # fmt: skip
        fn, h = dense.final_norm, dense.heads
        heads_all = compile_(lambda: h(fn(x, group)) * cand.unsqueeze(-1).to(x.dtype))
        ref = heads_all()
        gemm = 2 * tokens * d * h.w1.shape[0] * h.w1.shape[2]
        row("heads every row, masked (torch.compile)", heads_all, gemm, None)
        cand_share = float(cand.float().mean())
        row("heads candidate rows only (fused kernel)", lambda: candidate_heads_triton(
            x, group, cand, fn.weight, fn.bias, h.w1, h.b1, h.w2, h.b2, fn.eps), gemm * cand_share, ref)  # fmt: skip
    with torch.no_grad():  # last: what the GEMMs alone reach (the cuBLAS floor, the Triton GEMM's efficiency)
        gemm = 2 * tokens * d * w.shape[0]
        ref = uvqk_unfused()
        row("uvqk GEMM alone: cuBLAS", lambda: F.linear(xh, w, b), gemm, None)
        row("uvqk GEMM alone: Triton (+SiLU)", lambda: fused_linear_triton(xh, w, b, NO_NORM, SILU), gemm, ref)
        reason = tma_linear.why_not(xh, w)
        configs = {name: dataclasses.asdict(c) for name, c in tma_linear.CONFIGS.items()}
        result["tma"] = {"runs": not reason, "why_not": reason, "configs": configs}
        if not reason:
            silu_pass = compile_(lambda: F.silu(F.linear(xh, w, b)))
            row("uvqk GEMM + SiLU: cuBLAS + Inductor's pass", silu_pass, gemm, ref)
            for name, config in tma_linear.CONFIGS.items():
                row(f"uvqk GEMM alone: TMA {name} (+SiLU)", functools.partial(
                    fused_linear_triton, xh, w, b, NO_NORM, SILU, gemm="tma", config=config), gemm, ref)  # fmt: skip
            row(f"uvqk norm compiled + TMA {tma_linear.DEFAULT} SiLU-epilogue GEMM",
                lambda: fused_linear_triton(group_ln(), w, b, NO_NORM, SILU, gemm="tma"), gemm, ref)  # fmt: skip
            ref = out_unfused()
            gemm = 2 * tokens * lv * d
            row(f"out norm-gate kernel + TMA {tma_linear.DEFAULT} residual-epilogue GEMM", lambda: fused_linear_triton(
                norm_gate_triton(a, u, n_at.weight, n_at.bias, n_at.eps), wo, bo, NO_NORM, RESIDUAL, residual=x,
                gemm="tma"), gemm, ref)  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="mtgr-small")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/fused-gemm-<gpu|dry>.json)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, hstu-tiny, tiny shapes")
    args = ap.parse_args()
    dry = args.dry_run
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: --dry-run (with TRITON_INTERPRET=1) runs the same code on the CPU")
    spec = "hstu-tiny" if dry else args.spec
    shape = (3, 20, 8) if dry else (64, 1000, 512)  # e2e.py's throughput workload
    out = args.out or RESULTS / f"fused-gemm-{'dry' if dry else 'gpu'}.json"
    data: dict[str, Any] = {"spec": spec, "device": torch.cuda.get_device_name() if not dry else "cpu (interpreter)"}
    print(f"fused_gemm: {spec} {shape}", flush=True)
    measure(spec, *shape, "cpu" if dry else "cuda", dry, lambda part: write_result(out, {**data, **part}))
    print(f"fused_gemm: wrote {out}")


if __name__ == "__main__":
    main()
