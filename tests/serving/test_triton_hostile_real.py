"""The hstu-tiny triton bundle on a REAL tritonserver, called the way a hostile client would (issue 15).

Clients can reach the ensemble's internal steps (preprocess, dense_onnx, postprocess) directly: a bad call
must fail alone (never the other requests of its dynamic batch), with a 400 naming the problem and no
server path. Timestamps outside the stated range are refused; inside it every edge scores like PyTorch.
The history kept does not depend on the candidate count, and truncation keeps the newest events by time.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from grc.serving.common import request as rq
from grc.serving.common import validate
from grc.serving.triton import bundle as bd
from grc.serving.triton import check
from grc.serving.triton.server import ServerInstall, TritonServer
from tests.serving.test_triton_serving_real import Served, serve

pytestmark = pytest.mark.slow
SERVER_PATHS = ("/tmp", "/root", "/work", "/home", "/usr", ".py")


@pytest.fixture(scope="module")
def tiny(install: ServerInstall, built_tiny: tuple[Path, Path]) -> Iterator[Served]:
    yield from serve(install, built_tiny)


def post(server: TritonServer, model: str, body: str | dict) -> tuple[int, dict]:
    """A raw KServe v2 JSON POST: what curl sends. Returns (status, JSON body)."""
    host, port = server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body if isinstance(body, str) else json.dumps(body))
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def tensor(name: str, array: np.ndarray) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": check.WIRE[array.dtype],
            "data": array.reshape(-1).tolist()}  # fmt: skip


def direct(served: Served, model: str, arrays: dict[str, np.ndarray]) -> InferenceServerException:
    """A gRPC call straight to an internal step (raw bytes: NaN travels); returns the error it must get."""
    with grpcclient.InferenceServerClient(served.server.grpc_url) as client, pytest.raises(
            InferenceServerException) as error:  # fmt: skip
        client.infer(model, check.infer_inputs(grpcclient, arrays))
    return error.value


def no_server_paths(message: str) -> bool:
    return not any(p in message for p in SERVER_PATHS)


# --------------------------------------------------------------------------- internal steps


BAD_POSTPROCESS = {  # the call: IndexError in postprocess failed its whole batch, with file paths
    "inputs": [tensor("scores", np.zeros((1, 2, 2), np.float32)), tensor("lengths", np.array([[1]], np.int64)),
               tensor("num_candidates", np.array([[5]], np.int64)),
               tensor("candidate_ids", np.zeros((1, 5), np.int64))]}  # fmt: skip


def test_a_bad_direct_call_fails_alone_amid_normal_traffic(tiny: Served) -> None:
    """2 threads send the bad postprocess call, 6 send normal ensemble requests: 0 normal requests fail."""
    pool = rq.stack_requests([bd.sample_request(tiny.spec)])
    body = {"inputs": rq.as_json_inputs(pool, tiny.spec.model)}
    done = threading.Event()
    normal: list[int] = []
    bad: list[tuple[int, str]] = []

    def client() -> None:
        for _ in range(40):
            status, data = post(tiny.server, tiny.ensemble, body)
            normal.append(status)
            if status != 200:
                bad.append((status, str(data)))

    def attacker() -> None:
        while not done.is_set():
            status, data = post(tiny.server, "postprocess", BAD_POSTPROCESS)
            bad.append((status, data.get("error", "")))

    attackers = [threading.Thread(target=attacker) for _ in range(2)]
    clients = [threading.Thread(target=client) for _ in range(6)]
    for t in attackers + clients:
        t.start()
    for t in clients:
        t.join()
    done.set()
    for t in attackers:
        t.join()
    assert normal.count(200) == 240, [b for b in bad if "postprocess" not in b[1]][:3]
    assert bad and all(status == 400 for status, _ in bad), bad[:3]
    message = bad[0][1]
    assert "lengths 1 and num_candidates 5 must satisfy 1 <= num_candidates < lengths <= 2" in message, message
    assert no_server_paths(message), message
    print(f"\n240/240 normal requests answered while {len(bad)} bad direct calls were refused")


def _dense(served: Served, users: int = 1, tokens: int = 4) -> dict[str, np.ndarray]:
    d = served.spec.model.d_model
    return {"tokens": np.zeros((users, tokens, d), np.float32),
            "timestamps": np.arange(users * tokens, dtype=np.int64).reshape(users, tokens),
            "lengths": np.full((users, 1), tokens, np.int64),
            "num_candidates": np.ones((users, 1), np.int64)}  # fmt: skip


def _nan_tokens(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    a["tokens"][0, 1, 0] = np.nan
    return a


DIRECT: dict[str, tuple[str, Callable[[Served], dict[str, np.ndarray]], str]] = {
    "postprocess reads rows it was not sent": ("postprocess", lambda s: {
        "scores": np.zeros((1, 3, 2), np.float32), "lengths": np.array([[1]], np.int64),
        "num_candidates": np.array([[2]], np.int64), "candidate_ids": np.zeros((1, 2), np.int64)},
        "user 0: lengths 1 and num_candidates 2 must satisfy 1 <= num_candidates < lengths <= 3"),
    "postprocess NaN scores": ("postprocess", lambda s: {
        "scores": np.full((1, 3, 2), np.nan, np.float32), "lengths": np.array([[3]], np.int64),
        "num_candidates": np.array([[1]], np.int64), "candidate_ids": np.zeros((1, 1), np.int64)},
        "scores: values must be finite"),
    "dense NaN tokens": ("dense_onnx", lambda s: _nan_tokens(_dense(s)), "tokens: values must be finite"),
    "dense lengths past the tokens": ("dense_onnx", lambda s: {**_dense(s), "lengths": np.array([[9]], np.int64)},
                                      "lengths 9 and num_candidates 1 must satisfy"),
    "dense too long for the model": ("dense_onnx", lambda s: _dense(s, tokens=65),
                                     "1 <= num_candidates < lengths <= 64 (65 tokens sent, max_seq_len 64)"),
    "dense timestamps out of range": ("dense_onnx", lambda s: {**_dense(s), "timestamps": np.full(
        (1, 4), -(2**63), np.int64)}, "timestamps: timestamp -9223372036854775808 is outside the accepted range"),
    "preprocess request_time out of range": ("preprocess", lambda s: {
        **bd.sample_request(s.spec), "request_time": np.array([[2**63 - 1]], np.int64)},
        "request_time: timestamp 9223372036854775807 is outside the accepted range [-2**61, 2**61 - 1] seconds"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DIRECT))
def test_direct_calls_with_garbage_get_a_clear_400(tiny: Served, case: str) -> None:
    model, make, message = DIRECT[case]
    error = direct(tiny, model, make(tiny))
    assert error.status() == "StatusCode.INVALID_ARGUMENT", (error.status(), error.message())
    assert message in error.message() and no_server_paths(error.message()), error.message()
    good = bd.sample_request(tiny.spec)
    tiny.assert_right(good, tiny.infer("grpc", good))  # and it serves on


# --------------------------------------------------------------------------- timestamps


def _with_times(served: Served, history: int, request_time: int) -> dict[str, np.ndarray]:
    arrays = bd.sample_request(served.spec)
    arrays[rq.HISTORY_TIME] = np.full_like(arrays[rq.HISTORY_TIME], history)
    arrays[rq.REQUEST_TIME] = np.array([[request_time]], np.int64)
    return arrays


@pytest.mark.parametrize(("history", "request_time"), [(-1, 0), (0, 2**31 - 1), (validate.TIME_MIN, validate.TIME_MAX),
                                                       (validate.TIME_MAX, validate.TIME_MIN)])  # fmt: skip
def test_timestamps_inside_the_range_score_like_pytorch(tiny: Served, history: int, request_time: int) -> None:
    arrays = _with_times(tiny, history, request_time)
    for protocol in ("http", "grpc"):
        tiny.assert_right(arrays, tiny.infer(protocol, arrays))


@pytest.mark.parametrize(("history", "request_time", "field"), [(-(2**63), 2**63 - 1, "history_timestamps"),
                                                                (0, 2**63 - 1, "request_time")])  # fmt: skip
def test_timestamps_outside_the_range_are_refused(tiny: Served, history: int, request_time: int, field: str) -> None:
    """History at INT64_MIN and the request at INT64_MAX: the gap wrapped into a small bucket (200, wrong scores)."""
    for protocol in ("http", "grpc"):
        with pytest.raises(InferenceServerException) as error:
            tiny.infer(protocol, _with_times(tiny, history, request_time))
        assert error.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
        assert f"{field}: timestamp" in error.value.message()
        assert "outside the accepted range [-2**61, 2**61 - 1] seconds" in error.value.message()


# --------------------------------------------------------------------------- history kept


def _user(served: Served, history: int, candidates: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cfg = served.spec.model
    arrays = bd.sample_request(served.spec)
    for t in cfg.history:
        arrays[rq.history_input(t)] = rng.integers(0, cfg.tables[t].vocab_size, (1, history))
    arrays[rq.HISTORY_TIME] = np.sort(rng.integers(1_000, 10**6, (1, history)))
    for t in cfg.candidate:
        arrays[rq.candidate_input(t)] = rng.integers(0, cfg.tables[t].vocab_size, (1, candidates))
    return arrays


def test_a_score_does_not_depend_on_the_other_candidates_at_the_length_limit(tiny: Served) -> None:
    """60 events (more than the 48 kept): candidate 0 alone and among 16 gets the same score (was 8.2e-3 apart)."""
    many = _user(tiny, 60, tiny.spec.model.max_candidates, seed=3)
    alone = {**many, "candidate_item": many["candidate_item"][:, :1]}
    together, single = tiny.infer("grpc", many), tiny.infer("grpc", alone)
    np.testing.assert_allclose(together["scores"][:, :1], single["scores"], rtol=0, atol=1e-6)
    tiny.assert_right(many, together)


def test_truncation_keeps_the_newest_events_by_time(tiny: Served) -> None:
    """A 64-event history sent out of time order scores as the 48 newest events alone, in request order."""
    arrays = _user(tiny, 64, 4, seed=4)
    order = np.random.default_rng(5).permutation(64)
    shuffled = {k: (v[:, order] if k.startswith("history") else v) for k, v in arrays.items()}
    keep = np.sort(np.argsort(shuffled[rq.HISTORY_TIME][0])[-48:])
    newest = {k: (v[:, keep] if k.startswith("history") else v) for k, v in shuffled.items()}
    np.testing.assert_array_equal(tiny.infer("grpc", shuffled)["scores"], tiny.infer("grpc", newest)["scores"])


# --------------------------------------------------------------------------- HTTP status codes


def test_http_status_codes_are_what_the_readme_says(tiny: Served) -> None:
    """400 where our code answers; the server's own JSON parser answers malformed bodies (the README says how)."""
    arrays = bd.sample_request(tiny.spec)
    unknown = {**arrays, "candidate_item": arrays["candidate_item"] + 1000}
    status, data = post(tiny.server, tiny.ensemble, {"inputs": rq.as_json_inputs(unknown, tiny.spec.model)})
    assert status == 400 and "candidate_item: unknown id" in data["error"], (status, data)
    too_many = rq.stack_requests([arrays] * 9)  # max_batch_size 8: Triton's own check
    status, data = post(tiny.server, tiny.ensemble, {"inputs": rq.as_json_inputs(too_many, tiny.spec.model)})
    assert status == 400 and "batch-size must be <= 8" in data["error"], (status, data)
    readme = " ".join((tiny.folder / "README.md").read_text().split())
    status, data = post(tiny.server, tiny.ensemble, "{not json")
    assert f"this server answers malformed HTTP bodies with {status}" in readme, (status, data)
    inputs = rq.as_json_inputs(arrays, tiny.spec.model)
    inputs[0]["data"] = inputs[0]["data"][:-1]  # one value short of its shape
    status, data = post(tiny.server, tiny.ensemble, {"inputs": inputs})
    assert f"this server answers malformed HTTP bodies with {status}" in readme, (status, data)
    tiny.assert_right(arrays, tiny.infer("http", arrays))
