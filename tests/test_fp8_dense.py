"""FP8 dense GEMMs (grc/model/fp8.py) on the CPU: the math through a PyTorch emulation (e4m3 round
trip of weights and activations, float32 products) against the float64 model, ``torch._scaled_mm``
itself against that emulation, the scales surviving the package's dtype cast and torch.export, and
the ranking gates passing the calibrated model and failing a broken calibration.

Tolerance (stated): e4m3 keeps 3 mantissa bits, so each operand is rounded by up to 2^-4 of itself;
through 2 layers and the heads, hstu-tiny's scores (probabilities) moved by at most 0.03 and 0.007
on average in our runs; the bound is engine.parity's fp8 default, 0.05 max and 0.01 mean.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from grc.aoti.inputs import seeded_dense
from grc.engine.aoti_quality import fp8_package_model, ranking_check, users
from grc.errors import StageError
from grc.model import fp8
from grc.spec.loader import load_spec
from grc.spec.schema import DEFAULT_TOLERANCE
from tests.conftest import SPECS, TEST_SPECS

SPEC = load_spec(SPECS / "hstu-tiny.yaml").spec
MEAN_TOL = 0.01


def _models(spec=SPEC, gemms=fp8.KINDS):  # type: ignore[no-untyped-def]
    """Every GEMM kind in fp8 by default (the math of each); the package's set is PACKAGE_GEMMS."""
    dense = seeded_dense(spec.model, 7).eval()
    model, record = fp8_package_model(dense, spec, gemms)
    return dense, model, record


def _held_out(spec=SPEC):  # type: ignore[no-untyped-def]
    gates = spec.verify.ranking
    return users(spec, gates.seed, 8, gates.history, gates.candidates)


def test_fp8_emulation_is_within_tolerance_of_float64() -> None:
    dense, model, _ = _models()
    fp8.set_emulate(model, True)
    x = _held_out()
    with torch.no_grad():
        expected = copy.deepcopy(dense).double().forward_jagged(x.tokens.double(), *x.args()[1:])
        actual = model.forward_jagged(*x.args()).double()
    diff = (actual - expected).abs()
    assert float(diff.max()) <= DEFAULT_TOLERANCE["fp8"] and float(diff.mean()) <= MEAN_TOL
    assert float(diff.max()) > 1e-4  # the GEMMs really round (a float path would differ by ~1e-7)
    assert len(fp8.fp8_linears(model)) == 2 * SPEC.model.hstu.num_layers + 1  # uvqk, out per layer; the heads


def test_scaled_mm_agrees_with_the_emulation() -> None:
    """The kernel the GPU package calls, run on the CPU, against the emulated math: the same up to
    its bfloat16 output (2^-8 relative) and fp32 accumulation order."""
    _, model, _ = _models()
    lin = model.layers[0].uvqk
    x = torch.randn(40, lin.in_features, generator=torch.Generator().manual_seed(5))
    lin.emulate = True
    emulated = lin(x)
    lin.emulate = False
    try:
        kernel = lin(x)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch {torch.__version__} has no CPU torch._scaled_mm for e4m3 row-wise scaling: {exc}")
    assert kernel.dtype == x.dtype
    assert torch.allclose(kernel, emulated, rtol=2**-7, atol=1e-3 * float(emulated.abs().max()))


def test_scales_survive_the_package_cast_and_export() -> None:
    _, model, record = _models()
    before = {
        n: (m.weight_fp8.clone(), m.weight_scale.clone(), m.input_scale.clone())
        for n, m in fp8.fp8_linears(model).items()
    }
    cast = copy.deepcopy(model).to(torch.bfloat16)  # what export_program does to a GPU package's model
    for name, m in fp8.fp8_linears(cast).items():
        w, ws, xs = before[name]
        assert m.weight_fp8.dtype == torch.float8_e4m3fn and torch.equal(
            m.weight_fp8.view(torch.uint8), w.view(torch.uint8)
        )
        assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, ws)
        assert torch.equal(m.input_scale, xs) and float(m.input_inv_scale) * float(xs) == 1.0
    assert set(record["scales"]) == set(before) and len(record["calibration"]["digest"]) == 64

    from grc.aoti.model import export_program

    program = export_program(model, torch.device("cpu"), torch.float32)
    calls = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count("aten._scaled_mm.default") == len(before)


def test_calibration_users_are_not_the_held_out_users() -> None:
    _, _, record = _models()
    assert record["calibration"]["seed"] == SPEC.engine.calibration.seed != SPEC.verify.ranking.seed
    x = _held_out()
    cal = users(SPEC, SPEC.engine.calibration.seed, 8, SPEC.verify.ranking.history, SPEC.verify.ranking.candidates)
    assert not torch.equal(x.tokens, cal.tokens)


def test_fp8_ranking_passes_the_gates_and_a_broken_calibration_fails_them() -> None:
    """The package's GEMM set (every GEMM in fp8 is at the gates' edge on hstu-tiny too: Kendall tau
    0.949-0.959, and misses them on mtgr-small: grc/model/fp8.py PACKAGE_GEMMS)."""
    dense, model, _ = _models(gemms=fp8.PACKAGE_GEMMS)
    fp8.set_emulate(model, True)
    check = ranking_check(dense, SPEC, "aoti:fp8-emulated", "fp8 GEMMs")
    run = lambda *a: model.forward_jagged(*a)  # noqa: E731
    figures = check(run, torch.device("cpu"), torch.float32)["ranking"]["figures"]
    assert all(f["ok"] for f in figures) and all(f["mean_abs"] > 0 for f in figures)
    # a plausible calibration bug: amax measured on inputs 64x too small (e.g. before a norm's
    # gain): the real activations saturate at ±448 and the ranking falls apart
    amax = fp8.calibrate(dense, [users(SPEC, 99, 8, 32, None).args()])
    broken = fp8.to_fp8(dense, {k: v / 64 for k, v in amax.items()}, emulate=True, gemms=fp8.PACKAGE_GEMMS)
    with pytest.raises(StageError, match=r"(?s)aoti:fp8-emulated: ranking gates \(verify.ranking\) failed.*FAIL: "):
        check(lambda *a: broken.forward_jagged(*a), torch.device("cpu"), torch.float32)


def test_what_fp8_cannot_take_is_refused_by_name() -> None:
    dense = seeded_dense(load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model, 3)
    with pytest.raises(ValueError, match=r"no calibrated input range for \['heads'\]"):
        fp8.to_fp8(dense, {f"layers.{i}.{k}": 1.0 for i in range(3) for k in ("uvqk", "out")}, gemms=fp8.KINDS)
    with pytest.raises(ValueError, match=r"fp8: unknown GEMM kinds \['qkv'\]; known: \['uvqk', 'out', 'heads'\]"):
        fp8.to_fp8(dense, {}, gemms=("out", "qkv"))
    with pytest.raises(ValueError, match=r"fp8: odd is \[24, 32\]; torch._scaled_mm needs both dimensions"):
        fp8.Fp8Linear(torch.ones(24, 32), None, 1.0, name="odd")
    with pytest.raises(ValueError, match="calibrated input amax must be finite and > 0"):
        fp8.Fp8Linear(torch.ones(32, 32), None, 0.0, name="dead")
    assert np.isfinite(fp8.weight_scales(torch.zeros(16, 16)).numpy()).all()  # an all-zero row: no division by zero


def test_the_fp8_model_compiles_into_a_package_that_runs_scaled_mm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The aoti stage's compile of the fp8 model, on the CPU (~40 s): the package carries the e4m3
    weights and scales and calls _scaled_mm, so it computes what the eager fp8 model computes."""
    from grc.aoti.build import PACKAGE, compile_target
    from grc.aoti.runtime import load

    _, model, _ = _models()
    compiled = compile_target(model, "cpu", "bfloat16", tmp_path / "cpu", log=lambda _m: None)
    assert compiled["status"] == "compiled"
    run = load(tmp_path / "cpu" / PACKAGE, torch.device("cpu"))
    x = users(SPEC, 5, 4, 20, 8)  # fresh users, another shape than the export's
    with torch.no_grad():
        got, eager = run(*x.args()), model.forward_jagged(*x.args())
    assert torch.allclose(got, eager, atol=1e-5)
    fp8.set_emulate(model, True)
    with torch.no_grad():
        assert float((got - model.forward_jagged(*x.args())).abs().max()) < 0.05  # bf16 GEMM outputs vs emulation


def test_the_package_quantizes_the_output_gemms_and_records_the_rest_as_bf16() -> None:
    """PACKAGE_GEMMS (the output projections): the GEMM set that passes the ranking gates on mtgr-small
    (grc/model/fp8.py says what was measured); the uvqk and head GEMMs stay nn.Linear / TaskHeads."""
    dense, model, record = _models(gemms=fp8.PACKAGE_GEMMS)
    layers = SPEC.model.hstu.num_layers
    assert set(fp8.fp8_linears(model)) == {f"layers.{i}.out" for i in range(layers)}
    assert all(type(layer.uvqk) is torch.nn.Linear for layer in model.hstu_layers)
    assert type(model.heads) is type(dense.heads)
    assert record["fp8_gemms"] == ["out"] and set(record["scales"]) == set(fp8.fp8_linears(model))
    assert record["gemms"].startswith("HSTU output projections: torch._scaled_mm")
    assert "HSTU uvqk projections, the heads' first GEMM, attention" in record["gemms"]


def test_activation_quantization_is_one_rounding_in_the_input_dtype() -> None:
    """A bfloat16 input is quantized without a float32 copy (Inductor fuses scale, clamp and cast into
    one pass; session 6's path upcast x, divided, clamped and cast: four passes, two of them float32)
    and with one rounding: e4m3 of the float64 x / scale exactly (the scale is a power of two)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, model, _ = _models()
    lin = copy.deepcopy(model.layers[0].uvqk).to(torch.bfloat16)
    scale = float(lin.input_scale)
    assert scale == 2.0 ** round(np.log2(scale))  # a power of two
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(256, lin.in_features, generator=gen) * 3 * scale * fp8.E4M3_MAX).to(torch.bfloat16)
    x[0, 0] = 10 * scale * fp8.E4M3_MAX  # beyond the calibrated range: saturates at 448
    expected = (x.double() / scale).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)
    got = fp8.quantize_input(x, lin.input_inv_scale)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)) and float(got[0, 0]) == fp8.E4M3_MAX

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, torch.dtype, int, dict]] = []  # type: ignore[type-arg]
            self.fast_accum: list[bool] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if "_scaled_mm" in str(func):  # use_fast_accum: the 8th argument
                self.fast_accum.append(bool((kwargs or {}).get("use_fast_accum", len(args) > 7 and args[7])))
            if isinstance(out, torch.Tensor):
                self.calls.append((str(func), out.dtype, out.numel(), dict(kwargs or {})))
            return out

    with Ops() as ops, torch.no_grad():
        try:
            lin(x)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"torch {torch.__version__} has no CPU torch._scaled_mm for e4m3 row-wise scaling: {exc}")
    moves = ("view", "detach", "reshape", "expand", "alias", "_scaled_mm", ".t.")  # no pass over memory, or the GEMM
    big = [c for c in ops.calls if c[2] >= x.numel() and not any(m in c[0] for m in moves)]
    assert big and all(dtype in (torch.bfloat16, fp8.E4M3) for _, dtype, _, _ in big), big
    assert len(big) == 3  # scale, clamp, cast: nothing else touches x before the GEMM
    assert ops.fast_accum == [True]
