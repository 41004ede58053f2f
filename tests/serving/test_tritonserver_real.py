"""A REAL tritonserver on 127.0.0.1 serving an ensemble of two python-backend models.

The repository is generated in tmp_path with configs built through grc.serving.triton.model_config:
``add`` (A + B, dynamic batching, warmup) feeds ``rank`` (onnxruntime scales the scores, numpy
takes the top k), chained by the ensemble ``pipeline``. Requests go over HTTP and gRPC with
tritonclient. Skipped only when the server cannot be installed (no network to reach PyPI).
"""

from __future__ import annotations

import queue
import re
import socket
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from grc.serving.triton import server as tritonserver
from grc.serving.triton.model_config import (
    ModelConfig,
    ModelConfigError,
    load_config,
    parse_config,
    render_config,
    tensor_input,
    tensor_output,
    write_config,
)
from grc.serving.triton.model_config import pb as mc
from grc.serving.triton.server import (
    ModelLoadError,
    PortInUseError,
    ServerInstall,
    TritonServer,
)

pytestmark = pytest.mark.slow

K = 2
WIDTH = 4
MAX_BATCH = 8

# Tensors cross the model.py boundary through DLPack, never as_numpy()/Tensor(name, array): this
# server's stub (python_backend 24.10, pybind11 2.10) misreads numpy 2 arrays, so as_numpy() yields
# zeros and Tensor(name, array) sends 0 bytes, silently. BYTES tensors have no DLPack route.
# The backend renames a consumed capsule "used_dlpack" where numpy's deleter expects
# "used_dltensor" (then it prints an unraisable ValueError per tensor); renaming it fixes that.
TENSOR_IO_PY = """
import ctypes

import numpy as np
import triton_python_backend_utils as pb_utils

_USED = b"used_dltensor"
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]


def read(request, name):
    return np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name))


def tensor(name, array):
    capsule = np.ascontiguousarray(array).__dlpack__()
    out = pb_utils.Tensor.from_dlpack(name, capsule)
    _set_capsule_name(capsule, _USED)
    return out
"""

ADD_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils
from tensor_io import read, tensor


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            total = read(request, "A") + read(request, "B")
            responses.append(pb_utils.InferenceResponse([tensor("SUM", total.astype(np.float32))]))
        return responses
"""

RANK_PY = """
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
import triton_python_backend_utils as pb_utils
from tensor_io import read, tensor

K = 2


def scale_by_two_session():
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor("w", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    def initialize(self, args):
        self.session = scale_by_two_session()
        major_minor = [int(part) for v in (np.__version__, ort.__version__) for part in v.split(".")[:2]]
        self.runtime = np.array(major_minor, dtype=np.int64)

    def execute(self, requests):
        responses = []
        for request in requests:
            scaled = self.session.run(None, {"x": read(request, "SCORES")})[0]
            part = np.argpartition(-scaled, K - 1, axis=1)[:, :K]  # numpy top-k, then order it
            order = np.argsort(-np.take_along_axis(scaled, part, axis=1), axis=1, kind="stable")
            idx = np.take_along_axis(part, order, axis=1)
            responses.append(pb_utils.InferenceResponse([
                tensor("TOPK_IDX", idx.astype(np.int64)),
                tensor("TOPK_SCORES", np.take_along_axis(scaled, idx, axis=1).astype(np.float32)),
                tensor("RUNTIME", np.tile(self.runtime, (len(scaled), 1))),
            ]))
        return responses
"""

BROKEN_PY = """
import grc_no_such_module_for_triton_test  # noqa: F401


class TritonPythonModel:
    def execute(self, requests):
        return []
"""


# --------------------------------------------------------------------------- repository


def cpu_instance() -> mc.ModelInstanceGroup:
    return mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)


def add_config() -> ModelConfig:
    zeros = mc.ModelWarmup.Input(data_type=mc.TYPE_FP32, dims=[WIDTH], zero_data=True)
    return ModelConfig(
        name="add",
        backend="python",
        max_batch_size=MAX_BATCH,
        input=[tensor_input("A", "FP32", [WIDTH]), tensor_input("B", "FP32", [WIDTH])],
        output=[tensor_output("SUM", "FP32", [WIDTH])],
        instance_group=[cpu_instance()],
        # A 20 ms window lets the concurrent requests below meet in one execute() call.
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=20_000),
        model_warmup=[mc.ModelWarmup(name="zeros", batch_size=1, inputs={"A": zeros, "B": zeros})],
    )


def rank_config() -> ModelConfig:
    return ModelConfig(
        name="rank",
        backend="python",
        max_batch_size=MAX_BATCH,
        input=[tensor_input("SCORES", "FP32", [WIDTH])],
        output=[
            tensor_output("TOPK_IDX", "INT64", [K]),
            tensor_output("TOPK_SCORES", "FP32", [K]),
            tensor_output("RUNTIME", "INT64", [4]),
        ],
        instance_group=[cpu_instance()],
        dynamic_batching=mc.ModelDynamicBatching(),
    )


def pipeline_config() -> ModelConfig:
    step = mc.ModelEnsembling.Step
    return ModelConfig(
        name="pipeline",
        platform="ensemble",
        max_batch_size=MAX_BATCH,
        input=[tensor_input("A", "FP32", [WIDTH]), tensor_input("B", "FP32", [WIDTH])],
        output=[
            tensor_output("TOPK_IDX", "INT64", [K]),
            tensor_output("TOPK_SCORES", "FP32", [K]),
            tensor_output("RUNTIME", "INT64", [4]),
        ],
        ensemble_scheduling=mc.ModelEnsembling(
            step=[
                step(model_name="add", model_version=-1, input_map={"A": "A", "B": "B"}, output_map={"SUM": "sum"}),
                step(
                    model_name="rank",
                    model_version=-1,
                    input_map={"SCORES": "sum"},
                    output_map={n: n for n in ("TOPK_IDX", "TOPK_SCORES", "RUNTIME")},
                ),
            ]
        ),
    )


def write_model(repo: Path, config: ModelConfig, source: str | None) -> None:
    write_config(repo / config.name, config)
    version_dir = repo / config.name / "1"  # an ensemble still needs an (empty) version dir
    version_dir.mkdir(parents=True, exist_ok=True)
    if source is not None:
        (version_dir / "model.py").write_text(textwrap.dedent(source))
        # The model's version dir is on the stub's sys.path, so helpers can sit beside model.py.
        (version_dir / "tensor_io.py").write_text(textwrap.dedent(TENSOR_IO_PY))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_repository")
    write_model(root, add_config(), ADD_PY)
    write_model(root, rank_config(), RANK_PY)
    write_model(root, pipeline_config(), None)
    return root


@pytest.fixture(scope="module")
def server(install: ServerInstall, repo: Path) -> Iterator[TritonServer]:
    with TritonServer(repo, install=install, startup_timeout_s=60) as running:
        yield running
    assert not running.running


# --------------------------------------------------------------------------- helpers


def batch() -> tuple[np.ndarray, np.ndarray]:
    a = np.array([[1, 5, 2, 0], [9, 1, 1, 3]], dtype=np.float32)
    b = np.array([[0, 1, 7, 1], [0, 0, 0, 4]], dtype=np.float32)
    return a, b


def expected(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scaled = 2.0 * (a + b)
    idx = np.argsort(-scaled, axis=1, kind="stable")[:, :K]
    return idx, np.take_along_axis(scaled, idx, axis=1)


def check_result(idx: np.ndarray, top: np.ndarray, runtime: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    want_idx, want_top = expected(a, b)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(top, want_top)
    # The stub ran OUR interpreter's packages (numpy 2, our onnxruntime), not a distro python's.
    ours = [int(part) for v in (np.__version__, onnxruntime.__version__) for part in v.split(".")[:2]]
    assert runtime.tolist() == [ours] * len(a)


def http_infer(url: str, a: np.ndarray, b: np.ndarray) -> httpclient.InferResult:
    with httpclient.InferenceServerClient(url) as client:
        inputs = [httpclient.InferInput("A", list(a.shape), "FP32"), httpclient.InferInput("B", list(b.shape), "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        return client.infer("pipeline", inputs)


def grpc_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("A", list(a.shape), "FP32"), grpcclient.InferInput("B", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def metric(text: str, name: str, model: str) -> float:
    found = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.MULTILINE)
    assert found, f"{name} for {model} not in metrics"
    return float(found.group(1))


# --------------------------------------------------------------------------- tests


def test_ensemble_over_http(server: TritonServer) -> None:
    a, b = batch()
    result = http_infer(server.http_url, a, b)
    check_result(result.as_numpy("TOPK_IDX"), result.as_numpy("TOPK_SCORES"), result.as_numpy("RUNTIME"), a, b)


def test_ensemble_over_grpc(server: TritonServer) -> None:
    a, b = batch()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready() and client.is_model_ready("pipeline")
        result = client.infer("pipeline", grpc_inputs(a, b))
    check_result(result.as_numpy("TOPK_IDX"), result.as_numpy("TOPK_SCORES"), result.as_numpy("RUNTIME"), a, b)


def test_server_runs_the_generated_configs(server: TritonServer, repo: Path) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        served = client.get_model_config("add").config
    assert served.max_batch_size == MAX_BATCH
    assert served.dynamic_batching.max_queue_delay_microseconds == 20_000
    assert [w.name for w in served.model_warmup] == ["zeros"]
    assert load_config(repo / "pipeline") == pipeline_config()


def test_custom_config_name_picks_configs_file(install: ServerInstall, repo: Path, tmp_path: Path) -> None:
    """What the bundle's per-GPU engines rely on: --model-config-name=<name> loads
    configs/<name>.pbtxt where a model has one, config.pbtxt where it has not."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    pinned = add_config()
    pinned.dynamic_batching.max_queue_delay_microseconds = 5_000
    write_config(copy / "add", pinned, custom="h200")
    assert (copy / "add" / "configs" / "h200.pbtxt").is_file()
    custom = TritonServer(copy, install=install, startup_timeout_s=60, extra_args=["--model-config-name=h200"])
    with custom as srv, grpcclient.InferenceServerClient(srv.grpc_url) as client:
        assert client.get_model_config("add").config.dynamic_batching.max_queue_delay_microseconds == 5_000
        assert client.get_model_config("rank").config.max_batch_size == MAX_BATCH  # no configs/h200.pbtxt: default


def test_dynamic_batching_merges_concurrent_requests(server: TritonServer) -> None:
    done: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()
    count = 8
    a = np.ones((1, WIDTH), dtype=np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        before = client.get_inference_statistics("add").model_stats[0]
        inputs = grpc_inputs(a, a)
        for _ in range(count):
            client.async_infer("add", inputs, lambda result, error: done.put((result, error)))
        for _ in range(count):
            result, error = done.get(timeout=30)
            assert error is None and result is not None
            np.testing.assert_array_equal(result.as_numpy("SUM"), 2 * a)
        after = client.get_inference_statistics("add").model_stats[0]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == count
    assert executions < count, f"{count} requests ran in {executions} executions: not batched"


def test_metrics_port_serves_prometheus(server: TritonServer) -> None:
    a, b = batch()
    http_infer(server.http_url, a, b)
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            text = response.read().decode()
        if metric(text, "nv_inference_request_success", "pipeline") >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert metric(text, "nv_inference_request_success", "pipeline") >= 1


def test_malformed_request_is_refused_then_server_still_serves(server: TritonServer) -> None:
    a, b = batch()
    bad = np.ones((2, WIDTH + 1), dtype=np.float32)  # wrong width
    with pytest.raises(InferenceServerException) as http_error:
        http_infer(server.http_url, bad, bad)
    assert http_error.value.status() == "400"
    assert "shape" in http_error.value.message()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as grpc_error:
            client.infer("pipeline", grpc_inputs(bad, bad))
        assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT"
        result = client.infer("pipeline", grpc_inputs(a, b))
    check_result(result.as_numpy("TOPK_IDX"), result.as_numpy("TOPK_SCORES"), result.as_numpy("RUNTIME"), a, b)
    result = http_infer(server.http_url, a, b)
    check_result(result.as_numpy("TOPK_IDX"), result.as_numpy("TOPK_SCORES"), result.as_numpy("RUNTIME"), a, b)


def test_failed_model_load_quotes_server_log(install: ServerInstall, tmp_path: Path) -> None:
    broken = ModelConfig(
        name="broken",
        backend="python",
        max_batch_size=0,
        input=[tensor_input("X", "FP32", [1])],
        output=[tensor_output("Y", "FP32", [1])],
    )
    write_model(tmp_path, broken, BROKEN_PY)
    server = TritonServer(tmp_path, install=install, startup_timeout_s=60)
    with pytest.raises(ModelLoadError, match="No module named 'grc_no_such_module_for_triton_test'") as error:
        server.start()
    assert list(error.value.failures) == ["broken version 1"]
    assert not server.running


def test_port_in_use_is_reported(install: ServerInstall, repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"http port 127.0.0.1:{port} is already in use"):
            TritonServer(repo, install=install, http_port=port).start()


@pytest.mark.parametrize("service", ["grpc", "metrics"])
def test_port_taken_by_the_time_the_server_binds_is_reported(
    install: ServerInstall, repo: Path, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Skip the pre-check so the server itself meets the taken port: gRPC makes it exit, a taken
    # metrics port only makes it log and serve on; both must come back as PortInUseError.
    monkeypatch.setattr(tritonserver, "_check_port_free", lambda service, port: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(repo, install=install, **{f"{service}_port": port})
        try:
            server.start()
        except PortInUseError as error:
            message = str(error)
        else:
            server.stop()
            pytest.fail(f"server started although {service} port {port} was taken; its log:\n{server.logs()}")
    assert re.search(f"could not bind its {service} port: .*127.0.0.1:{port}", message), message
    assert not server.running


def test_config_text_roundtrips_and_mistakes_are_named(tmp_path: Path) -> None:
    config = pipeline_config()
    assert parse_config(render_config(config)) == config
    with pytest.raises(ModelConfigError, match=r"<config>:2:\d+"):
        parse_config('name: "x"\nmax_batch_sise: 4\n')
    wrong = pipeline_config()
    wrong.ensemble_scheduling.step[1].input_map["SCORES"] = "summ"
    with pytest.raises(ModelConfigError, match="reads 'summ', which nothing before it produces"):
        render_config(wrong)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.pbtxt").write_text(render_config(add_config()))
    with pytest.raises(ModelConfigError, match="differs from its model directory"):
        load_config(tmp_path / "other")
