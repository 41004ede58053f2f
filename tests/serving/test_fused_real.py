"""The fused pipeline (bundles.triton.pipeline: fused) on a REAL tritonserver, on CPU.

mtgr-tiny served as three fused python models (aotinductor: the aoti stage's cpu package; pytorch;
pytorch_kernels: grc's ops, their PyTorch reference on a CPU), KIND_CPU: every score of every
backend against the PyTorch model in float64 (verify.export), over HTTP and gRPC, requests of one
and of two users; a bad request in a concurrent batch fails alone; the Ranker called in-process on
the same model folder answers as the server does; the graph metrics are exported. And a KIND_GPU
bundle on this CUDA-less host: ``grc deploy`` refuses it naming why (Triton itself would only say
"has kind KIND_GPU but no GPUs are available").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from grc.serving.common import request as rq
from grc.serving.triton import bundle as bd
from grc.serving.triton import check, load
from grc.serving.triton.server import ServerInstall, TritonServer
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS, in_dir, run_build, write_spec

FUSED = {
    "engine.aoti": {"enabled": True, "targets": ["cpu"]},
    "bundles.triton": {
        "pipeline": "fused",
        "backend": "aotinductor",
        "extra_backends": ["pytorch", "pytorch_kernels"],
        "max_queue_delay_us": 20000,
    },
}


@pytest.fixture(scope="module")
def served(
    install: ServerInstall, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Path, TritonServer]]:
    folder = tmp_path_factory.mktemp("fused")
    spec_path = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", FUSED)
    statuses = run_build(spec_path, only=["triton"])
    assert statuses["aoti"] == "built" and statuses["triton"] == "built"
    spec = load_spec(spec_path).spec
    bundle = folder / "artifacts" / spec.name / "triton"
    with TritonServer(bundle / bd.MODEL_REPOSITORY, install=install, startup_timeout_s=240) as server:
        yield spec, bundle, server


def _requests(spec: Any) -> list[dict[str, np.ndarray]]:
    pool = load.request_pool(spec.model, 5, seed=17, max_history=40, max_candidates=20)
    return [*pool[:4], rq.stack_requests([pool[4], pool[4]])]


@pytest.mark.slow
def test_every_backend_served_matches_float64(served: tuple[Any, Path, TritonServer]) -> None:
    spec, bundle, server = served
    names = bd.load_description(bundle)["ensembles"]
    assert names == {
        "aotinductor": "mtgr-tiny",
        "pytorch": "mtgr-tiny-pytorch",
        "pytorch_kernels": "mtgr-tiny-pytorch_kernels",
    }
    assert sorted(p.name for p in (bundle / bd.MODEL_REPOSITORY).iterdir()) == sorted(names.values())
    reference = check.Reference(spec.model, bundle / bd.MODEL_REPOSITORY / "mtgr-tiny" / "1" / "weights")
    for backend, name in names.items():
        for i, arrays in enumerate(_requests(spec)):
            protocol, url = ("grpc", server.grpc_url) if i % 2 else ("http", server.http_url)
            result = check.spec_check(spec, check.infer(url, protocol, name, arrays), reference.scores(arrays), arrays)
            assert result.ok, (backend, protocol, result.problems)
        assert check.batch_sizes(server.grpc_url, name), f"{name} never executed"


@pytest.mark.slow
def test_a_bad_request_fails_alone(served: tuple[Any, Path, TritonServer]) -> None:
    """Sent together (the batcher waits 20 ms to merge them): the bad one gets 400 naming the problem,
    every good one its right answer."""
    spec, bundle, server = served
    reference = check.Reference(spec.model, bundle / bd.MODEL_REPOSITORY / "mtgr-tiny" / "1" / "weights")
    good = _requests(spec)[:4]
    bad = dict(good[0])
    bad["candidate_item"] = np.full_like(bad["candidate_item"], spec.model.tables["item"].vocab_size)
    answers: dict[int, Any] = {}

    def send(i: int, arrays: dict[str, np.ndarray]) -> None:
        try:
            answers[i] = check.infer(server.http_url, "http", "mtgr-tiny-pytorch", arrays)
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=send, args=(i, a)) for i, a in enumerate([*good, bad])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "bad request: candidate_item: unknown id 2000" in str(answers[4]), answers[4]
    for i, arrays in enumerate(good):
        assert isinstance(answers[i], dict), answers[i]
        assert check.spec_check(spec, answers[i], reference.scores(arrays), arrays).ok


@pytest.mark.slow
def test_in_process_ranker_answers_as_the_server(served: tuple[Any, Path, TritonServer]) -> None:
    from grc.serving.ranker.ranker import Ranker
    from grc.serving.triton.model_config import load_config

    spec, bundle, server = served
    for name in ("mtgr-tiny", "mtgr-tiny-pytorch"):
        model_dir = bundle / bd.MODEL_REPOSITORY / name
        params = {k: v.string_value for k, v in load_config(model_dir).parameters.items()}
        logs: list[str] = []
        ranker = Ranker.from_model_dir(model_dir / "1", "cpu", params, log=logs.append)
        if params["backend"] == "aotinductor":  # the load names the package's attention kernel (its metadata)
            assert "attention (the package): the grc::hstu_attention_reference op" in "\n".join(logs), logs
        requests = _requests(spec)
        local = ranker.rank([ranker.check(dict(r)) for r in requests])
        for arrays, mine in zip(requests, local, strict=True):
            theirs = check.infer(server.grpc_url, "grpc", name, arrays)
            assert set(mine) == set(theirs) == set(rq.OUTPUTS)
            for key in rq.OUTPUTS:
                assert mine[key].dtype == theirs[key].dtype and mine[key].shape == theirs[key].shape, key
            # the server may batch other requests alongside: float32 rounding only
            assert np.abs(mine["scores"] - theirs["scores"]).max() <= 1e-6
            assert np.array_equal(mine["ranked_items"], theirs["ranked_items"])
        assert ranker.stats()["requests"] == len(requests) and ranker.stats()["users"] == len(requests) + 1


@pytest.mark.slow
def test_graph_metrics_are_exported(served: tuple[Any, Path, TritonServer]) -> None:
    _, _, server = served
    text = check.metrics_text(server.metrics_url)
    for metric in ("grc_cuda_graph_hits_total", "grc_cuda_graph_misses_total", "grc_padded_tokens_total"):
        for model in ("mtgr-tiny", "mtgr-tiny-pytorch"):
            assert check.metric(text, metric, model) == 0.0, (metric, model)  # KIND_CPU: no graphs, no padding


@pytest.mark.slow
def test_kind_gpu_bundle_on_a_host_without_cuda_is_refused_naming_why(
    install: ServerInstall, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grc.cli import main
    from grc.serving.triton.server import ModelLoadError

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA: the refusal is for hosts without it")
    spec_path = write_spec(
        tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {"bundles.triton": {"instance_kind": "KIND_GPU", "backend": "pytorch"}}
    )
    run_build(spec_path, only=["triton"])
    with in_dir(tmp_path):
        assert main(["deploy", "--target", "triton", spec_path.name, "--timeout", "60"]) == 1
    err = capsys.readouterr().err
    assert "KIND_GPU python model(s) mtgr-tiny needs a CUDA GPU (torch.cuda.is_available() is False)" in err, err
    repo = tmp_path / "artifacts" / "mtgr-tiny" / "triton" / bd.MODEL_REPOSITORY
    with pytest.raises(ModelLoadError, match="has kind KIND_GPU but no GPUs are available"):  # Triton alone
        TritonServer(repo, install=install, startup_timeout_s=60).start()


@pytest.mark.slow
def test_targets_name_the_fused_model_serving_the_package(served: tuple[Any, Path, TritonServer]) -> None:
    """`grc inspect targets`: the aoti package a fused bundle serves is served by its fused model (the rows
    said "not served" when only dense_aoti counted)."""
    from grc.cli.targets import NOT_SERVED, target_rows

    _, bundle, _ = served
    rows = {(r["artifact"], r["target"]): r for r in target_rows(bundle.parent)}
    assert set(rows) == {("aotinductor", "cpu")}
    assert rows["aotinductor", "cpu"]["triton"] == "mtgr-tiny KIND_CPU"  # was NOT_SERVED
    assert NOT_SERVED not in {r["triton"] for r in rows.values()}


@pytest.mark.slow
def test_phase_metrics_split_execute_by_phase(served: tuple[Any, Path, TritonServer]) -> None:
    """grc_phase_*_seconds_total: the host time of execute() by phase, sent at most every PHASE_EVERY_S with the
    count of executes they cover (a request after that interval sends them: the figures are then current)."""
    import time

    from grc.serving.ranker.phases import PHASES
    from grc.serving.triton.models.fused import PHASE_EVERY_S

    spec, _, server = served
    for name in ("mtgr-tiny", "mtgr-tiny-pytorch"):
        for arrays in _requests(spec)[:2]:
            check.infer(server.grpc_url, "grpc", name, arrays)
        time.sleep(PHASE_EVERY_S + 0.1)
        check.infer(server.grpc_url, "grpc", name, _requests(spec)[2])
        text = check.metrics_text(server.metrics_url)
        executes = check.metric(text, "grc_phase_executes_total", name)
        assert executes is not None and executes >= 3  # (the load's warm-up sample counts too)
        seconds = {p: check.metric(text, f"grc_phase_{p}_seconds_total", name) for p in PHASES}
        assert None not in seconds.values(), seconds
        for phase in ("read", "check", "layout", "upload", "embed", "dense", "rank", "respond"):  # every execute
            assert (seconds[phase] or 0.0) > 0, (name, phase, seconds)
        assert check.metric(text, "grc_dense_device_seconds_total", name) == 0.0  # KIND_CPU: no CUDA events
