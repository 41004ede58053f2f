"""engine.aoti.attention: which attention kernel a GPU package holds. "auto" (the default) puts the Gluon sm90 kernel
(kernels/hstu_hopper.py) into packages of head dim 128 / 256 on an sm90 GPU as the opaque grc::hstu_attention_hopper
op (Inductor compiles Triton kernels, not Gluon ones), "triton" compiles the Triton kernel in, "hopper" fails the
build where the Gluon kernel cannot run. On the CPU: the choice and its override of the environment, the trace-time
check on fake tensors; on an sm90 GPU: packages of each choice built, parity-checked against float64 by the aoti
stage's own code, replayed from a CUDA graph bit-identically to their direct call, and launching none of the
kernels of the int64 marks grc.aoti.model.jagged_positions no longer adds (aten's sort-based index_put)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch._subclasses.fake_tensor import FakeTensorMode

from grc.aoti.build import build_target
from grc.model.gr import GRDense, GRModel
from grc.spec.loader import load_spec
from grc.spec.schema import AotiConfig, ModelConfig
from kernels import hstu_hopper
from tests.conftest import TEST_SPECS

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
NEEDS_SM90 = "needs a CUDA GPU of compute capability 9.x (sm90: wgmma, TMA): the Gluon kernel runs only there"


def test_the_spec_names_the_choices() -> None:
    assert AotiConfig().attention == "auto"
    assert AotiConfig(attention="triton").attention == "triton"
    with pytest.raises(ValidationError, match="attention"):
        AotiConfig(attention="cutlass")  # type: ignore[arg-type]


def test_a_build_choice_overrides_the_environment_inside_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hstu_hopper.KERNEL_ENV, "hopper")
    assert hstu_hopper.chosen() == "hopper"
    with hstu_hopper.kernel_choice("triton"):
        assert hstu_hopper.chosen() == "triton"
        with hstu_hopper.kernel_choice("auto"):
            assert hstu_hopper.chosen() == "auto"
        assert hstu_hopper.chosen() == "triton"
    assert hstu_hopper.chosen() == "hopper"
    refused = pytest.raises(ValueError, match="attention kernel 'gluon': expected one of")
    with refused, hstu_hopper.kernel_choice("gluon"):
        pass


def test_the_trace_time_check_reads_no_data_pointer() -> None:
    """A compile's fake tensors have no storage: the op bodies' check must not touch data_ptr, and on a host without
    an sm90 GPU it names that (so 'hopper' fails naming it and 'auto' keeps the Triton kernel)."""
    with FakeTensorMode():
        q = torch.empty(64, 2, 128, dtype=torch.bfloat16)
        assert "needs an sm90 GPU" in hstu_hopper.why_not(q, q, q, pointers=False)
        with hstu_hopper.kernel_choice("hopper"), pytest.raises(ValueError, match=r"attention kernel hopper: .*sm90"):
            hstu_hopper.runs(q, q, q, traced=True)
        with hstu_hopper.kernel_choice("auto"):
            assert not hstu_hopper.runs(q, q, q, traced=True)


def _model_of_head_dim(head_dim: int) -> tuple[ModelConfig, GRDense]:
    """mtgr-tiny (3 layers, profile tokens, group norms) with 2 heads of ``head_dim``."""
    spec = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec
    data = spec.model.model_dump()
    data["hstu"].update(attention_dim=2 * head_dim, linear_dim=2 * head_dim)
    cfg = ModelConfig.model_validate(data)
    torch.manual_seed(secrets.randbits(31))
    return cfg, GRModel(cfg).dense.eval()


@pytest.mark.skipif(not SM90, reason=NEEDS_SM90)
@pytest.mark.parametrize(("head_dim", "attention", "gluon"), [(128, "auto", True), (128, "triton", False)])
def test_gpu_package_with_each_kernel_matches_float64_and_replays_exactly(
    tmp_path: Path, head_dim: int, attention: str, gluon: bool
) -> None:
    from grc.aoti.inputs import random_inputs
    from grc.aoti.runtime import CudaGraphRunner, load

    spec = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec
    cfg, dense = _model_of_head_dim(head_dim)
    shapes = [(s.users, s.history, s.candidates) for s in spec.verify.shapes]
    entry = build_target(
        dense, "cuda", "bfloat16", tmp_path / "cuda", spec.engine.tolerance_of("bf16"), shapes,
        secrets.randbits(31), {"spec": "mtgr-tiny, head dim 128"}, attention=attention,
    )  # fmt: skip
    assert entry["status"] == "built" and entry["parity"] == "passed"  # build_target raises past the tolerance
    meta = json.loads((tmp_path / "cuda" / "metadata.json").read_text())
    assert ("Gluon sm90 kernel" in meta["attention"]) == gluon, meta["attention"]

    run = load(tmp_path / "cuda" / "model.pt2", "cuda", single_threaded=True)
    graphs = CudaGraphRunner(run)
    gen = torch.Generator().manual_seed(secrets.randbits(31))
    for users in (3, 5):
        args = random_inputs(cfg, users, 40, 8, gen, ragged=True).to(torch.device("cuda"), torch.bfloat16).args()
        with torch.no_grad():
            direct = run(*args).clone()
            replayed = graphs(*args).clone()
        assert direct.abs().max() > 0 and torch.isfinite(direct).all()
        assert torch.equal(direct, replayed)
    # the tokens' users by one binary search over the offsets (grc.aoti.model.jagged_positions): none of the int64
    # marks' aten kernels (the sort-based index_put with its bounds checks) runs in the package any more
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(*args)
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    marks = {k for k in kernels if any(w in k for w in ("radix_sort", "indexing_backward", "_assert_async"))}
    assert not marks, sorted(kernels)


@pytest.mark.skipif(not SM90, reason=NEEDS_SM90)
def test_gpu_package_build_fails_naming_why_the_gluon_kernel_cannot_run(tmp_path: Path) -> None:
    """head dim 16: no Gluon config; 'hopper' must fail the build naming it, never compile the Triton kernel in."""
    spec = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec
    _cfg, dense = _model_of_head_dim(16)
    with pytest.raises(Exception, match=r"attention kernel hopper: .*head dim"):
        build_target(
            dense, "cuda", "bfloat16", tmp_path / "cuda", spec.engine.tolerance_of("bf16"), [(2, 20, 4)], 1,
            {"spec": "mtgr-tiny, head dim 16"}, attention="hopper",
        )  # fmt: skip
