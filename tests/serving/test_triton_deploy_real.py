"""``grc deploy --target triton`` for real: smoke test vs PyTorch, --detach / --stop, clear errors."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from grc.cli import main
from grc.deploy import triton as deploy_triton
from grc.deploy.triton import DeployError
from grc.serving.triton import bundle as bd
from grc.serving.triton import server as tritonserver
from grc.serving.triton.server import (
    DetachedServer,
    ModelLoadError,
    PortInUseError,
    TritonServerNotFound,
    detached_alive,
)
from grc.spec.loader import load_spec
from tests.conftest import in_dir, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _server_installed(install: tritonserver.ServerInstall) -> None:
    """Every test here needs the server (tests/serving/conftest.py: skipped only on another platform)."""


def deploy(spec: Path, *extra: str) -> int:
    with in_dir(spec.parent):
        return main(["deploy", "--target", "triton", spec.name, "--timeout", "120", *extra])


def test_deploy_smoke_tests_against_pytorch_and_prints_endpoints(
    built_tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    spec, artifacts = built_tiny
    assert deploy(spec) == 0
    out = capsys.readouterr().out
    assert "smoke test: hstu-tiny vs PyTorch" in out
    assert out.count(" ok ") >= 2, out  # http and grpc rows
    assert "/v2/models/hstu-tiny/infer" in out and "metrics" in out
    curl = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl "))
    assert f"-d @{(artifacts / 'hstu-tiny' / 'triton' / bd.SAMPLE_JSON).resolve()}" in curl
    assert "stopping the server" in out
    assert not (artifacts / "hstu-tiny" / deploy_triton.STATE).exists()


def test_detach_leaves_it_serving_until_stop(tiny_copy: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    spec, artifacts = tiny_copy
    state = artifacts / "hstu-tiny" / deploy_triton.STATE
    assert deploy(spec, "--detach") == 0
    try:
        data = json.loads(state.read_text())
        record = DetachedServer(**{k: data[k] for k in DetachedServer.__dataclass_fields__})
        assert detached_alive(record)
        body = (artifacts / "hstu-tiny" / "triton" / bd.SAMPLE_JSON).read_bytes()
        request = urllib.request.Request(
            f"http://{record.http_url}/v2/models/hstu-tiny/infer",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:  # what the printed curl line does
            answer = json.loads(response.read())
        assert {o["name"] for o in answer["outputs"]} >= {"scores", "ranked_items"}
        assert deploy(spec, "--detach") == 1  # one per spec
        assert "already running" in capsys.readouterr().err
    finally:
        assert deploy(spec, "--stop") == 0
    assert "stopped the triton server of hstu-tiny" in capsys.readouterr().out
    assert not state.exists() and not detached_alive(record)
    assert not Path(record.workdir).exists()
    assert not list(Path("/dev/shm").glob(f"{record.shm_prefix}*"))
    assert deploy(spec, "--stop") == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_model_config_name_reaches_the_server(tiny_copy: tuple[Path, Path]) -> None:
    """--model-config-name: the server loads the bundle's configs/<name>.pbtxt (per-GPU engines use it)."""
    import tritonclient.grpc as grpcclient

    from grc.serving.triton.model_config import load_config, write_config

    spec, artifacts = tiny_copy
    model = artifacts / "hstu-tiny" / "triton" / bd.MODEL_REPOSITORY / "dense_onnx"
    pinned = load_config(model)
    pinned.dynamic_batching.max_queue_delay_microseconds = 4321
    write_config(model, pinned, custom="h200")
    assert deploy(spec, "--detach", "--model-config-name", "h200") == 0
    try:
        data = json.loads((artifacts / "hstu-tiny" / deploy_triton.STATE).read_text())
        with grpcclient.InferenceServerClient(f"127.0.0.1:{data['ports']['grpc']}") as client:
            assert client.get_model_config("dense_onnx").config.dynamic_batching.max_queue_delay_microseconds == 4321
    finally:
        assert deploy(spec, "--stop") == 0


def test_clear_errors(
    built_tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, artifacts = built_tiny
    # no bundle built: say how to build it
    fresh = write_spec(tmp_path / "fresh", spec)
    assert deploy(fresh) == 1
    assert (
        f"no triton bundle at artifacts/hstu-tiny/triton: build it first with\n  grc build {fresh}"
        in capsys.readouterr().err
    )
    loaded = load_spec(spec)
    args = argparse.Namespace(docker=False, detach=False, stop=False, timeout=60.0)
    # a custom config the bundle does not have
    unknown = argparse.Namespace(**vars(args), model_config_name="h200")
    with pytest.raises(DeployError, match=r"--model-config-name h200: no model of the bundle has configs/h200"):
        deploy_triton.deploy(loaded, artifacts / "hstu-tiny", unknown)
    # a taken port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"http port 127.0.0.1:{port} is already in use"):
            deploy_triton.deploy(loaded, artifacts / "hstu-tiny", argparse.Namespace(**vars(args), http_port=port))

    # a host without the HTTP client (tritonclient installed without its http extra): said before any server
    # starts, with the install command (tritonclient's own error names none and came after the start)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tritonclient.http", None)  # what `import` finds for a module that is not there
        assert deploy(spec) == 1
        err = capsys.readouterr().err
        assert "the smoke test sends its request over HTTP and gRPC, and tritonclient.http" in err, err
        assert "pip install 'tritonclient[http,grpc]==2.73.0'" in err, err
        assert not (artifacts / "hstu-tiny" / deploy_triton.STATE).exists()

    # no server anywhere
    def missing(home: Path | None = None) -> tritonserver.ServerInstall:
        raise TritonServerNotFound("tritonserver is not on PATH and not installed in /nowhere")

    with monkeypatch.context() as m:
        m.setattr(tritonserver, "find_tritonserver", missing)
        m.setattr(tritonserver, "ensure_tritonserver", missing)
        assert deploy(spec) == 1
        assert "tritonserver is not on PATH and not installed in /nowhere" in capsys.readouterr().err
    # a model that fails to load: the server's reason is quoted
    broken = tmp_path / "broken"
    shutil.copytree(artifacts / "hstu-tiny", broken / "hstu-tiny")
    (broken / "hstu-tiny" / "triton" / bd.MODEL_REPOSITORY / "preprocess" / "1" / "weights" / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match=r"model 'preprocess version 1': .*No such file or directory") as error:
        deploy_triton.deploy(loaded, broken / "hstu-tiny", args)
    assert list(error.value.failures) == ["preprocess version 1"]
