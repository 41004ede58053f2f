"""The aoti stage on CPU: hstu-tiny's package builds through `grc build`, matches the float64
PyTorch reference, loads and runs on fresh requests; GPU targets are skipped with a reason.
One AOTInductor compile for the whole module (~15-40 s on 2 cores)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SPECS, TEST_SPECS, run_build, write_spec


@pytest.fixture(scope="module")
def aoti_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("aoti")
    spec = write_spec(folder, SPECS / "hstu-tiny.yaml", {"engine.aoti": {"enabled": True, "targets": ["cpu", "cuda"]}})
    statuses = run_build(spec, only=["aoti"])
    assert statuses == {"weights": "built", "aoti": "built"}
    return folder / "artifacts" / "hstu-tiny" / "engines-aoti"


def test_cpu_package_built_with_parity_and_metadata(aoti_build: Path) -> None:
    manifest = json.loads((aoti_build / "manifest.json").read_text())
    assert manifest["built"] == ["cpu"]
    meta = json.loads((aoti_build / "cpu" / "metadata.json").read_text())
    assert meta["target"]["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["parity"]["status"] == "passed" and len(meta["parity"]["figures"]) == 3
    assert all(f["ok"] and f["max_abs"] <= 1e-5 for f in meta["parity"]["figures"])  # verify.export tolerance
    # one per layer in the exported program: the attention with its norm-gate (grc.model.hstu.ATTENTION_GATE)
    assert meta["custom_ops"] == ["grc.hstu_attention_gate_vqk.default"] * 2 and meta["fused"] is False
    assert {"torch", "triton", "python"} <= set(meta["toolkit"])
    assert meta["build_seconds"]["compile"] > 0 and len(meta["weights"]["manifest_sha256"]) == 64
    assert manifest["sha256"]["cpu/model.pt2"] == meta["package"]["sha256"]
    # the ranking gates on held-out users vs the fp32 model: a float32 package ranks as the model does
    ranking = meta["ranking"]
    assert {f["task"] for f in ranking["figures"]} == {"ctr", "engagement"} and ranking["gates"]["top_k"] == 10
    assert all(f["ok"] and f["kendall_tau"] > 0.999 and f["users"] == 32 for f in ranking["figures"])


def test_gpu_target_skipped_with_reason_and_no_file(aoti_build: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: the cuda target builds")
    manifest = json.loads((aoti_build / "manifest.json").read_text())
    assert "no CUDA GPU on this host" in manifest["skipped"]["cuda"]
    assert not (aoti_build / "cuda").exists()


def test_a_package_that_does_not_load_is_a_stage_error_naming_it(aoti_build: Path, tmp_path: Path) -> None:
    """The stage loads each package in a child first (a crash in the model .so must not kill the
    build): a truncated package gives a StageError with the path and the child's last lines."""
    from grc.aoti.loadcheck import check_loads
    from grc.errors import StageError
    from grc.spec.loader import load_spec

    cfg = load_spec(SPECS / "hstu-tiny.yaml").spec.model
    check_loads(aoti_build / "cpu" / "model.pt2", "cpu", "float32", cfg, "aoti: cpu", None)  # the real one loads
    broken = tmp_path / "model.pt2"
    data = (aoti_build / "cpu" / "model.pt2").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError) as err:
        check_loads(broken, "cpu", "float32", cfg, "aoti: cpu", "/usr/bin/g++")
    message = str(err.value)
    assert str(broken) in message and "failed (exit 1)" in message and "Last lines:" in message
    assert "/usr/bin/g++" in message


def test_package_runs_fresh_ragged_batches_like_the_reference(aoti_build: Path) -> None:
    from grc.aoti.inputs import random_inputs
    from grc.aoti.runtime import load
    from grc.spec.loader import load_spec
    from grc.weights import load_model

    cfg = load_spec(SPECS / "hstu-tiny.yaml").spec.model
    dense = load_model(cfg, aoti_build.parent / "weights").dense.double()
    run = load(aoti_build / "cpu" / "model.pt2", "cpu")
    gen = torch.Generator().manual_seed(99)
    for users, history, candidates in ((1, 5, 1), (7, 40, 16)):  # sizes the trace never saw
        inp = random_inputs(cfg, users, history, candidates, gen)
        with torch.no_grad():
            got = run(*inp.args())
            want = dense.forward_jagged(*inp.to("cpu", torch.float64).args())
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got.double() - want).abs().max() < 1e-5
        assert (got[want == 0] == 0).all()  # non-candidate tokens score exactly zero


def test_jagged_entry_matches_forward_jagged_with_empty_users() -> None:
    """The export entry point computes positions without data-dependent sizes and scores like
    ``forward_jagged``. It runs the impl the export traces (the ``torch.ops.grc`` custom ops); on CPU their
    kernel is the kernels' reference, so this checks the entry point's position and group arithmetic, not
    the Triton kernels (those are checked on CUDA in tests/kernels)."""
    from grc.aoti.inputs import random_inputs, seeded_dense
    from grc.aoti.model import JaggedDense, jagged_positions
    from grc.model.jagged import local_index
    from grc.spec.loader import load_spec

    offsets = torch.tensor([0, 0, 5, 5, 9, 12, 12])
    idx, n_ctx = jagged_positions(offsets, torch.tensor([0, 2, 0, 1, 3, 0]), 12)
    assert torch.equal(idx, local_index(offsets)) and n_ctx.tolist() == [3] * 5 + [3] * 4 + [0] * 3
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = seeded_dense(cfg, seed=3).double()
    inp = random_inputs(cfg, 4, 20, 6, torch.Generator().manual_seed(4)).to("cpu", torch.float64)
    with torch.no_grad():
        want = dense.forward_jagged(*inp.args())
        assert JaggedDense(dense).impl == "triton"  # what grc.aoti exports
        assert torch.allclose(JaggedDense(dense)(*inp.args()), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("time_buckets", [32, 64])
def test_every_time_bucket_reaches_the_export(time_buckets: int) -> None:
    """The exported entry point keeps the whole time-bias table (it was cut to 31 buckets): gaps
    of 68 years and more (bucket 31) and timestamps at the int64 ends (saturated gap, last
    bucket) give exactly the model's scores."""
    from grc.aoti.inputs import random_inputs, seeded_dense
    from grc.aoti.model import JaggedDense
    from grc.spec.loader import load_spec

    spec = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec
    hstu = spec.model.hstu.model_copy(update={"time_buckets": time_buckets})
    dense = seeded_dense(spec.model.model_copy(update={"hstu": hstu})).double()
    inp = random_inputs(dense.cfg, 3, 30, 5, torch.Generator().manual_seed(1)).to("cpu", torch.float64)
    inp.timestamps[1] -= 1 << 31  # one history event 68 years back: bucket 31
    inp.timestamps[2] = -(1 << 63)  # and one at INT64_MIN: saturated gap, bucket 63 (or NB-1)
    with torch.no_grad():
        want = dense.forward_jagged(*inp.args())
        assert torch.allclose(JaggedDense(dense)(*inp.args()), want, rtol=0, atol=1e-12)
        next(iter(dense.hstu_layers)).attention.ts_w[:, 31:] += 1.0  # buckets >= 31 matter for these inputs
        assert not torch.allclose(dense.forward_jagged(*inp.args()), want)


def test_spec_section_and_light_stage_module() -> None:
    from pydantic import ValidationError

    from grc.build.graph import active_stages
    from grc.spec.loader import load_spec
    from grc.spec.schema import AotiConfig

    assert AotiConfig().enabled is False and AotiConfig().targets == ["cpu", "cuda"]
    assert AotiConfig(targets=["sm90"]).targets == ["sm90"]
    with pytest.raises(ValidationError, match="expected cpu, cuda or sm<NN>"):
        AotiConfig(targets=["h100"])
    assert "aoti" not in [s.name for s in active_stages(load_spec(SPECS / "hstu-tiny.yaml"))]  # off by default
    tree = ast.parse((REPO / "grc" / "stages" / "aoti.py").read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top <= {"__future__", "json", "typing", "grc.stages.base"}  # torch loads only when the stage runs


def test_gpu_targets_put_the_host_gpus_in_the_key(tmp_path: Path) -> None:
    """A CPU host's "cuda: skipped" must never be restored from the cache on a GPU host."""
    from grc.build.graph import fingerprint
    from grc.cache.key import host_gpus
    from grc.spec.loader import load_spec
    from grc.stages import stage_named

    aoti = stage_named("aoti")
    gpu = load_spec(write_spec(tmp_path, SPECS / "hstu-tiny.yaml", {"engine.aoti": {"enabled": True}}, name="g"))
    cpu_only = {"engine.aoti": {"enabled": True, "targets": ["cpu"]}}
    cpu = load_spec(write_spec(tmp_path, SPECS / "hstu-tiny.yaml", cpu_only, name="c"))
    assert fingerprint(aoti, gpu)["host:gpus"] == host_gpus()  # "none" here, "NVIDIA H200, 9.0" there
    assert "host:gpus" not in fingerprint(aoti, cpu)  # a cpu package does not care which GPU is present
    assert "host:gpus" not in fingerprint(stage_named("export"), gpu)
    assert fingerprint(stage_named("engine"), gpu)["host:gpus"] == host_gpus()  # toolkit choice, parity: host's


def test_compiler_shim_runs_the_real_compiler_and_restores_cxx(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import shutil
    import subprocess

    from grc.aoti.build import compiler_shim, cxx_compiler

    real = cxx_compiler()
    if real is None:
        pytest.skip("no C++ compiler on PATH (g++ or $CXX): AOTInductor cannot compile here")
    monkeypatch.setenv("CXX", real)
    with compiler_shim() as shim:
        assert shim is not None and Path(shim).name == Path(real).name  # Inductor picks flags by the name
        assert os.environ["CXX"] == shim
        version = [subprocess.run([c, "--version"], capture_output=True, text=True).stdout for c in (shim, real)]
        assert version[0] == version[1] and version[0]
    assert os.environ["CXX"] == real and Path(shim).exists()  # kept: compile workers may still name it
    monkeypatch.delenv("CXX")
    with compiler_shim() as shim:
        assert Path(shim or "").name == Path(shutil.which("g++") or "").name
    assert "CXX" not in os.environ


def test_the_system_compiler_comes_before_a_g_plus_plus_earlier_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the lent H200 image PATH's g++ is a wrapper whose packages crashed on load; /usr/bin/g++'s
    loaded (bench/results/aoti-probe-h200.json). An explicit $CXX still wins."""
    import os

    from grc.aoti.build import SYSTEM_CXX, cxx_compiler

    if not os.access(SYSTEM_CXX, os.X_OK):
        pytest.skip(f"{SYSTEM_CXX} is not here: nothing to prefer")
    wrapper = tmp_path / "opt-gcc" / "g++"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {SYSTEM_CXX} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CXX", raising=False)
    assert cxx_compiler() == SYSTEM_CXX
    monkeypatch.setenv("CXX", str(wrapper))
    assert cxx_compiler() == str(wrapper)


def test_fused_export_holds_the_fused_ops_and_scores_like_the_model() -> None:
    """engine.aoti.fuse: the exported program holds the fused projections and the candidate heads
    (their PyTorch twins on a CPU) and gives forward_jagged's scores; the stage compiles this program."""
    from grc.aoti.inputs import random_inputs, seeded_dense
    from grc.aoti.model import custom_ops, expected_ops, export_program
    from grc.spec.loader import load_spec

    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = seeded_dense(cfg, seed=5)
    program = export_program(dense, torch.device("cpu"), torch.float32, fuse=True)
    ops = custom_ops(program)
    assert {op: ops.count(op) for op in expected_ops(cfg.hstu.num_layers, True)} == expected_ops(
        cfg.hstu.num_layers, True
    )
    assert "grc.candidate_heads.default" in ops
    inp = random_inputs(cfg, 3, 17, 5, torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = dense.forward_jagged(*inp.args())
        got = program.module()(*inp.args())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
