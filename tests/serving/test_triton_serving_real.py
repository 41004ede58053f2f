"""The hstu-tiny (and mtgr-tiny) triton bundle on a REAL tritonserver, over HTTP and gRPC.

Every score is checked against the PyTorch model (float64); malformed requests get clear errors
and the server serves on; concurrent requests batch without changing any score; a bounded load
test (2,000 requests at concurrency 8, loopback) runs with zero errors and visible batching.
Skipped only where the server cannot be installed (no network to reach PyPI).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from grc.serving.common import request as rq
from grc.serving.triton import bundle as bd
from grc.serving.triton import check, load
from grc.serving.triton.server import ServerInstall, TritonServer
from grc.spec.loader import load_spec
from grc.spec.schema import Spec

pytestmark = pytest.mark.slow


class Served:
    def __init__(self, spec: Spec, folder: Path, server: TritonServer):
        self.spec, self.folder, self.server = spec, folder, server
        self.ensemble = bd.load_description(folder)["ensemble"]
        weights = folder / bd.MODEL_REPOSITORY / bd.PREPROCESS / "1" / "weights"
        self.reference = check.Reference(spec.model, weights)

    def url(self, protocol: str) -> str:
        return self.server.http_url if protocol == "http" else self.server.grpc_url

    def infer(self, protocol: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return check.infer(self.url(protocol), protocol, self.ensemble, arrays)

    def assert_right(self, arrays: dict[str, np.ndarray], response: dict[str, np.ndarray]) -> check.Check:
        result = check.spec_check(self.spec, response, self.reference.scores(arrays), arrays)
        assert result.ok, result.problems
        return result


def serve(install: ServerInstall, built: tuple[Path, Path]) -> Iterator[Served]:
    spec = load_spec(built[0]).spec
    folder = built[1] / spec.name / "triton"
    with TritonServer(folder / bd.MODEL_REPOSITORY, install=install, startup_timeout_s=120) as server:
        yield Served(spec, folder, server)
    assert not server.running


@pytest.fixture(scope="module")
def tiny(install: ServerInstall, built_tiny: tuple[Path, Path]) -> Iterator[Served]:
    yield from serve(install, built_tiny)


def requests_for(spec: Spec, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random users of varied lengths, plus a 2-user request and one whose history must be cut."""
    pool = load.request_pool(spec.model, count, seed=seed)
    pool.append(rq.stack_requests([pool[1], pool[1]]))
    long = dict(pool[0])
    h = spec.model.hstu.max_seq_len
    for t in spec.model.history:
        long[rq.history_input(t)] = np.resize(pool[0][rq.history_input(t)], (1, h))
    long[rq.HISTORY_TIME] = np.sort(np.resize(pool[0][rq.HISTORY_TIME], (1, h)), axis=1)
    pool.append(long)
    return pool


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_score_matches_pytorch(tiny: Served, protocol: str) -> None:
    worst = 0.0
    for arrays in requests_for(tiny.spec, 8, seed=11):
        result = tiny.assert_right(arrays, tiny.infer(protocol, arrays))
        worst = max(worst, result.max_abs)
    print(f"{protocol}: max |triton - pytorch| = {worst:.2e}")


def test_scores_do_not_depend_on_batch_mates(tiny: Served) -> None:
    pool = requests_for(tiny.spec, 15, seed=12)
    alone = [tiny.infer("grpc", arrays) for arrays in pool]
    before = check.batch_sizes(tiny.server.grpc_url, "dense_onnx")
    done: queue.Queue[tuple[int, grpcclient.InferResult | None, InferenceServerException | None]] = queue.Queue()
    with grpcclient.InferenceServerClient(tiny.server.grpc_url) as client:
        for i, arrays in enumerate(pool):  # all in flight at once: the batcher merges them
            client.async_infer(
                tiny.ensemble,
                check.infer_inputs(grpcclient, arrays),
                lambda result, error, i=i: done.put((i, result, error)),
            )
        together: dict[int, dict[str, np.ndarray]] = {}
        for _ in pool:
            i, result, error = done.get(timeout=60)
            assert error is None, error
            assert result is not None
            together[i] = {name: result.as_numpy(name) for name in rq.OUTPUTS}
    after = check.batch_sizes(tiny.server.grpc_url, "dense_onnx")
    batched = {b: n - before.get(b, 0) for b, n in after.items() if b > 1 and n > before.get(b, 0)}
    assert batched, f"no execution of dense_onnx took more than one request: {after}"
    for i, arrays in enumerate(pool):
        np.testing.assert_allclose(together[i]["scores"], alone[i]["scores"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(together[i]["ranked_candidates"], alone[i]["ranked_candidates"])
        tiny.assert_right(arrays, together[i])


# --------------------------------------------------------------------------- bad requests


def _without(arrays: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k != name}


def _empty_history(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[:, :0] if k.startswith("history") else v for k, v in arrays.items()}


BAD = {
    "wrong dtype": (
        lambda a: {**a, "history_item": a["history_item"].astype(np.int32)},
        "inference input 'history_item' data-type is 'INT32', but model 'hstu-tiny' expects 'INT64'",
    ),
    "wrong shape": (
        lambda a: {**a, "candidate_item": a["candidate_item"][:, :, None]},
        "unexpected shape for input 'candidate_item' for model 'hstu-tiny'",
    ),
    "unknown item id": (lambda a: {**a, "candidate_item": a["candidate_item"] + 1000}, "candidate_item: unknown id"),
    "empty history": (_empty_history, "empty history: history_item has no events"),
    "too many candidates": (
        lambda a: {**a, "candidate_item": np.zeros((1, 17), np.int64)},
        "too many candidates: 17 (model.max_candidates is 16)",
    ),
    "missing input": (lambda a: _without(a, "request_time"), "missing required input(s) ['request_time']"),
    "lengths disagree": (
        lambda a: {**a, "history_action": a["history_action"][:, :2]},
        "history_item 16, history_action 2",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_request_gets_a_clear_error_and_serving_goes_on(tiny: Served, case: str) -> None:
    make, message = BAD[case]
    good = bd.sample_request(tiny.spec)
    bad = make(dict(good))
    for protocol in ("http", "grpc"):
        with pytest.raises(InferenceServerException) as error:
            tiny.infer(protocol, bad)
        assert message in error.value.message(), error.value.message()
        assert error.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), error.value.status()
        tiny.assert_right(good, tiny.infer(protocol, good))


# --------------------------------------------------------------------------- metrics and load


def test_prometheus_metrics_count_requests_and_batches(tiny: Served) -> None:
    arrays = bd.sample_request(tiny.spec)
    for _ in range(3):
        tiny.infer("http", arrays)
    deadline = time.monotonic() + 10
    while True:
        text = check.metrics_text(tiny.server.metrics_url)
        success = check.metric(text, "nv_inference_request_success", tiny.ensemble) or 0
        if success >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert success >= 3
    for model in ("preprocess", "dense_onnx", "postprocess"):
        assert (check.metric(text, "nv_inference_exec_count", model) or 0) >= 1, model
    assert "nv_inference_queue_duration_us" in text


def test_bounded_load_with_zero_errors_and_dynamic_batching(tiny: Served) -> None:
    pool = load.request_pool(tiny.spec.model, 64, seed=5)
    result = load.run_load(
        tiny.server.grpc_url,
        tiny.server.metrics_url,
        tiny.ensemble,
        pool,
        requests=2000,
        concurrency=8,
        time_limit_s=90,
        models=("preprocess", "dense_onnx", "postprocess"),
    )
    s = result.summary()
    print(
        f"\nload: {result.completed} requests, concurrency 8, {s['requests_per_s']} requests/s, "
        f"p50 {s['latency_ms']['p50']} ms, p99 {s['latency_ms']['p99']} ms, errors {result.errors}, "
        f"dense_onnx batch sizes {s['batch_sizes']['dense_onnx']} (mean {s['mean_batch']['dense_onnx']})"
    )
    assert result.errors == 0, result.first_error
    assert not result.timed_out and result.completed == 2000
    dense = result.metrics["dense_onnx"]
    assert dense["nv_inference_count"] == 2000
    assert dense["nv_inference_exec_count"] < 2000 * 0.8, f"dynamic batching formed no batches: {dense}"
    assert max(result.batch_sizes["dense_onnx"]) > 1


# --------------------------------------------------------------------------- MTGR: profile + cross features


def test_mtgr_bundle_serves_profile_tables_and_cross_features(
    install: ServerInstall, built_mtgr_tiny: tuple[Path, Path]
) -> None:
    for served in serve(install, built_mtgr_tiny):
        names = [i["name"] for i in bd.load_description(served.folder)["request"]["inputs"]]
        assert names[:2] == ["profile_user", "profile_city"] and "cross_features" in names
        for i, arrays in enumerate(requests_for(served.spec, 4, seed=21)):
            served.assert_right(arrays, served.infer("http" if i % 2 else "grpc", arrays))
        bad = {**bd.sample_request(served.spec), "profile_city": np.array([[40]], np.int64)}
        with pytest.raises(InferenceServerException) as error:
            served.infer("http", bad)
        assert error.value.message().endswith("profile_city: unknown id 40: the city table has ids 0..39")
