"""The triton bundle stage and the serving code paths, without a server (fast)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from grc.errors import SpecError, StageError
from grc.serving.common import request as rq
from grc.serving.common import validate
from grc.serving.triton import bundle as bd
from grc.serving.triton import check
from grc.serving.triton.load import request_pool
from grc.serving.triton.model_config import load_config, parse_config, render_config
from grc.serving.triton.model_config import pb as mc
from grc.serving.triton.models import dense_onnx, postprocess, preprocess
from grc.spec.loader import load_spec
from grc.spec.schema import TritonBundleConfig
from grc.weights import open_tables
from tests.conftest import run_build, write_spec


def _root(built: tuple[Path, Path]) -> Path:
    return built[1] / "hstu-tiny"


def test_bundle_is_a_model_repository_with_linked_weights(built_tiny: tuple[Path, Path]) -> None:
    root = _root(built_tiny)
    folder = root / "triton"
    repo = folder / bd.MODEL_REPOSITORY
    assert sorted(p.name for p in repo.iterdir()) == ["dense_onnx", "hstu-tiny", "postprocess", "preprocess"]
    configs = {p.name: load_config(p) for p in repo.iterdir()}  # parses, checks, name == directory
    ens = configs["hstu-tiny"]
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocess", "dense_onnx", "postprocess"]
    dense = configs["dense_onnx"]
    assert dense.backend == "python" and dense.max_batch_size == 8
    assert list(dense.dynamic_batching.preferred_batch_size) == [4, 8]
    assert dense.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [i.allow_ragged_batch for i in dense.input] == [True, True, False, False]
    assert dense.instance_group[0].kind == dense.instance_group[0].KIND_CPU
    assert dense.version_policy.latest.num_versions == 1
    for name in ("preprocess", "dense_onnx", "postprocess"):
        shim = (repo / name / "1" / "model.py").read_text()
        assert f"from grc.serving.triton.models.{name} import TritonPythonModel" in shim
        warm = configs[name].model_warmup[0]
        for tensor, spec in warm.inputs.items():  # every warmup file holds exactly its dims' bytes
            size = (repo / name / "warmup" / spec.input_data_file).stat().st_size
            itemsize = 4 if spec.data_type == mc.TYPE_FP32 else 8
            assert size == itemsize * int(np.prod(spec.dims)), tensor
    # weights and ONNX are hard links of the stages' files, and the manifest carries their digests
    shard = next((root / "weights").glob("*.safetensors"))
    linked = repo / "preprocess" / "1" / "weights" / shard.name
    assert os.stat(linked).st_ino == os.stat(shard).st_ino
    assert os.stat(repo / "dense_onnx" / "1" / "model.onnx").st_ino == os.stat(root / "onnx" / "model.onnx").st_ino
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["linked"] == "hardlink"
    assert (
        manifest["sha256"][str(linked.relative_to(folder))]
        == json.loads((root / "weights" / "manifest.json").read_text())["shards"][0]["sha256"]
    )
    description = bd.load_description(folder)
    assert description["ensemble"] == "hstu-tiny"
    assert [i["name"] for i in description["request"]["inputs"]] == [
        "history_item",
        "history_action",
        "history_timestamps",
        "candidate_item",
        "request_time",
    ]
    body = json.loads((folder / bd.SAMPLE_JSON).read_text())
    assert {i["name"] for i in body["inputs"]} == set(description["sample"])
    assert "must be installed in the Python environment" in (folder / "README.md").read_text().replace("\n", " ")


def test_editing_bundles_triton_reruns_the_bundle_alone(tiny_copy: tuple[Path, Path]) -> None:
    spec, artifacts = tiny_copy
    write_spec(spec.parent, spec, {"bundles.triton.top_k": 3, "bundles.triton.max_queue_delay_us": 500})
    statuses = run_build(spec)
    assert statuses.pop("triton") == "built"
    assert all(status == "up to date" for status in statuses.values()), statuses
    repo = artifacts / "hstu-tiny" / "triton" / bd.MODEL_REPOSITORY
    post = load_config(repo / "postprocess")
    assert post.parameters["top_k"].string_value == "3"
    assert load_config(repo / "dense_onnx").dynamic_batching.max_queue_delay_microseconds == 500


def test_spec_rules_name_the_field(tmp_path: Path, built_tiny: tuple[Path, Path]) -> None:
    with pytest.raises(ValidationError, match="preferred_batch_sizes: each must be <= max_batch_size 8"):
        TritonBundleConfig(preferred_batch_sizes=[4, 16])
    with pytest.raises(ValidationError, match="extra_backends: list backends other than 'onnxruntime'"):
        TritonBundleConfig(extra_backends=["onnxruntime"])
    with pytest.raises(ValidationError, match="versions: version_policy specific must list model_version 1"):
        TritonBundleConfig(version_policy="specific", versions=[2])
    with pytest.raises(ValidationError, match="gpus: only KIND_GPU"):
        TritonBundleConfig(gpus=[0])
    bad = write_spec(tmp_path, built_tiny[0], {"bundles.triton.preferred_batch_sizes": [32]})
    with pytest.raises(SpecError, match=r"hstu-tiny.yaml:\d+: bundles.triton.*preferred_batch_sizes: each must be"):
        load_spec(bad)
    no_engines = {"bundles.triton.extra_backends": ["tensorrt_plan"], "engine.targets": []}
    where = r"hstu-tiny.yaml:\d+: bundles\.triton\.extra_backends: "
    with pytest.raises(SpecError, match=where + r"tensorrt_plan serves the engine stage's TensorRT engines; list"):
        load_spec(write_spec(tmp_path, built_tiny[0], no_engines))
    # found by validate (the spec), not when the bundle is written
    unknown_task = r"hstu-tiny.yaml:\d+: bundles\.triton\.rank_weights\.clicks: names task 'clicks', which model"
    with pytest.raises(SpecError, match=unknown_task):
        load_spec(write_spec(tmp_path, built_tiny[0], {"bundles.triton.rank_weights": {"clicks": 1.0}}))


def test_tensorrt_hook_renders_cc_model_filenames(built_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    root = _root(built_tiny)
    base = load_spec(built_tiny[0]).spec
    trt = base.model_copy(
        update={
            "bundles": base.bundles.model_copy(
                update={"triton": base.bundles.triton.model_copy(update={"extra_backends": ["tensorrt_plan"]})}
            )
        }
    )
    with pytest.raises(StageError, match="tensorrt_plan serves the engine stage's TensorRT engines"):
        bd.write_bundle(trt, root / "weights", root / "onnx", tmp_path / "none", log=lambda _: None)
    plans = {}
    for cc in (80, 90):
        plans[cc] = tmp_path / f"sm{cc}.plan"
        plans[cc].write_bytes(b"not a real engine")
    out = tmp_path / "bundle"
    per_gpu = {"h100": plans[90], "h200": tmp_path / "h200.plan"}
    per_gpu["h200"].write_bytes(b"another engine")
    manifest = bd.write_bundle(trt, root / "weights", root / "onnx", out, engines=plans, gpu_engines=per_gpu,
                               log=lambda _: None)  # fmt: skip
    assert manifest["ensembles"] == {"onnxruntime": "hstu-tiny", "tensorrt_plan": "hstu-tiny-tensorrt_plan"}
    repo = out / bd.MODEL_REPOSITORY
    dense = load_config(repo / "dense_trt")
    assert dense.platform == "tensorrt_plan"
    assert dict(dense.cc_model_filenames) == {"8.0": "model.sm80.plan", "9.0": "model.sm90.plan"}
    assert (repo / "dense_trt" / "1" / "model.sm90.plan").read_bytes() == b"not a real engine"
    assert [list(i.dims) for i in dense.input] == [[64, 32], [64], [1], [1]]  # padded to max_seq_len
    assert list(dense.input[2].reshape.shape) == []  # lengths [B] in the engine
    assert load_config(repo / "preprocess_padded").parameters["pad_to"].string_value == "64"
    steps = load_config(repo / "hstu-tiny-tensorrt_plan").ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess_padded", "dense_trt", "postprocess"]
    assert parse_config(render_config(dense)) == dense
    for gpu in ("h100", "h200"):  # H100 and H200 share 9.0: each its own config, --model-config-name=<gpu>
        pinned = load_config(repo / "dense_trt" / "configs" / f"{gpu}.pbtxt")
        assert pinned.default_model_filename == f"model.{gpu}.plan" and not pinned.cc_model_filenames
        assert list(pinned.input) == list(dense.input)
    assert (repo / "dense_trt" / "1" / "model.h200.plan").read_bytes() == b"another engine"
    assert "--model-config-name=h200" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- request paths, no server


@pytest.fixture(scope="module")
def tiny(built_tiny: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    spec = load_spec(built_tiny[0]).spec
    weights = _root(built_tiny) / "weights"
    return spec, weights


def good_request(spec) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return bd.sample_request(spec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("request_time"), r"missing input\(s\): request_time"),
        (
            lambda r: r.update(history_item=r["history_item"].astype(np.int32)),
            r"history_item: expected INT64 \(got int32\)",
        ),
        (lambda r: r.update(history_item=r["history_item"][0]), r"history_item: expected shape \[batch, -1\]"),
        (lambda r: r.update(candidate_item=r["candidate_item"] + 10_000), "candidate_item: unknown id 1"),
        (
            lambda r: r.update(
                history_item=r["history_item"][:, :0],
                history_action=r["history_action"][:, :0],
                history_timestamps=r["history_timestamps"][:, :0],
            ),
            "empty history",
        ),
        (lambda r: r.update(candidate_item=np.zeros((1, 17), np.int64)), "too many candidates: 17"),
        (lambda r: r.update(candidate_item=np.zeros((1, 0), np.int64)), "no candidates"),
        (lambda r: r.update(history_action=r["history_action"][:, :2]), "history_action 2"),
    ],
)
def test_preprocess_refuses_bad_requests(tiny, change, message: str) -> None:  # type: ignore[no-untyped-def]
    spec, _ = tiny
    request = good_request(spec)
    change(request)
    with pytest.raises(validate.RequestError, match=message):
        validate.parse(dict(request), spec.model, truncate=True)


def test_long_history_keeps_the_newest_events_by_time_whatever_the_candidates(tiny) -> None:  # type: ignore[no-untyped-def]
    """The kept history is the max_history newest events by timestamp, in request order, for 1 or 16
    candidates alike (before: max_seq_len - c by position, so more candidates cut more history)."""
    spec, _ = tiny
    cfg = spec.model
    room = rq.max_history(cfg)
    assert room == cfg.hstu.max_seq_len - len(cfg.profile) - cfg.max_candidates == 48
    h = cfg.hstu.max_seq_len  # more than the model keeps
    times = np.random.default_rng(0).permutation(h).astype(np.int64) + 1_000  # not in time order
    newest = np.sort(np.argsort(times)[-room:])  # positions of the room newest, in request order
    for c in (1, cfg.max_candidates):
        request = good_request(spec)
        request.update(
            candidate_item=np.arange(c, dtype=np.int64)[None] % 8,
            history_item=np.arange(h, dtype=np.int64)[None] % 8,
            history_action=np.arange(h, dtype=np.int64)[None] % 3,
            history_timestamps=times[None],
        )
        out = validate.parse(dict(request), cfg, truncate=True)
        np.testing.assert_array_equal(out["history_timestamps"][0], times[newest])
        np.testing.assert_array_equal(out["history_item"][0], newest % 8)
        with pytest.raises(validate.RequestError, match=f"history too long: {h} events; the model keeps at most 48"):
            validate.parse(dict(request), cfg, truncate=False)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("request_time", 2**63 - 1),
        ("history_timestamps", -(2**63)),
        ("request_time", 2**61),
        ("history_timestamps", -(2**61) - 1),
    ],
)
def test_timestamps_outside_the_stated_range_are_refused(tiny, name: str, value: int) -> None:  # type: ignore[no-untyped-def]
    spec, _ = tiny
    request = good_request(spec)
    request[name] = request[name].copy()
    request[name][0, 0] = value
    with pytest.raises(
        validate.RequestError,
        match=rf"{name}: timestamp {value} is outside the accepted range "
        rf"\[-2\*\*61, 2\*\*61 - 1\] seconds",
    ):
        validate.parse(dict(request), spec.model, truncate=True)
    request[name][0, 0] = validate.TIME_MAX if value > 0 else validate.TIME_MIN  # the edges are accepted
    validate.parse(dict(request), spec.model, truncate=True)


def test_sample_request_is_oldest_first_and_readme_states_the_limits(built_tiny: tuple[Path, Path]) -> None:
    folder = _root(built_tiny) / "triton"
    description = bd.load_description(folder)
    times = np.asarray(description["sample"]["history_timestamps"])
    assert (np.diff(times, axis=1) >= 0).all(), times
    limits = description["limits"]
    assert limits["max_users_per_request"] == 8 and limits["max_history"] == 48
    assert limits["timestamps"] == {"min": -(2**61), "max": 2**61 - 1, "unit": "seconds"}
    text = " ".join((folder / "README.md").read_text().split())
    assert "users per request: at most 8" in text and "max_history (48)" in text
    assert "[-2**61, 2**61 - 1] seconds" in text
    assert "`grc deploy` picks free ports and prints the endpoints and this curl line with its HTTP port" in text


def test_python_model_code_matches_pytorch_without_a_server(tiny) -> None:  # type: ignore[no-untyped-def]
    """preprocess -> padded onnxruntime batch -> postprocess, for ragged requests in ONE run."""
    spec, weights = tiny
    cfg = spec.model
    requests = request_pool(cfg, 5, seed=3)
    requests.append(rq.stack_requests([requests[0], requests[0]]))  # a request of 2 users
    checked = [validate.parse(dict(r), cfg, True) for r in requests]
    dense_in = preprocess.project(checked, preprocess.load_projector(cfg, weights), open_tables(cfg, weights), cfg)
    session = dense_onnx.make_session(weights.parent / "onnx" / "model.onnx", 1, None)
    (scores,) = session.run(["scores"], dense_onnx.pad_batch(dense_in))
    reference = check.Reference(cfg, weights)
    weights_vec = rq.rank_weights(cfg, spec.bundles.triton)
    first = rq.candidate_input(cfg.candidate[0])
    for r, d, s in zip(requests, dense_in, dense_onnx.split_scores(scores, dense_in), strict=True):
        out = postprocess.rank({**d, "scores": s, "candidate_ids": r[first]}, weights_vec, spec.bundles.triton.top_k)
        result = check.spec_check(spec, out, reference.scores(r), r)
        assert result.ok, result.problems


def test_docker_command_is_printed_when_docker_is_missing(
    built_tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from grc.deploy import triton as deploy_triton

    monkeypatch.setattr(deploy_triton, "_docker_works", lambda: (False, "docker: command not found"))
    loaded = load_spec(built_tiny[0])
    args = argparse.Namespace(docker=True, detach=False, stop=False, timeout=60.0)
    assert deploy_triton.deploy(loaded, _root(built_tiny), args) == 0
    out = capsys.readouterr().out
    assert "docker run" in out and bd.NGC_IMAGE in out and "tritonserver --model-repository=/models" in out
    assert f"{(_root(built_tiny) / 'triton' / bd.MODEL_REPOSITORY).resolve()}:/models:ro" in out
    assert "printed, not run" in out


def test_dense_onnx_on_gpu_refuses_a_graph_with_grc_custom_ops(built_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """The custom op runs on the CPU only: a KIND_GPU dense_onnx refuses it (was: a CPU session, no word)."""
    root = _root(built_tiny)
    surgery = root / "surgery"  # the surgeried graph: grc::HSTUAttention nodes
    with pytest.raises(RuntimeError, match=r"has grc custom ops \(grc::HSTUAttention\), which onnxruntime runs on "
                                           r"the CPU only .* a KIND_GPU instance cannot serve it"):  # fmt: skip
        dense_onnx.make_session(surgery / "model.onnx", 1, gpu=0)
    assert dense_onnx.make_session(surgery / "model.onnx", 1, None) is not None  # KIND_CPU serves it
    spec = load_spec(built_tiny[0]).spec
    triton = spec.bundles.triton.model_copy(update={"instance_kind": "KIND_GPU"})
    gpu = spec.model_copy(update={"bundles": spec.bundles.model_copy(update={"triton": triton})})
    out = tmp_path / "triton"
    out.mkdir()
    with pytest.raises(StageError, match=r"bundles.triton.instance_kind: KIND_GPU, but .*model.onnx has grc custom "
                                         r"ops \(grc::HSTUAttention\)"):  # fmt: skip
        bd.write_bundle(gpu, root / "weights", surgery, out, log=lambda _: None)
    assert not any(out.iterdir()), "half a bundle was written"


def test_deploy_refuses_when_plan_fails(tiny_copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """grc plan failing (here: a corrupt doit database) is not "up to date": deploy names it and stops."""
    from grc.build.runner import DB_NAME
    from grc.deploy import triton as deploy_triton

    spec, artifacts = tiny_copy
    root = artifacts / "hstu-tiny"
    (root / DB_NAME).write_bytes(b"not a database" * 100)
    monkeypatch.setattr(deploy_triton, "_docker_works", lambda: (False, "docker: command not found"))
    args = argparse.Namespace(docker=True, detach=False, stop=False, timeout=60.0)
    with pytest.raises(deploy_triton.DeployError, match=r"cannot tell whether the triton bundle is up to date: grc "
                                                        r"plan failed \(DatabaseException: "):  # fmt: skip
        deploy_triton.deploy(load_spec(spec), root, args)


def test_an_installer_error_fails_the_serving_tests_instead_of_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: a TritonServerError from grc's installer skipped the whole real-server suite."""
    from grc.serving.triton.server import TritonServerError
    from tests.serving.conftest import require_tritonserver

    home = tmp_path / "tritonserver"
    home.mkdir()
    (home / "left-over").write_text("a half install")
    monkeypatch.setenv("GRC_TRITON_HOME", str(home))
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "tritonserver").exists()))  # fmt: skip
    with pytest.raises(TritonServerError, match="is not empty but holds no tritonserver"):
        require_tritonserver()
