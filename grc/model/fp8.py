"""FP8 (e4m3) dense GEMMs: the HSTU projections (uvqk), outputs and the task heads' first GEMM.

Each GEMM becomes ``torch._scaled_mm`` over e4m3 operands:
  weights      per output channel: scale_w[n] = amax(|W[n, :]|) / 448, W stored as e4m3(W / scale_w)
  activations  per tensor, calibrated: scale_x = amax(|x|) over sample inputs / 448, x quantized at
               run time as e4m3(clamp(x / scale_x, ±448)) (saturating: a larger x than the samples
               showed clips instead of becoming NaN)
  y = (x_q @ W_q^T) * scale_x * scale_w + b, accumulated in fp32, written in bfloat16.
The scales are buffers of the module, so an exported / AOTInductor package carries them.
Attention, norms, the gate and the heads' per-task reduction stay in the model's dtype.

``emulate=True`` computes the same math without fp8 GEMM kernels: both operands go through the
e4m3 round trip and are multiplied in float32 (what tests compare against float64 on CPU, and how
to check the GEMM itself: ``_scaled_mm`` on CPU agrees with the emulation).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from grc.model.gr import GRDense, TaskHeads

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TINY = 1e-12  # an all-zero row or activation gets scale TINY / 448, not a division by zero
ALIGN = 16  # _scaled_mm: both dimensions of the weight must be multiples of 16


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> e4m3(x / scale) -> back to x's dtype, times scale (saturating at ±448)."""
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.to(x.dtype) * scale


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel (row of an [out, in] weight): amax / 448, float32 [out]."""
    return (weight.detach().abs().amax(dim=1).float().clamp_min(TINY) / E4M3_MAX).contiguous()


class Fp8Linear(nn.Module):
    """``nn.Linear`` with e4m3 weights (per-channel scales) and e4m3 inputs (a calibrated per-tensor scale)."""

    # The fp8 weight and the float32 scales are kept as integer bit patterns (uint8 / int32 views):
    # ``module.to(dtype)`` (how a package is cast to bfloat16) casts every floating buffer, fp8 and
    # float32 scales included, and _scaled_mm needs them exactly as calibrated.
    weight_bits: torch.Tensor
    weight_scale_bits: torch.Tensor
    input_scale_bits: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_amax: float, name: str = "linear"):
        super().__init__()
        out_features, in_features = weight.shape
        if out_features % ALIGN or in_features % ALIGN:
            raise ValueError(
                f"fp8: {name} is [{out_features}, {in_features}]; torch._scaled_mm needs both dimensions to be "
                f"multiples of {ALIGN} (change the model's widths or leave engine.aoti.precision unset)"
            )
        if not input_amax > 0 or not torch.isfinite(torch.tensor(input_amax)):
            raise ValueError(f"fp8: {name}: calibrated input amax must be finite and > 0 (got {input_amax})")
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        w = weight.detach().float()
        scale = weight_scales(w)
        w_q = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()
        self.register_buffer("weight_bits", w_q.view(torch.uint8))
        self.register_buffer("weight_scale_bits", scale.view(1, -1).contiguous().view(torch.int32))  # [1, out]
        x_scale = torch.tensor([float(input_amax) / E4M3_MAX], dtype=torch.float32)
        self.register_buffer("input_scale_bits", x_scale.view(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # model's dtype
        self.emulate = False

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(E4M3)

    @property
    def weight_scale(self) -> torch.Tensor:
        """[1, out] float32: _scaled_mm's row-wise scale of the second operand."""
        return self.weight_scale_bits.view(torch.float32)

    @property
    def input_scale(self) -> torch.Tensor:
        """[1] float32."""
        return self.input_scale_bits.view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.emulate:
            xq = fp8_round_trip(x2.float(), self.input_scale)
            w = self.weight_fp8.float() * self.weight_scale.view(-1, 1)
            y = xq @ w.t()
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*lead, self.out_features)
        xq = (x2.float() / self.input_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        # row-wise scaling (the per-channel weight scale): scale_a [M, 1], scale_b [1, N], bf16 out
        scale_a = self.input_scale.view(1, 1).expand(x2.shape[0], 1).contiguous()
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        y = torch._scaled_mm(
            xq, self.weight_fp8.t(), scale_a=scale_a, scale_b=self.weight_scale, bias=bias, out_dtype=torch.bfloat16
        )
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.in_features} -> {self.out_features}, input_scale={float(self.input_scale):.4g}"


class Fp8Heads(nn.Module):
    """``TaskHeads`` with its first GEMM (all tasks at once: [d_model] -> [tasks x hidden]) in fp8."""

    def __init__(self, heads: TaskHeads, input_amax: float):
        super().__init__()
        tasks, d_model, hidden = heads.w1.shape
        self.tasks, self.hidden = tasks, hidden
        # einsum("...d,tdh->...th") == x @ W with W [d, tasks * hidden]; Linear stores it [out, in]
        weight = heads.w1.detach().permute(0, 2, 1).reshape(tasks * hidden, d_model)
        self.first = Fp8Linear(weight, heads.b1.detach().reshape(-1), input_amax, name="heads.w1")
        self.w2 = nn.Parameter(heads.w2.detach().clone(), requires_grad=False)
        self.b2 = nn.Parameter(heads.b2.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.first(x).reshape(*x.shape[:-1], self.tasks, self.hidden))
        return torch.sigmoid((hidden * self.w2).sum(-1) + self.b2)


def gemm_inputs(dense: GRDense) -> dict[str, nn.Module]:
    """The modules whose GEMMs go fp8, by name (their inputs are what calibration measures)."""
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(dense.hstu_layers):
        out[f"layers.{i}.uvqk"] = layer.uvqk
        out[f"layers.{i}.out"] = layer.out
    out["heads"] = dense.heads
    return out


@contextmanager
def _recording(modules: dict[str, nn.Module], amax: dict[str, float]) -> Iterator[None]:
    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen = float(args[0].detach().abs().max()) if args[0].numel() else 0.0
            amax[name] = max(amax.get(name, 0.0), seen)

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate(dense: GRDense, batches: list[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """amax of each fp8 GEMM's input over ``batches`` (forward_jagged arguments), in float32."""
    model = copy.deepcopy(dense).float().eval()
    amax: dict[str, float] = {}
    with _recording(gemm_inputs(model), amax), torch.no_grad():
        for tokens, offsets, num_candidates, timestamps in batches:
            model.forward_jagged(tokens.float(), offsets, num_candidates, timestamps)
    return amax


def to_fp8(dense: GRDense, amax: dict[str, float], emulate: bool = False) -> GRDense:
    """A copy of ``dense`` whose projection, output and head GEMMs are fp8 (scales from ``amax``)."""
    missing = sorted(set(gemm_inputs(dense)) - set(amax))
    if missing:
        raise ValueError(f"fp8: no calibrated input range for {missing}: calibration did not reach them")
    model = copy.deepcopy(dense).float()
    for i, layer in enumerate(model.hstu_layers):
        for attr in ("uvqk", "out"):
            lin = cast(nn.Linear, getattr(layer, attr))
            name = f"layers.{i}.{attr}"
            setattr(layer, attr, Fp8Linear(lin.weight, lin.bias, amax[name], name=name))
    model.heads = cast(TaskHeads, Fp8Heads(model.heads, amax["heads"]))
    set_emulate(model, emulate)
    return model


def set_emulate(model: nn.Module, emulate: bool) -> None:
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.emulate = emulate


def fp8_linears(model: nn.Module) -> dict[str, Fp8Linear]:
    return {m.name: m for m in model.modules() if isinstance(m, Fp8Linear)}


def scales_of(model: nn.Module) -> dict[str, dict[str, object]]:
    """What the package metadata records per fp8 GEMM: its input scale and weight-scale range."""
    return {
        name: {
            "input_scale": float(m.input_scale),
            "weight_scale_min": float(m.weight_scale.min()),
            "weight_scale_max": float(m.weight_scale.max()),
            "shape": [m.out_features, m.in_features],
        }
        for name, m in fp8_linears(model).items()
    }
