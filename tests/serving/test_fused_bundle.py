"""The fused pipeline's spec rules and bundle (bundles.triton.pipeline: fused), checked on CPU without a server.

Spec: the pipeline default follows instance_kind; what a pipeline cannot run is refused naming the field.
Bundle: one python model per backend with the ensemble's inputs and outputs, Triton's own instance groups
(kind, count, gpus) in a config.pbtxt that parses back through the ModelConfig protobuf; a KIND_GPU
aotinductor bundle without a GPU package fails the build naming why; a KIND_GPU instance on a host
without CUDA fails at load naming why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from grc.serving.common import request as rq
from grc.serving.triton import bundle as bd
from grc.serving.triton import fused_bundle as fb
from grc.serving.triton.model_config import load_config
from grc.serving.triton.model_config import pb as mc
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS, in_dir, run_build, write_spec

GPU = {
    "bundles.triton": {
        "instance_kind": "KIND_GPU",
        "backend": "pytorch",
        "extra_backends": ["pytorch_kernels"],
        "instance_count": 2,
        "gpus": [0, 1],
        "max_batch_size": 4,
        "preferred_batch_sizes": [2, 4],
    }
}


def spec_with(tmp_path: Path, triton: dict[str, Any], name: str = "s", **more: Any) -> Any:
    return load_spec(
        write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {"bundles.triton": triton, **more}, name=f"{name}.yaml")
    ).spec


def test_pipeline_default_follows_the_instance_kind(tmp_path: Path) -> None:
    assert spec_with(tmp_path, {}, "cpu").bundles.triton.pipeline == "ensemble"
    gpu = spec_with(tmp_path, {"instance_kind": "KIND_GPU", "backend": "pytorch"}, "gpu")
    assert gpu.bundles.triton.pipeline == "fused"
    cpu_fused = spec_with(tmp_path, {"pipeline": "fused", "backend": "pytorch"}, "cpu_fused")
    assert cpu_fused.bundles.triton.pipeline == "fused" and cpu_fused.bundles.triton.instance_kind == "KIND_CPU"
    # on a GPU the ensemble stays the default for what the fused model cannot run (a spec that served before)
    onnx = spec_with(tmp_path, {"instance_kind": "KIND_GPU", "backend": "onnxruntime"}, "gpu_onnx")
    assert onnx.bundles.triton.pipeline == "ensemble"
    # the fused model keeps the history cache too: a GPU spec with the cache on is fused by default
    cached = {"instance_kind": "KIND_GPU", "backend": "aotinductor", "history_cache": {"enabled": True}}
    aoti = {"engine.aoti": {"enabled": True, "targets": ["cuda"]}}
    assert spec_with(tmp_path, cached, "gpu_cached", **aoti).bundles.triton.pipeline == "fused"


@pytest.mark.parametrize(("triton", "more", "message"), [
    ({"pipeline": "fused", "backend": "onnxruntime"}, {},
     r"pipeline: fused runs the dense step as aotinductor, pytorch, pytorch_kernels .* onnxruntime is a separate step"),
    ({"pipeline": "fused", "instance_kind": "KIND_GPU", "backend": "tensorrt_plan"},
     {"engine.targets": [{"name": "h100", "gpu": "h100"}]},
     r"pipeline: fused .* tensorrt_plan is a separate step"),
    ({"pipeline": "ensemble", "backend": "onnxruntime", "extra_backends": ["pytorch"]}, {},
     r"pipeline: ensemble has no pytorch step"),
    ({"instance_kind": "KIND_GPU", "backend": "pytorch", "instance_count": 2, "history_cache": {"enabled": True}},
     {}, r"history_cache.instances: with pipeline fused the cached model runs one store per instance.*"
     r"got instances 1, instance_count 2"),
    ({"pipeline": "fused", "backend": "pytorch", "history_cache": {"enabled": True, "dtype": "bfloat16"}}, {},
     r"history_cache.dtype: the fused model keeps the K/V in its own dense dtype"),
    ({"pipeline": "fused", "backend": "pytorch", "gpu": {"tables": "pinned_host"}}, {},
     r"gpu.tables: pinned_host feeds a GPU gather"),
    ({"pipeline": "fused", "backend": "pytorch", "gpu": {"cuda_graphs": True}}, {},
     r"gpu.cuda_graphs: CUDA graphs need KIND_GPU instances"),
    ({"instance_kind": "KIND_GPU", "backend": "pytorch", "max_batch_size": 4, "preferred_batch_sizes": [4],
      "gpu": {"buckets": [{"users": 4, "tokens": 385}]}}, {},
     r"bundles.triton.gpu.buckets\[0\].tokens: 385 exceeds max_batch_size 4 x model.hstu.max_seq_len 96 = 384"),
    ({"instance_kind": "KIND_GPU", "backend": "pytorch", "max_batch_size": 4, "preferred_batch_sizes": [4],
      "gpu": {"buckets": [{"users": 7, "tokens": 192}]}}, {},
     r"bundles.triton.gpu.buckets\[0\].users: 7 slots, and a batch of 192 tokens uses at most 6"),
])  # fmt: skip
def test_what_a_pipeline_cannot_run_is_refused_naming_the_field(
    tmp_path: Path, triton: dict[str, Any], more: dict[str, Any], message: str
) -> None:
    with pytest.raises(Exception, match=message):
        spec_with(tmp_path, triton, **more)


def test_bucket_outside_the_aoti_package_range_is_refused(tmp_path: Path) -> None:
    from grc.aoti.model import MAX_TOKENS

    triton = {
        "instance_kind": "KIND_GPU",
        "backend": "aotinductor",
        "max_batch_size": 4096,
        "preferred_batch_sizes": [8],
        "gpu": {"buckets": [{"users": 8, "tokens": MAX_TOKENS + 2}]},
    }
    more: dict[str, Any] = {"engine.aoti": {"enabled": True, "targets": ["cuda"]}, "model.hstu.max_seq_len": 8192}
    spec = spec_with(tmp_path, triton, "big", **more)
    assert any("outside the AOTInductor package's exported range" in p for p in fb.problems(spec))


def test_fused_bundle_one_model_per_backend_with_instance_groups(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", GPU)
    statuses = run_build(spec_path, only=["triton"])
    assert statuses["triton"] == "built"
    assert "export" not in statuses  # the fused models never read the ONNX: no export stage (nor onnxscript)
    spec = load_spec(spec_path).spec
    folder = tmp_path / "artifacts" / spec.name / "triton"
    repo = folder / bd.MODEL_REPOSITORY
    assert sorted(p.name for p in repo.iterdir()) == ["mtgr-tiny", "mtgr-tiny-pytorch_kernels"]
    description = bd.load_description(folder)
    assert description["ensemble"] == "mtgr-tiny"
    assert description["ensembles"] == {"pytorch": "mtgr-tiny", "pytorch_kernels": "mtgr-tiny-pytorch_kernels"}
    for name, backend in (("mtgr-tiny", "pytorch"), ("mtgr-tiny-pytorch_kernels", "pytorch_kernels")):
        msg = load_config(repo / name)  # parsed and checked through the ModelConfig protobuf
        assert msg.backend == "python" and not msg.platform
        (group,) = msg.instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 2 and list(group.gpus) == [0, 1]
        assert [t.name for t in msg.input] == [s.name for s in rq.request_inputs(spec.model)]
        assert [t.name for t in msg.output] == [s.name for s in rq.response_outputs(spec.model)]
        params = {k: v.string_value for k, v in msg.parameters.items()}
        assert params["backend"] == backend and params["tables"] == "auto" and params["cuda_graphs"] == "true"
        plan = [tuple(b) for b in json.loads(params["buckets"])]
        assert plan == [(b.users, b.tokens) for b in fb.plan(spec)] and plan[-1][1] == 4 * 96
        assert "models.fused import" in (repo / name / "1" / "model.py").read_text()
        assert (repo / name / "1" / "weights" / "manifest.json").is_file()
        assert msg.model_warmup  # the sample request warms every instance up (graphs, autotuning)
    model, weights = bd.bundle_model(folder)  # what deploy's smoke test reads: the fused model's own
    assert model == spec.model and weights == repo / "mtgr-tiny" / "1" / "weights"
    assert "Fused pipeline" in (folder / "README.md").read_text()
    # what the fused models read beyond bundles.triton and model rebuilds the bundle (the build cache would
    # otherwise restore one with the old dense dtype, tolerance or model names)
    from grc.build.runner import plan as build_plan

    write_spec(tmp_path, spec_path, {"engine.aoti.dtype": "float16"})
    with in_dir(tmp_path):
        rows = {row.task: row for row in build_plan(load_spec(spec_path.name), Path("artifacts") / spec.name)}
    assert rows["triton"].state != "up to date" and "engine.aoti.dtype" in " ".join(rows["triton"].reasons)
    renamed = write_spec(tmp_path, spec_path, {"name": "renamed"}, name="renamed.yaml")
    run_build(renamed, only=["triton"])
    assert bd.load_description(tmp_path / "artifacts" / "renamed" / "triton")["ensemble"] == "renamed"


def test_kind_gpu_aotinductor_without_a_gpu_package_fails_the_build_naming_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tests/specs/mtgr-tiny-gpu.yaml built where there is no GPU: the aoti stage records its cuda target as
    skipped, and the triton stage fails saying why, leaving no bundle behind."""
    import shutil

    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: the aoti stage builds the cuda package here")
    for name in ("mtgr-tiny-gpu.yaml", "mtgr-tiny.yaml"):
        shutil.copy(TEST_SPECS / name, tmp_path / name)
    statuses = run_build(tmp_path / "mtgr-tiny-gpu.yaml", only=["triton"], expect_ok=False)
    assert statuses["aoti"] == "built" and statuses["triton"] == "failed", statuses
    assert (
        "bundles.triton.instance_kind: KIND_GPU serves a gpu AOTInductor package and the aoti stage built none "
        "(built: nothing; a GPU package is built on a host with that GPU)"
    ) in capsys.readouterr().err
    assert not (tmp_path / "artifacts" / "mtgr-tiny-gpu" / "triton").exists()


def test_kind_gpu_instance_without_cuda_fails_at_load_naming_why(tmp_path: Path) -> None:
    import torch

    from grc.serving.triton.models.fused import TritonPythonModel

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the no-CUDA refusal cannot be seen here")
    args = {
        "model_name": "m",
        "model_instance_kind": "GPU",
        "model_instance_device_id": "0",
        "model_repository": str(tmp_path),
        "model_version": "1",
        "model_config": json.dumps({"parameters": {}}),
    }
    with pytest.raises(
        RuntimeError,
        match=r"m: a KIND_GPU instance needs a CUDA GPU \(torch.cuda.is_available\(\) is "
        r"False\): torch .* set bundles.triton.instance_kind: KIND_CPU",
    ):
        TritonPythonModel().initialize(args)
    repo = tmp_path / "repo"
    msg = fb.fused_config(spec_with(tmp_path, GPU["bundles.triton"]), "m", "pytorch", None)
    from grc.serving.triton.model_config import write_config

    write_config(repo / "m", msg)
    problem = fb.host_problem(repo)
    assert problem is not None and "KIND_GPU python model(s) m needs a CUDA GPU" in problem


def test_kind_gpu_fused_bundle_with_the_cache_one_pinned_store_per_instance(tmp_path: Path) -> None:
    """The spec's backend: one fused model per store, ONE instance each, store k on gpus[k], with the optional
    user_id and the cache's parameters; the router (KIND_CPU) is the plain name; the extra backend keeps its
    instance_count and no cache."""
    cache = {"enabled": True, "instances": 2, "budget_mb": 8}
    spec_path = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {**GPU, "bundles.triton.history_cache": cache})
    run_build(spec_path, only=["triton"])
    spec = load_spec(spec_path).spec
    folder = tmp_path / "artifacts" / spec.name / "triton"
    repo = folder / bd.MODEL_REPOSITORY
    assert sorted(p.name for p in repo.iterdir()) == [
        "mtgr-tiny", "mtgr-tiny-cache-0", "mtgr-tiny-cache-1", "mtgr-tiny-pytorch_kernels",
    ]  # fmt: skip
    for k in range(2):
        msg = load_config(repo / f"mtgr-tiny-cache-{k}")
        (group,) = msg.instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 1 and list(group.gpus) == [k]
        assert [t.name for t in msg.input][-1] == "user_id" and msg.input[-1].optional
        params = {k: v.string_value for k, v in msg.parameters.items()}
        assert params["backend"] == "pytorch" and params["history_budget_bytes"] == str(8 << 20)
        assert params["history_max_user_bytes"] == str(1 << 20) and "GRDense.score" in params["history_scoring"]
    router = load_config(repo / "mtgr-tiny")
    assert router.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and router.instance_group[0].count == 2
    assert json.loads(router.parameters["shards"].string_value) == ["mtgr-tiny-cache-0", "mtgr-tiny-cache-1"]
    extra = load_config(repo / "mtgr-tiny-pytorch_kernels")
    assert extra.instance_group[0].count == 2 and "user_id" not in [t.name for t in extra.input]
    assert "history_budget_bytes" not in extra.parameters
    description = bd.load_description(folder)
    assert description["ensemble"] == "mtgr-tiny" and description["history_cache"]["module"] == "fused"
    model, weights = bd.bundle_model(folder)  # the router holds no model: the first store's
    assert model == spec.model and weights == repo / "mtgr-tiny-cache-0" / "1" / "weights"
