"""What bench/e2e.py measures with: FLOP and byte floors, a per-call clock, percentiles, the error
against the float64 oracle, the device's ceilings, and a per-op profile of one call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from grc.aoti.inputs import JaggedInputs
from grc.spec.schema import ModelConfig


def workload_floors(cfg: ModelConfig, inp: JaggedInputs, act_bytes: int = 2) -> dict[str, float]:
    """Matmul FLOPs (projections, heads, attention over unmasked pairs: 2*dqk + 2*dv per pair and
    head) and bytes: 'strict' = weights + inputs + outputs once; 'layer_io' = also each layer's
    unavoidable activation traffic when layers are separate kernels (x, uvqk, attention out)."""
    h = cfg.hstu
    d, lv, a, heads = cfg.d_model, h.linear_dim, h.attention_dim, h.num_heads
    tasks, hidden = len(cfg.tasks), cfg.head_hidden
    lengths = (inp.offsets[1:] - inp.offsets[:-1]).tolist()
    ncand = inp.num_candidates.tolist()
    tokens = sum(lengths)
    pairs = 0
    for n, c in zip(lengths, ncand, strict=True):
        ctx = n - c
        hist_pairs = ctx * (ctx + 1) // 2 if h.history_mask == "causal" else ctx * ctx
        pairs += hist_pairs + c * (ctx + 1)
    proj = tokens * (2 * d * (2 * lv + 2 * a) + 2 * lv * d) * h.num_layers
    head = tokens * (2 * d * hidden * tasks + 2 * hidden * tasks)
    attn = pairs * heads * (2 * h.head_qk + 2 * h.head_v) * h.num_layers
    weights = dense_parameters(cfg) * act_bytes
    io = tokens * (d * act_bytes + 8) + tokens * tasks * act_bytes + (2 * len(lengths) + 1) * 8
    layer_io = h.num_layers * tokens * act_bytes * (2 * d + 2 * (2 * lv + 2 * a) + 2 * lv)
    return {
        "tokens": tokens,
        "attention_pairs_per_head_layer": pairs,
        "flops_projections": proj,
        "flops_heads": head,
        "flops_attention": attn,
        "flops": proj + head + attn,
        "bytes_strict": weights + io,
        "bytes_layer_io": weights + io + layer_io,
    }


def floor_times(floors: dict[str, float], ceilings: dict[str, float]) -> dict[str, float]:
    """The floors in milliseconds at the measured matmul rate and copy bandwidth."""
    flops_per_ms = ceilings["bf16_matmul_tflops"] * 1e9
    bytes_per_ms = ceilings["copy_tbps"] * 1e9
    return {
        "flop_floor_ms": floors["flops"] / flops_per_ms,
        "byte_floor_ms": floors["bytes_strict"] / bytes_per_ms,
        "layer_io_floor_ms": floors["bytes_layer_io"] / bytes_per_ms,
    }


def dense_parameters(cfg: ModelConfig) -> int:
    from grc.model.gr import GRDense

    with torch.device("meta"):
        return sum(p.numel() for p in GRDense(cfg).parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(
    fn: Callable[[], Any], device: torch.device, budget_s: float, min_iters: int = 10, max_iters: int = 400
) -> list[float]:
    """Milliseconds per call: a CUDA-event pair around each call on a GPU (the call's whole device
    latency), perf_counter on a CPU; at least ``min_iters`` calls, then until ``budget_s`` is spent."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - started < budget_s):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def stats(times: list[float], users: int) -> dict[str, float]:
    ordered = sorted(times)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    p50 = pct(0.5)
    return {
        "p50_ms": round(p50, 4),
        "p99_ms": round(pct(0.99), 4),
        "min_ms": round(ordered[0], 4),
        "samples": len(times),
        "users_per_s": round(users / (p50 / 1e3), 1),
    }


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 on the CPU."""
    a, b = actual.detach().double().cpu(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).abs().max() / b.abs().max())


def ceilings() -> dict[str, float]:
    """Measured bf16 matmul rate and device-to-device copy bandwidth (the floors' denominators)."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    cp = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    out = {"bf16_matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_tbps": 2 * x.numel() * 2 / (cp * 1e-3) / 1e12}
    return {k: round(v, 1 if "tflops" in k else 3) for k, v in out.items()}


def op_profile(fn: Callable[[], Any], device: torch.device, top: int = 25) -> dict[str, Any]:
    """One call under torch.profiler: the ``top`` ops by self time on the device (CUDA time on a
    GPU, CPU time elsewhere), each with its calls, milliseconds and share of the call's total.
    Inside a CUDA graph replay the profiler sees the replay, not the kernels in it."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total_us = sum(getattr(e, key) for e in events)
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return {
        "sorted_by": key,
        "total_ms": round(total_us / 1e3, 4),
        "ops": [
            {
                "name": e.key,
                "calls": e.count,
                "ms": round(getattr(e, key) / 1e3, 4),
                "share": round(getattr(e, key) / total_us, 4) if total_us else 0.0,
            }
            for e in ranked
        ],
    }


def autotune_picks() -> dict[str, dict[str, str]]:
    """The config each autotuned grc kernel picked per autotune key in this process (the eager
    modes' picks: torch.compile and AOTInductor tune copies of their own)."""
    from kernels.fused_linear import _fused_linear_kernel
    from kernels.hstu_attention import _hstu_fwd_kernel

    return {
        tuner.fn.__name__: {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
        for tuner in (_hstu_fwd_kernel, _fused_linear_kernel)
    }
