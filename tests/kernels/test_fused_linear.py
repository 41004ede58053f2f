"""The fused projections (kernels/fused_linear.py): the Triton kernels under the interpreter
against their float64 twins, the twins against the model's own unfused math, and the fused
layer path against the unfused one.

Kernel runs happen in a subprocess (tests/kernels/fused_worker.py): TRITON_INTERPRET must be
set before the kernels are decorated and must not leak into this pytest process. Each run draws a
fresh seed (printed on failure), poisons the output with NaN and compares by ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grc.model import hstu
from grc.model.hstu import HSTULayer
from grc.model.kv_cache import KVLayout
from grc.spec.schema import HSTUConfig
from kernels.fused_linear import gated_linear_residual_reference, norm_linear_silu_reference

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fused_worker.py")
# Against float64. float32: ieee dots (seen ~1.3e-7). 16-bit: the normalised operand and the
# output are rounded to the dtype (seen ~3.6e-4 fp16, ~2.6e-3 bf16 typically). bf16's unit roundoff is
# 2**-8 = 3.9e-3 per rounding, and the one-row 1x16->16 case measures ||err|| over 16 values only: its
# worst of 60 seeds was 4.5e-3, and seed 808469897 gave 5.6e-3 (CI, 2026-12-05), exactly the error of
# PyTorch's own bf16 path on the same draw (norm in fp32 rounded to bf16, fp32 GEMM, output rounded).
# So bf16's bound is the one the interpreter tests use, two roundings' worth: 1e-2.
BOUNDS = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fused_linear_kernels_match_float64(dtype: str) -> None:
    seed = secrets.randbits(31)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(WORKER), dtype, str(seed)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"worker {dtype} seed={seed} failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {case: err for case, err in results.items() if not err <= BOUNDS[dtype]}
    assert not bad, f"{dtype} seed={seed}: rel. error over {BOUNDS[dtype]} (inf = NaN left in output): {bad}"


def _layer(seed: int) -> HSTULayer:
    cfg = HSTUConfig(num_layers=1, num_heads=2, attention_dim=16, linear_dim=16, max_seq_len=64)
    layer = HSTULayer(24, cfg, groups=3).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial norms and biases: every term of the fusion matters
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return layer


def test_twins_equal_the_models_unfused_math() -> None:
    """float64: SiLU(uvqk(GroupLN(x))) and x + out(norm_gate(a, u)) exactly as HSTULayer computes them."""
    seed = secrets.randbits(31)
    layer = _layer(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(19, 24, generator=gen, dtype=torch.float64) + 0.3
    group = torch.randint(0, 3, (19,), generator=gen)
    n = layer.norm_in
    fused = norm_linear_silu_reference(x, group, n.weight, n.bias, layer.uvqk.weight, layer.uvqk.bias, n.eps)
    plain = torch.nn.functional.silu(layer.uvqk(layer.norm_in(x, group)))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12, msg=f"seed={seed}")
    a, u = (
        torch.randn(19, 16, generator=gen, dtype=torch.float64),
        torch.randn(19, 16, generator=gen, dtype=torch.float64),
    )
    m = layer.norm_attn
    fused = gated_linear_residual_reference(a, u, m.weight, m.bias, layer.out.weight, layer.out.bias, x, m.eps)
    plain = x + layer.out(torch.nn.functional.layer_norm(a, (16,), m.weight, m.bias, m.eps) * u)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12, msg=f"seed={seed}")


@pytest.mark.parametrize("uvqk_prologue", [True, False])
@pytest.mark.parametrize("out_prologue", [True, False])
def test_fused_layer_equals_unfused_layer(uvqk_prologue: bool, out_prologue: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """forward_jagged(fuse=True) (the grc ops; their twins on a CPU) == the plain model, float64,
    with each projection's norm as its GEMM's prologue or apart (grc.model.hstu.NORM_PROLOGUE)."""
    monkeypatch.setitem(hstu.NORM_PROLOGUE, "uvqk", uvqk_prologue)
    monkeypatch.setitem(hstu.NORM_PROLOGUE, "out", out_prologue)
    seed = secrets.randbits(31)
    layer = _layer(seed)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, 9, 30], dtype=torch.int64)
    x = torch.randn(30, 24, generator=gen, dtype=torch.float64)
    group = torch.randint(0, 3, (30,), generator=gen)
    ts = torch.randint(0, 10_000, (30,), generator=gen)
    ncand = torch.tensor([2, 5])
    with torch.no_grad():
        plain = layer.forward_jagged(x, group, offsets, ncand, ts, impl="pytorch")
        fused = layer.forward_jagged(x, group, offsets, ncand, ts, impl="triton", fuse=True)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10, msg=f"seed={seed}")


def test_fuse_needs_the_triton_impl() -> None:
    layer = _layer(0)
    x = torch.zeros(3, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fuse=True .* impl='triton'"):
        layer.forward_jagged(x, torch.zeros(3, dtype=torch.int64), torch.tensor([0, 3]), torch.tensor([1]),
                             torch.zeros(3, dtype=torch.int64), impl="pytorch", fuse=True)  # fmt: skip


def test_kernel_refuses_float64() -> None:
    from kernels.fused_linear import GROUP_NORM, SILU, fused_linear_triton

    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64: use impl='pytorch'"):
        weight, group = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)
        fused_linear_triton(x, weight, torch.zeros(3), GROUP_NORM, SILU, gamma=torch.ones(1, 4), group=group)


@pytest.mark.parametrize("step_prologue", [True, False])
def test_fused_scattered_layer_writes_the_rows_the_plain_one_does(step_prologue: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """forward_scattered(fuse=True): the UVQK GEMM's epilogue writes the new K/V rows (kernels.fused_linear.KVInto;
    on a CPU its twin) == the plain layer's index_copy_ of them, and the same output, float64, with the step's
    group norm as the GEMM's prologue or apart (NORM_PROLOGUE["uvqk_step"])."""
    monkeypatch.setitem(hstu.NORM_PROLOGUE, "uvqk_step", step_prologue)
    seed = secrets.randbits(31)
    layer = _layer(seed)
    gen = torch.Generator().manual_seed(seed)
    cached, new, heads, dqk, dv = 9, 6, 2, 8, 8
    layout = KVLayout(layers=2, heads=heads, head_qk=dqk, head_v=dv)  # this layer's rows are layer 1's columns

    def arena() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.full((24, layout.width), float("nan"), dtype=torch.float64)
        keys, values = layout.split(rows)
        keys[1][3 : 3 + cached] = torch.randn(cached, heads, dqk, generator=torch.Generator().manual_seed(seed))
        values[1][3 : 3 + cached] = torch.randn(cached, heads, dv, generator=torch.Generator().manual_seed(~seed))
        return rows, keys[1], values[1]

    x = torch.randn(new, 24, generator=gen, dtype=torch.float64)
    group = torch.randint(0, 3, (new,), generator=gen)
    ts = torch.sort(torch.randint(0, 10_000, (cached + new,), generator=gen)).values
    kv_ts = torch.zeros(24, dtype=torch.int64)
    kv_ts[3 : 3 + cached + new] = ts
    slots = torch.arange(3 + cached, 3 + cached + new)
    q_off, ranges, ncand = torch.tensor([0, new]), torch.tensor([[3, 3 + cached + new]]), torch.tensor([2])
    outs, written = [], []
    with torch.no_grad():
        for impl, fuse in (("pytorch", False), ("triton", True)):
            rows, keys, values = arena()
            out, _, _ = layer.forward_scattered(x, group, keys, values, slots, q_off, ranges, kv_ts, ncand, impl,
                                                fuse, max_user_keys=cached + new)  # fmt: skip
            outs.append(out)
            written.append(rows)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10, msg=f"seed={seed}")
    torch.testing.assert_close(written[1], written[0], rtol=1e-10, atol=1e-10, equal_nan=True, msg=f"seed={seed}")
    assert torch.isfinite(written[1][slots, layout.width // 2 :]).all(), f"seed={seed}: new rows not written"


def test_the_scatter_refuses_what_its_epilogue_cannot_store() -> None:
    """KVInto names the setting: rows whose H x D is not contiguous, columns past the output, one slot per row."""
    from kernels.fused_linear import KVInto

    x = torch.zeros(4, 8)
    rows = torch.zeros(10, 2, 2, 3)  # [rows, H, D] per kind would be rows[:, 0] / rows[:, 1]
    good = KVInto(rows[:, 0], rows[:, 1], torch.arange(4), k_col=6, v_col=0)
    good.check(x, n_out=12)
    with pytest.raises(ValueError, match="each row's H x D contiguous"):
        KVInto(rows[:, 0].transpose(1, 2), rows[:, 1], torch.arange(4), k_col=6, v_col=0).check(x, n_out=12)
    with pytest.raises(ValueError, match=r"K columns \[8, 14\)"):
        KVInto(rows[:, 0], rows[:, 1], torch.arange(4), k_col=8, v_col=0).check(x, n_out=12)
    with pytest.raises(ValueError, match=r"slots must be \[4\] integers"):
        KVInto(rows[:, 0], rows[:, 1], torch.arange(3), k_col=6, v_col=0).check(x, n_out=12)
