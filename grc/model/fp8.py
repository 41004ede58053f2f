"""FP8 (e4m3) dense GEMMs: of the HSTU projections (uvqk), outputs and the task heads' first GEMM,
those named by ``gemms`` (the package: PACKAGE_GEMMS, the output GEMMs; see there for why).

Each such GEMM becomes ``torch._scaled_mm`` over e4m3 operands:
  weights      per output channel: scale_w[n] = amax(|W[n, :]|) / 448, W stored once as e4m3(W / scale_w),
               row-major [out, in], so its transpose is the column-major second operand _scaled_mm
               wants (a view: no copy per call)
  activations  per tensor, calibrated: scale_x = the power of two >= amax(|x|) over sample inputs / 448;
               x quantized at run time as e4m3(clamp(x * (1 / scale_x), ±448)) in x's own dtype
               (saturating: a larger x than the samples showed clips instead of becoming NaN)
  y = (x_q @ W_q^T) * scale_x * scale_w + b: row-wise scaled _scaled_mm with fast accumulation (the
  H100 fast path: without it the row-wise CUTLASS kernel promotes partial sums and runs about half
  as fast, pytorch/pytorch#147971), bias in the epilogue, written in bfloat16.
The scales are buffers of the module, so an exported / AOTInductor package carries them.
Attention, norms, the gate, the GEMMs not in ``gemms`` and the heads' per-task reduction stay in the
model's dtype.

``emulate=True`` computes the same math without fp8 GEMM kernels: the same e4m3 operands, dequantized
and multiplied in float32 (what tests compare against float64 on CPU, and how to check the GEMM
itself: ``_scaled_mm`` on CPU agrees with the emulation).
"""

from __future__ import annotations

import copy
import math
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


def input_scale_of(amax: float) -> float:
    """The activation scale for a calibrated amax: the smallest power of two >= amax / 448. A power of
    two makes ``x * (1 / scale)`` exact in bfloat16, so quantizing rounds once (to e4m3) and needs
    no float32 copy of x; e4m3 has the same relative precision across its normal range, so the up to
    2x of range it leaves unused costs nothing but the bottom of the subnormals."""
    return float(2.0 ** math.ceil(math.log2(amax / E4M3_MAX)))


def quantize_input(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / scale, ±448)) computed in x's own dtype (``inv_scale``: 0-dim, a power of two).
    Eager: three passes over x (scale, clamp, cast); Inductor fuses them into one. The clamp stays:
    an input beyond the calibrated range must saturate, and the e4m3 cast of an out-of-range value
    is not guaranteed to (NaN on some builds)."""
    return (x * inv_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


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
    input_inv_scale_bits: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_amax: float,
        name: str = "linear",
        fast_accum: bool = True,
    ):
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
        x_scale = input_scale_of(float(input_amax))
        self.register_buffer("input_scale_bits", torch.tensor([x_scale], dtype=torch.float32).view(torch.int32))
        inverse = torch.tensor(1.0 / x_scale, dtype=torch.float32)  # exact: a power of two
        self.register_buffer("input_inv_scale_bits", inverse.view(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # model's dtype
        self.emulate = False
        self.fast_accum = fast_accum

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(E4M3)

    @property
    def weight_scale(self) -> torch.Tensor:
        """[1, out] float32: _scaled_mm's row-wise scale of the second operand."""
        return self.weight_scale_bits.view(torch.float32)

    @property
    def input_scale(self) -> torch.Tensor:
        """[1] float32, a power of two."""
        return self.input_scale_bits.view(torch.float32)

    @property
    def input_inv_scale(self) -> torch.Tensor:
        """0-dim float32, 1 / input_scale: 0-dim, so ``x * it`` stays in x's dtype (bfloat16)."""
        return self.input_inv_scale_bits.view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq = quantize_input(x2, self.input_inv_scale)
        if self.emulate:
            w = self.weight_fp8.float() * self.weight_scale.view(-1, 1)
            y = (xq.float() * self.input_scale) @ w.t()
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*lead, self.out_features)
        # row-wise scaling (the per-channel weight scale): scale_a [M, 1] (contiguous: _scaled_mm refuses a
        # stride-0 expand), scale_b [1, N]; the weight's transpose is a view of the [out, in] row-major
        # buffer, i.e. the column-major second operand _scaled_mm needs: no copy per call
        scale_a = self.input_scale.view(1, 1).expand(x2.shape[0], 1).contiguous()
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)  # a no-op in a bfloat16 package
        y = torch._scaled_mm(
            xq,
            self.weight_fp8.t(),
            scale_a=scale_a,
            scale_b=self.weight_scale,
            bias=bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
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


KINDS = ("uvqk", "out", "heads")  # every GEMM fp8 can take: each layer's uvqk and out, the heads' first
# What the package quantizes. Measured on mtgr-small (bench/quant_fp8_emulate.py: verify.ranking's held-out
# users, e4m3 GEMMs emulated on the CPU, the rest in bfloat16; its every-GEMM figures match the H200's
# _scaled_mm run's, bench/results/quant-notes.md, session 6), top-10 overlap against the gate's 0.95:
#   every GEMM fp8 0.919-0.931 (fails) | uvqk + out, heads bf16 0.928-0.950 (fails) |
#   uvqk alone 0.934-0.966 (fails) | out alone 0.956-0.972 (passes every gate: tau 0.980, max |Δ| 0.022).
# On mtgr-base (five layers) no set passes: out alone 0.941-0.963, every GEMM 0.909-0.928; its fp8 package
# fails the gate and the build says so.
# Scratch runs of the same emulation: per-token activation scales 0.928-0.944 with the heads bf16 (no
# better: e4m3's 3 mantissa bits set the error, not the scale's granularity; rounding the weights alone
# costs as much as rounding both halves of it); per-tensor weight scales, all fp8: 0.888-0.922 (worse).
# So the package quantizes the output GEMMs only; ``gemms=KINDS`` is the every-GEMM model the bench
# times and gates beside it (the most fp8 can give).
PACKAGE_GEMMS = ("out",)


def gemm_inputs(dense: GRDense, kinds: tuple[str, ...] = KINDS) -> dict[str, nn.Module]:
    """The modules whose GEMMs go fp8 (of ``kinds``), by name (their inputs are what calibration measures)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"fp8: unknown GEMM kinds {unknown}; known: {list(KINDS)}")
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(dense.hstu_layers):
        for attr in ("uvqk", "out"):
            if attr in kinds:
                out[f"layers.{i}.{attr}"] = getattr(layer, attr)
    if "heads" in kinds:
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


def to_fp8(
    dense: GRDense, amax: dict[str, float], emulate: bool = False, gemms: tuple[str, ...] = PACKAGE_GEMMS
) -> GRDense:
    """A copy of ``dense`` whose GEMMs of kinds ``gemms`` (of KINDS) are fp8 (scales from ``amax``)."""
    targets = gemm_inputs(dense, gemms)
    missing = sorted(set(targets) - set(amax))
    if missing:
        raise ValueError(f"fp8: no calibrated input range for {missing}: calibration did not reach them")
    model = copy.deepcopy(dense).float()
    for i, layer in enumerate(model.hstu_layers):
        for attr in ("uvqk", "out"):
            name = f"layers.{i}.{attr}"
            if name in targets:
                lin = cast(nn.Linear, getattr(layer, attr))
                setattr(layer, attr, Fp8Linear(lin.weight, lin.bias, amax[name], name=name))
    if "heads" in targets:
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
