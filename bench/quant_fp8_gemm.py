"""bench/quant_fp8.py's GEMM part: each fp8-capable GEMM of the model alone, at the workload's token
count, bf16 vs fp8, and the uvqk GEMM's fp8 time taken apart (what each piece costs), on fresh
random non-zero activations, CUDA-graphed, CUDA events:

  bf16              nn.Linear in bfloat16 (cuBLAS)
  fp8               grc.model.fp8.Fp8Linear: the activation quantization, then _scaled_mm (row-wise
                    scales, fast accumulation, bias in the epilogue): what the model runs
  quantize          the activation quantization alone (x * 1/scale, clamp, e4m3 cast)
  rowwise_fast      _scaled_mm alone on quantized operands, row-wise scales, use_fast_accum=True
  rowwise_slow      the same, use_fast_accum=False (session 6's path: the slow CUTLASS row-wise kernel)
  tensorwise_fast   the same with per-tensor scales (cuBLASLt): the fastest kernel, but per-tensor
                    weight scales fail the ranking gates (grc.model.fp8.PACKAGE_GEMMS)
Per model: the bf16 GEMMs' share of the eager bf16 model's time, and the model's speed-up if every
such GEMM ran at its fp8 time with nothing else changed (the most fp8 GEMMs can give: Amdahl).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from grc.model.fp8 import Fp8Linear, quantize_input

Timer = Callable[[Callable[..., Any], tuple[torch.Tensor, ...]], dict[str, Any]]


def guarded(timer: Timer) -> Timer:
    """A measurement that fails (a kernel this build lacks) is recorded as its error; the others go on."""

    def run(fn: Callable[..., Any], args: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        try:
            return timer(fn, args)
        except Exception as exc:  # recorded in the result, never dropped
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}

    return run


def gemm_linears(dense: Any, fp8_all: Any) -> dict[str, tuple[nn.Linear, Fp8Linear, int]]:
    """kind -> (first bf16 Linear, its fp8 twin, how many the model runs per forward)."""
    layers = len(dense.layers)
    heads = dense.heads
    tasks, d_model, hidden = heads.w1.shape
    head_linear = nn.Linear(d_model, tasks * hidden)
    with torch.no_grad():
        head_linear.weight.copy_(heads.w1.detach().permute(0, 2, 1).reshape(tasks * hidden, d_model))
        head_linear.bias.copy_(heads.b1.detach().reshape(-1))
    fp8 = {m.name: m for m in fp8_all.modules() if isinstance(m, Fp8Linear)}
    return {
        "uvqk": (dense.layers[0].uvqk, fp8["layers.0.uvqk"], layers),
        "out": (dense.layers[0].out, fp8["layers.0.out"], layers),
        "heads": (head_linear, fp8["heads.w1"], 1),
    }


def gemm_bench(
    linears: dict[str, tuple[nn.Linear, Fp8Linear, int]], tokens: int, device: torch.device, timer: Timer
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    timer = guarded(timer)
    gen = torch.Generator(device=device).manual_seed(11)
    for kind, (linear, fp8_linear, count) in linears.items():
        lin = copy.deepcopy(linear).to(device, torch.bfloat16).requires_grad_(False)
        q = copy.deepcopy(fp8_linear).to(device, torch.bfloat16)
        x = torch.randn(tokens, lin.in_features, device=device, dtype=torch.bfloat16, generator=gen)
        flops = 2 * tokens * lin.in_features * lin.out_features
        rec: dict[str, Any] = {"shape": [tokens, lin.in_features, lin.out_features], "per_forward": count}
        rec["bf16"] = timer(lin, (x,))
        rec["fp8"] = timer(q, (x,))
        if kind == "uvqk":
            rec.update(_taken_apart(q, x, timer))
        for s in rec.values():
            if isinstance(s, dict) and "p50_ms" in s:
                s["tflops"] = round(flops / (s["p50_ms"] / 1e3) / 1e12, 1)
        if "p50_ms" in rec["bf16"] and "p50_ms" in rec["fp8"]:
            rec["speedup_fp8"] = round(rec["bf16"]["p50_ms"] / rec["fp8"]["p50_ms"], 3)
        out[kind] = rec
    return out


def _taken_apart(q: Fp8Linear, x: torch.Tensor, timer: Timer) -> dict[str, Any]:
    xq = quantize_input(x, q.input_inv_scale)
    w = q.weight_fp8.t()
    row_a = q.input_scale.view(1, 1).expand(x.shape[0], 1).contiguous()
    one = torch.ones((), device=x.device)
    bias = q.bias.to(torch.bfloat16) if q.bias is not None else None

    def scaled(scale_a: torch.Tensor, scale_b: torch.Tensor, fast: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda a: torch._scaled_mm(
            a, w, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=fast
        )

    return {
        "quantize": timer(lambda a: quantize_input(a, q.input_inv_scale), (x,)),
        "rowwise_fast": timer(scaled(row_a, q.weight_scale, True), (xq,)),
        "rowwise_slow": timer(scaled(row_a, q.weight_scale, False), (xq,)),
        "tensorwise_fast": timer(scaled(one, one, True), (xq,)),
    }


def amdahl(gemms: dict[str, Any], eager_bf16_ms: float) -> dict[str, Any]:
    """The bf16 GEMMs' share of the eager bf16 model and the speed-up if each ran at its fp8 time."""
    if not all("speedup_fp8" in g for g in gemms.values()):
        return {"skipped": "a GEMM's bf16 or fp8 timing failed (its error is in its record)"}
    bf16 = sum(g["bf16"]["p50_ms"] * g["per_forward"] for g in gemms.values())
    fp8 = sum(g["fp8"]["p50_ms"] * g["per_forward"] for g in gemms.values())
    return {
        "gemm_ms_bf16": round(bf16, 4),
        "gemm_ms_fp8": round(fp8, 4),
        "gemm_share_of_eager_bf16": round(bf16 / eager_bf16_ms, 3),
        "eager_speedup_bound_all_fp8": round(eager_bf16_ms / (eager_bf16_ms - bf16 + fp8), 3),
    }
