"""The triton bundle's aotinductor backend on a REAL tritonserver: the aoti stage's CPU package
served by a python-backend model, next to the onnxruntime step in the same repository.

hstu-tiny with engine.aoti (cpu) and bundles.triton.backend aotinductor + extra_backends
onnxruntime: every score of both ensembles is checked against the PyTorch model (float64), the
two backends agree with each other, and the dense_aoti model really executed. Without a server
(cheap): the padded <-> jagged conversion, the spec rules, and that only a spec serving the
packages makes the triton stage read (and wait for) the aoti stage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from grc.serving.triton import bundle as bd
from grc.serving.triton import check
from grc.serving.triton.models.dense_aoti import from_jagged, to_jagged
from grc.serving.triton.server import ServerInstall, TritonServer
from grc.spec.loader import load_spec
from tests.conftest import SPECS, run_build, write_spec

AOTI = {"engine.aoti": {"enabled": True, "targets": ["cpu"]},
        "bundles.triton": {"backend": "aotinductor", "extra_backends": ["onnxruntime"]}}  # fmt: skip


def test_padded_and_jagged_layouts_round_trip() -> None:
    rng = np.random.default_rng(0)
    reqs: list[dict[str, np.ndarray]] = []
    for b, n in ((2, 7), (1, 4)):
        lengths = rng.integers(2, n + 1, size=(b, 1))
        lengths[0] = n
        reqs.append({"tokens": rng.normal(size=(b, n, 3)).astype(np.float32),
                     "timestamps": rng.integers(0, 99, size=(b, n)), "lengths": lengths,
                     "num_candidates": np.ones((b, 1), np.int64)})  # fmt: skip
    flat = to_jagged(reqs)
    total = sum(int(r["lengths"].sum()) for r in reqs)
    assert flat["tokens"].shape == (total, 3) and flat["offsets"][-1] == total and flat["offsets"].size == 4
    back = from_jagged(np.concatenate([flat["tokens"], flat["timestamps"][:, None]], 1), reqs)
    for r, out in zip(reqs, back, strict=True):
        for u, n in enumerate(r["lengths"].reshape(-1)):
            assert np.array_equal(out[u, :n, :3], r["tokens"][u, :n])
            assert np.array_equal(out[u, :n, 3], r["timestamps"][u, :n])
            assert not out[u, n:].any()  # padding stays zero


def test_spec_rules_and_the_optional_stage_input(tmp_path: Path) -> None:
    from grc.stages import stage_named

    off = write_spec(tmp_path, SPECS / "hstu-tiny.yaml", {"bundles.triton": {"backend": "aotinductor"}}, name="a")
    with pytest.raises(Exception, match=r"bundles\.triton\.backend: aotinductor serves the aoti stage's packages"):
        load_spec(off)
    gpu_only = {**AOTI, "engine.aoti": {"enabled": True, "targets": ["cuda"]}}
    with pytest.raises(Exception, match="KIND_CPU serves the cpu package"):
        load_spec(write_spec(tmp_path, SPECS / "hstu-tiny.yaml", gpu_only, name="b"))
    triton = stage_named("triton")
    served = load_spec(write_spec(tmp_path, SPECS / "hstu-tiny.yaml", AOTI, name="c")).spec
    plain = load_spec(SPECS / "hstu-tiny.yaml").spec
    assert triton.inputs_for(served) == ("weights", "export", "aoti")
    assert triton.inputs_for(plain) == ("weights", "export")  # the onnx bundle never waits for AOTInductor
    with pytest.raises(ValidationError):
        type(served).model_validate({**served.model_dump(), "engine": {**served.engine.model_dump(),
                                                                        "aoti": {"enabled": False}}})  # fmt: skip


@pytest.fixture(scope="module")
def served(install: ServerInstall, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:  # type: ignore[type-arg]
    folder = tmp_path_factory.mktemp("triton-aoti")
    spec_path = write_spec(folder, SPECS / "hstu-tiny.yaml", AOTI)
    statuses = run_build(spec_path, only=["triton"])
    assert statuses["aoti"] == "built" and statuses["triton"] == "built"
    spec = load_spec(spec_path).spec
    bundle = folder / "artifacts" / spec.name / "triton"
    with TritonServer(bundle / bd.MODEL_REPOSITORY, install=install, startup_timeout_s=180) as server:
        yield spec, bundle, server


@pytest.mark.slow
def test_aoti_package_served_matches_pytorch_and_onnxruntime(served: tuple) -> None:  # type: ignore[type-arg]
    from grc.serving.triton import load

    spec, bundle, server = served
    names = bd.load_description(bundle)["ensembles"]
    assert names == {"aotinductor": spec.name, "onnxruntime": f"{spec.name}-onnxruntime"}
    config = (bundle / bd.MODEL_REPOSITORY / "dense_aoti" / "config.pbtxt").read_text()
    assert "cpu/model.pt2" in config and (bundle / bd.MODEL_REPOSITORY / "dense_aoti" / "1" / "cpu").is_dir()
    reference = check.Reference(spec.model, bundle / bd.MODEL_REPOSITORY / bd.PREPROCESS / "1" / "weights")
    worst = 0.0
    for i, arrays in enumerate(load.request_pool(spec.model, 6, seed=31)):
        protocol = "grpc" if i % 2 else "http"
        url = server.grpc_url if i % 2 else server.http_url
        aoti = check.infer(url, protocol, names["aotinductor"], arrays)
        onnx = check.infer(url, protocol, names["onnxruntime"], arrays)
        result = check.spec_check(spec, aoti, reference.scores(arrays), arrays)
        assert result.ok, result.problems
        for key, value in aoti.items():
            if value.dtype.kind == "f":
                assert np.abs(value - onnx[key]).max() <= 1e-5, key  # two compilers of one model agree
            else:
                assert np.array_equal(value, onnx[key]), key  # the same ranking
        worst = max(worst, result.max_abs)
    assert check.batch_sizes(server.grpc_url, "dense_aoti"), "dense_aoti never executed"
    print(f"aoti: max |triton - pytorch| = {worst:.2e}")
    meta = json.loads((bundle / bd.MODEL_REPOSITORY / "dense_aoti" / "1" / "cpu" / "metadata.json").read_text())
    assert meta["parity"]["status"] == "passed"
    from grc.cli.targets import target_rows

    rows = {(r["artifact"], r["target"]): r for r in target_rows(bundle.parent)}
    assert rows["aotinductor", "cpu"]["triton"] == "dense_aoti KIND_CPU" and rows["aotinductor", "cpu"]["runs_here"]
    assert set(rows) == {("aotinductor", "cpu")}  # `grc build ... triton` never needed the engine stage here
