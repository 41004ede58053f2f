"""Real engines: nvcc builds the plugin library, TensorRT-RTX builds sm80/sm89 plans on this CPU host.

hstu-tiny (built once per worker by the ``built_tiny`` fixture) carries targets sm80, sm89 and h100;
mtgr-small's engines are built in one test only (its weights are ~4 GB). Each test skips with the
precise reason when nvcc, the TensorRT headers or TensorRT-RTX are missing here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import onnx
import pytest
import yaml

from grc.build.runner import plan
from grc.cli import main
from grc.engine import plugin_build
from grc.engine.toolkits import RTX_PIN, installed, local_gpus
from grc.spec.loader import load_spec
from grc.stages.plugins import PLUGIN_FIELDS
from tests.conftest import SPECS, in_dir, require_plugin_library, run_build, write_spec

UPSTREAM = ("weights", "export", "surgery", "verify", "plugins")  # what a precision change must not rebuild


def _require_toolchain() -> None:
    try:
        plugin_build.find_nvcc()
    except plugin_build.Unavailable as exc:
        pytest.skip(f"no plugin library without nvcc: {exc}")
    if "tensorrt_rtx" not in installed():
        pytest.skip(f"TensorRT-RTX is not installed: pip install {RTX_PIN}")


def _manifest(root: Path, stage: str) -> dict:  # type: ignore[type-arg]
    return json.loads((root / stage / "manifest.json").read_text())


def _built_root(artifacts: Path, name: str) -> Path:
    root = artifacts / name
    require_plugin_library(root)  # skips only without nvcc; a headers download or sha regression fails
    return root


def _check_engines(root: Path, attention_nodes: list[str]) -> None:
    manifest = _manifest(root, "engines")
    plugins = _manifest(root, "plugins")
    assert manifest["built"] == ["sm80", "sm89"]
    reason = manifest["skipped"]["h100"]
    assert "sm90" in reason and "full TensorRT" in reason  # why, and what to install
    assert not (root / "engines" / "h100").exists()  # no plan, no fake file for a skipped target
    library = root / "plugins" / plugins["library"]
    library_sha = hashlib.sha256(library.read_bytes()).hexdigest()
    assert plugins["sha256"] == {plugins["library"]: library_sha}
    for target, sm, mask in (("sm80", 80, 0x02), ("sm89", 89, 0x08)):
        meta = json.loads((root / "engines" / target / "metadata.json").read_text())
        plan_bytes = (root / "engines" / target / "model.plan").read_bytes()
        assert meta["toolkit"]["name"] == "tensorrt_rtx" and meta["toolkit"]["version"].startswith("1.")
        assert meta["target_sms"] == [sm] and plan_bytes[0x20] == mask == meta["plan"]["sm_mask"]
        assert meta["plan"]["sha256"] == hashlib.sha256(plan_bytes).hexdigest()
        assert meta["plugin_library"]["sha256"] == library_sha == manifest["plugin_library_sha256"]
        assert manifest["sha256"][f"{target}/model.plan"] == meta["plan"]["sha256"]
        assert meta["onnx"]["surgery_sha256"] == _manifest(root, "surgery")["sha256"]["model.onnx"]
        assert meta["profiling_verbosity"] == "DETAILED" and _seconds(root, target) > 0
        assert meta["precision"] and meta["profiles"]
        # the layer list recorded at build time holds one plugin layer per fused node ...
        plugin_layers = [r["name"] for r in meta["network_layers"] if r["type"] == "PLUGIN_V3"]
        assert plugin_layers == attention_nodes and all("HSTUAttention" in n for n in plugin_layers)
        # ... and the plan bytes name them as custom layers (the plugin reached the engine)
        assert meta["plan"]["custom_layers"] == sorted(attention_nodes)
        assert meta["parity"]["status"] in ("not measured", "passed")
        if not local_gpus():
            assert "no sm" in meta["parity"]["reason"]  # said, never claimed


def _seconds(root: Path, target: str) -> float:
    meta = json.loads((root / "engines" / target / "metadata.json").read_text())
    return float(json.loads((root / "engines" / target / meta["build_report"]).read_text())["build_seconds"])


def _attention_nodes(root: Path) -> list[str]:
    model = onnx.load(str(root / "surgery" / "model.onnx"), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "HSTUAttention"]


def test_tiny_engines_hold_the_plugin_layers(built_tiny: tuple[Path, Path]) -> None:
    _require_toolchain()
    root = _built_root(built_tiny[1], "hstu-tiny")
    _check_engines(root, _attention_nodes(root))


def test_plugin_creator_reads_what_surgery_writes(built_tiny: tuple[Path, Path]) -> None:
    from grc.engine import PLUGIN
    from grc.onnx.surgery.passes import ATTENTION_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION

    assert (ATTENTION_OP, PLUGIN_VERSION, PLUGIN_NAMESPACE) == PLUGIN
    _require_toolchain()
    root = _built_root(built_tiny[1], "hstu-tiny")
    model = onnx.load(str(root / "surgery" / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "HSTUAttention")
    attrs = [a.name for a in node.attribute if not a.name.startswith("plugin_")]
    assert tuple(attrs) == PLUGIN_FIELDS
    plugins = _manifest(root, "plugins")
    seen = plugins["registry"]["tensorrt_rtx"]  # the creator as TensorRT-RTX's registry loads it
    assert [f[0] for f in seen["fields"]] == list(PLUGIN_FIELDS) and seen["namespace"] == "grc"
    assert plugins["lint"]["entry_points_ok"] and not plugins["lint"]["links_tensorrt_or_cudart"]


def test_inspect_engine_without_a_gpu(built_tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _require_toolchain()
    root = _built_root(built_tiny[1], "hstu-tiny")
    assert main(["inspect", "engine", str(root / "engines" / "sm89" / "model.plan"), "--layers", "0"]) == 0
    out = capsys.readouterr().out
    assert "I/O bindings:" in out and "timestamps" in out and "int64" in out
    assert "optimization profiles" in out and "layers.0.HSTUAttention" in out and "PLUGIN_V3" in out
    if not local_gpus():
        assert "the engine inspector needs a GPU" in out
    assert main(["inspect", "engine", str(root / "engines" / "sm80"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plan_file"]["target_sms"] == [80]


def test_precision_change_rebuilds_only_the_engines(tiny_copy: tuple[Path, Path]) -> None:
    _require_toolchain()
    spec, artifacts = tiny_copy
    _built_root(artifacts, "hstu-tiny")
    data = yaml.safe_load(spec.read_text())
    data["engine"]["precision"] = "fp32"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    with in_dir(spec.parent):
        rows = {r.task: r for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny"))}
    assert all(rows[t].state == "up to date" for t in UPSTREAM), {t: rows[t].reasons for t in UPSTREAM}
    assert rows["engine"].state == "stale" and "engine.precision changed" in rows["engine"].reasons
    ran = {t for t, s in run_build(spec).items() if s == "built"}
    assert "engine" in ran and not ran & set(UPSTREAM)  # serving bundles may follow the engines
    meta = json.loads((artifacts / "hstu-tiny" / "engines" / "sm80" / "metadata.json").read_text())
    assert meta["precision"] == "fp32" and meta["onnx"]["built_from_sha256"] == meta["onnx"]["surgery_sha256"]


def test_triton_bundle_serves_the_built_engines(
    tiny_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """backend tensorrt_plan: the triton stage reads the engine stage's plans (an optional input)."""
    from grc.serving.triton import bundle as bd
    from grc.serving.triton.model_config import load_config

    _require_toolchain()
    spec, artifacts = tiny_copy
    root = _built_root(artifacts, "hstu-tiny")
    write_spec(spec.parent, spec, {"bundles.triton.extra_backends": ["tensorrt_plan"]})
    statuses = run_build(spec)
    assert statuses.pop("triton") == "built" and all(s == "up to date" for s in statuses.values()), statuses
    repo = root / "triton" / bd.MODEL_REPOSITORY
    dense = load_config(repo / "dense_trt")
    assert dict(dense.cc_model_filenames) == {"8.0": "model.sm80.plan", "8.9": "model.sm89.plan"}  # h100: skipped
    for sm in ("sm80", "sm89"):
        served = (repo / "dense_trt" / "1" / f"model.{sm}.plan").read_bytes()
        assert served == (root / "engines" / sm / "model.plan").read_bytes()
    steps = load_config(repo / "hstu-tiny-tensorrt_plan").ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess_padded", "dense_trt", "postprocess"]
    with in_dir(spec.parent):
        rows = {r.task: r for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny"))}
    assert all(r.state == "up to date" for r in rows.values())  # the new input is recorded, not re-run
    assert not (repo / "dense_trt" / "configs").exists()  # every built engine has an SM of its own

    # two GPUs of one compute capability (L4 and RTX 4090 are both 8.9): each its own configs/<target>.pbtxt
    targets = [{"name": "sm80", "sm": "sm80"}, {"name": "l4", "gpu": "l4"}, {"name": "rtx4090", "sm": "sm89"}]
    write_spec(spec.parent, spec, {"engine.targets": targets})
    statuses = run_build(spec)
    assert statuses["engine"] == "built" and statuses["triton"] == "built" and statuses["export"] == "up to date"
    for gpu in ("l4", "rtx4090"):
        pinned = load_config(repo / "dense_trt" / "configs" / f"{gpu}.pbtxt")
        assert pinned.default_model_filename == f"model.{gpu}.plan" and not pinned.cc_model_filenames
        served = (repo / "dense_trt" / "1" / f"model.{gpu}.plan").read_bytes()
        assert served == (root / "engines" / gpu / "model.plan").read_bytes()
    assert not (repo / "dense_trt" / "configs" / "sm80.pbtxt").exists()
    with in_dir(spec.parent):  # which engine runs where
        assert main(["inspect", "targets", spec.name, "--json"]) == 0
    where = {r["target"]: r for r in json.loads(capsys.readouterr().out)}
    assert where["sm80"]["triton"] == "dense_trt on cc 8.0" and where["sm80"]["status"] == "built"
    assert where["l4"]["triton"] == "dense_trt --model-config-name=l4"
    assert where["rtx4090"]["triton"] == "dense_trt --model-config-name=rtx4090"
    assert where["l4"]["toolkit"].startswith("tensorrt_rtx") and where["l4"]["file"] == "engines/l4/model.plan"


@pytest.mark.slow
def test_mtgr_small_engines(tmp_path: Path) -> None:
    """`grc build specs/mtgr-small.yaml` (engine and what it needs): sm80 + sm89 plans with the
    HSTUAttention plugin layers, h100 skipped with its reason. Then the same engine task rebuilt
    (first vs second build) and a no-op build."""
    _require_toolchain()
    spec = write_spec(tmp_path, SPECS / "mtgr-small.yaml")
    shutil.copy(SPECS / "mtgr-base.yaml", tmp_path / "mtgr-base.yaml")  # extends: resolved beside it
    try:
        _build_mtgr_small(spec, tmp_path)
    finally:
        shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)  # ~4 GB of weights: do not keep them around


def _build_mtgr_small(spec: Path, tmp_path: Path) -> None:
    run_build(spec, only=["engine"])
    root = _built_root(tmp_path / "artifacts", "mtgr-small")
    _check_engines(root, _attention_nodes(root))
    first = {t: _seconds(root, t) for t in ("sm80", "sm89")}
    (root / "engines" / "manifest.json").unlink()  # force the engine task again, everything else cached
    started = time.perf_counter()
    statuses = run_build(spec, only=["engine"])
    assert {t for t, s in statuses.items() if s == "built"} == {"engine"}
    second = {t: _seconds(root, t) for t in ("sm80", "sm89")}
    rebuilt_s = time.perf_counter() - started
    started = time.perf_counter()
    assert all(s == "up to date" for s in run_build(spec, only=["engine"]).values())
    noop_s = time.perf_counter() - started
    print(
        f"\nmtgr-small engine build seconds: first {first}, second {second}; forced engine task {rebuilt_s:.2f}s "
        f"wall; no-op build {noop_s:.2f}s"
    )


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precision_pass_keeps_float32_io(built_tiny: tuple[Path, Path], tmp_path: Path, precision: str) -> None:
    from onnx import TensorProto

    from grc.engine.precision import convert

    src = built_tiny[1] / "hstu-tiny" / "surgery" / "model.onnx"
    report = convert(src, tmp_path / "model.onnx", precision)
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model)
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    assert all(t.data_type != TensorProto.FLOAT for t in model.graph.initializer)
    assert {t.data_type for t in model.graph.initializer if t.name.endswith(("pos_w", "ts_w"))} == {low}
    io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io["tokens"] == io["scores"] == TensorProto.FLOAT and io["timestamps"] == TensorProto.INT64
    assert report["input_casts"] == ["tokens"] and report["output_casts"] == ["scores"]
    assert onnx.load(str(src), load_external_data=False).graph.initializer[0].data_type == TensorProto.FLOAT


def test_gpu_only_worker_modes_fail_cleanly_without_a_gpu(built_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """inspect and parity need a CUDA driver: here the worker must say so, not crash or claim."""
    _require_toolchain()
    if local_gpus():
        pytest.skip("this host has a GPU: the inspector and parity run for real in the build")
    import numpy as np

    from grc.stages.engine import parity_feeds, run_worker

    root = _built_root(built_tiny[1], "hstu-tiny")
    feeds = parity_feeds(root / "surgery" / "model.onnx", users=3, tokens=20, max_candidates=4)
    assert feeds["lengths"][0] == 20 and (feeds["num_candidates"] < feeds["lengths"]).all()
    np.savez(tmp_path / "feeds.npz", **feeds)  # type: ignore[arg-type]
    common = {
        "plan": str(root / "engines" / "sm80" / "model.plan"),
        "plugin_library": str(root / "plugins" / "libgrc_plugins.so"),
    }
    toolkit = installed()["tensorrt_rtx"]
    for mode, extra in (
        ("inspect", {}),
        (
            "parity",
            {
                "onnx": str(root / "surgery" / "model.onnx"),
                "inputs": str(tmp_path / "feeds.npz"),
                "outputs": str(tmp_path / "out.npz"),
            },
        ),
    ):
        result = run_worker(mode, {**common, **extra}, toolkit, tmp_path / mode)
        assert not result["ok"] and "deserialize_cuda_engine failed" in result["error"], result
