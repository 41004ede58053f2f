"""The engine section of the spec: precise errors, toolkit choice per target (no toolkit needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grc.cli import main
from grc.engine.toolkits import Gpu, Toolkit, choose
from grc.spec.schema import EngineTarget
from tests.conftest import SPECS

BASE = (SPECS / "hstu-tiny.yaml").read_text()
TARGETS = "    - {name: sm89, sm: sm89, gpu: l4}\n"
RTX = {"tensorrt_rtx": Toolkit("tensorrt_rtx", "tensorrt_rtx", "1.7.1.116")}
FULL = {**RTX, "tensorrt": Toolkit("tensorrt", "tensorrt", "10.14.1")}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("  precision: fp16", "  precision: fp8"),
            "engine.precision: fp8 needs sm89 or newer (FP8 (e4m3) tensor cores arrived with Ada, sm89); "
            "targets[0] 'sm80' is sm80",
        ),
        (
            (TARGETS, "    - {name: sm89, sm: sm89, gpu: l4}\n    - {name: t4, gpu: t4, precision: int8}\n"),
            "engine.targets[2].precision: int8 needs sm80 or newer",
        ),
        (
            ("engine:\n", "engine:\n  calibration: {seed: 20261201}\n"),
            "engine.calibration.seed: calibration users need their own seed, not verify.ranking.seed",
        ),
        (
            ("engine:\n", "engine:\n  aoti: {precision: fp8, dtype: float16}\n"),
            "engine.aoti.dtype: precision fp8 writes its GEMMs' outputs in bfloat16",
        ),
        (
            ("engine:\n", "engine:\n  aoti: {precision: fp8, fuse: true}\n"),
            "engine.aoti.fuse: the fused Triton projections",
        ),
        ((TARGETS, "    - {name: sm89, sm: sm80, gpu: l4}\n"), "engine.targets[1].sm: l4 is sm89 (got 'sm80')"),
        ((TARGETS, "    - {name: sm89, gpu: l44}\n"), "engine.targets[1].gpu: unknown GPU model; did you mean 'l4'?"),
        ((TARGETS, "    - {name: sm80, gpu: a100}\n"), "engine.targets[1]: target name 'sm80' is used twice"),
        (("opt: 32, max: 64", "opt: 80, max: 64"), "engine.profiles[0].tokens.opt: expected min <= opt <= max"),
    ],
)
def test_engine_spec_errors_name_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], expected: str
) -> None:
    assert edit[0] in BASE
    (tmp_path / "bad.yaml").write_text(BASE.replace(edit[0], edit[1]))
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "bad.yaml:" in err, err


def test_gpu_names_imply_the_sm() -> None:
    assert EngineTarget(name="x", gpu="NVIDIA H100").compute_capability == 90
    assert EngineTarget(name="x", gpu="RTX 4090").compute_capability == 89
    assert EngineTarget(name="x", sm="sm_80").compute_capability == 80


def test_toolkit_choice_per_target() -> None:
    rtx = choose(89, "fp16", toolkits=RTX, gpus=())
    assert rtx.toolkit is not None and rtx.toolkit.name == "tensorrt_rtx"
    none = choose(90, "fp16", toolkits=RTX, gpus=())
    assert none.toolkit is None
    assert "tensorrt is not installed" in none.reason and "no sm90" in none.reason
    assert "full TensorRT installed" in none.reason  # what to do about it
    h100 = (Gpu("NVIDIA H100 80GB HBM3", 90),)
    full = choose(90, "fp16", toolkits=FULL, gpus=h100)
    assert full.toolkit is not None and full.toolkit.name == "tensorrt"  # the H100 host with full TensorRT
    assert choose(89, "fp16", toolkits=FULL, gpus=h100).toolkit.name == "tensorrt_rtx"  # type: ignore[union-attr]
    turing = choose(75, "fp32", toolkits=RTX, gpus=())
    assert turing.toolkit is None and "fp32" in turing.reason
    only_full = choose(89, "fp16", wanted="tensorrt", toolkits=FULL, gpus=())
    assert only_full.toolkit is None and "builds for the GPU it runs on" in only_full.reason


def test_rtx_targets_match_the_installed_toolkit() -> None:
    trt = pytest.importorskip(
        "tensorrt_rtx_bindings",
        reason="TensorRT-RTX is not installed "
        "(pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116)",
    )
    from grc.engine.toolkits import RTX_SMS

    members = {int(n[2:]) for n in trt.ComputeCapability.__members__ if n.startswith("SM")}
    assert members == set(RTX_SMS)
