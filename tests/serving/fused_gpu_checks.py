"""The fused pipeline served on a GPU, end to end: shared by tests/serving/test_fused_gpu_real.py
(pytest, GPU hosts) and bench/fused_gpu_check.py (the device script, where pytest may be absent).

``served_on_gpu`` builds tests/specs/mtgr-tiny-gpu.yaml (aoti CUDA package, KIND_GPU fused models),
runs every model folder's Ranker in-process on cuda:0, deploys the bundle with ``grc deploy`` (smoke
test vs float64 at the served tolerance), then serves it and checks requests, graph hits and metrics.
``assert_served`` states what must hold.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from tests.serving import fused_checks as fc

GPU_SPEC = fc.REPO / "tests" / "specs" / "mtgr-tiny-gpu.yaml"


def build_bundle(work: Path) -> tuple[Any, Path]:
    """(LoadedSpec, bundle folder) of mtgr-tiny-gpu built under ``work``/artifacts."""
    from grc.build.progress import BuildRecords
    from grc.build.runner import build
    from grc.spec.loader import load_spec

    loaded = load_spec(GPU_SPEC)
    records = BuildRecords()
    code = build(loaded, work / "artifacts" / loaded.spec.name, only=["triton"], records=records)
    if code != 0:
        raise AssertionError(f"build of {GPU_SPEC.name} failed ({code}): {records.as_dict()}")
    return loaded, work / "artifacts" / loaded.spec.name / "triton"


def in_process(loaded: Any, bundle: Path, seed: int) -> dict[str, Any]:
    """Each fused model folder's Ranker on cuda:0, with its own config.pbtxt parameters."""
    from grc.serving.triton import bundle as bd
    from grc.serving.triton.model_config import load_config

    out = {}
    for backend, name in bd.load_description(bundle)["ensembles"].items():
        model_dir = bundle / bd.MODEL_REPOSITORY / name
        params = {k: v.string_value for k, v in load_config(model_dir).parameters.items()}
        out[backend] = fc.ranker_errors(GPU_SPEC, model_dir / "1" / "weights", backend, seed, model_dir / "1",
                                        device="cuda:0", params=params)
    return out


def deploy(loaded: Any, work: Path) -> tuple[int, str]:
    """``grc deploy --target triton`` on the built bundle: its exit code and what it printed."""
    from grc.cli import main

    text = io.StringIO()
    old = Path.cwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            code = main(["deploy", "--target", "triton", str(loaded.path), "--timeout", "240"])
    finally:
        os.chdir(old)
    return code, text.getvalue()


def served(loaded: Any, bundle: Path, seed: int) -> dict[str, Any]:
    """Requests of one and of two users to every model over gRPC vs float64 (the served tolerance),
    the graph metrics, and Triton's instance placement."""
    import numpy as np

    from grc.serving.common import request as rq
    from grc.serving.triton import bundle as bd
    from grc.serving.triton import check, load
    from grc.serving.triton.server import TritonServer, ensure_tritonserver

    spec = loaded.spec
    description = bd.load_description(bundle)
    tolerance = bd.served_tolerance(description, spec)
    reference = check.Reference(spec.model, bundle / bd.MODEL_REPOSITORY / spec.name / "1" / "weights")
    weights = rq.rank_weights(spec.model, spec.bundles.triton)
    pool = load.request_pool(spec.model, 12, seed=seed, max_history=60, max_candidates=20)
    requests = [*pool[:10], rq.stack_requests([pool[10], pool[10]])]
    out: dict[str, Any] = {"tolerance": tolerance.model_dump(), "models": {}}
    with TritonServer(bundle / bd.MODEL_REPOSITORY, install=ensure_tritonserver(), startup_timeout_s=300) as server:
        for backend, name in description["ensembles"].items():
            worst, problems = 0.0, []
            for arrays in requests:
                got = check.infer(server.grpc_url, "grpc", name, arrays)
                expected = reference.scores(arrays)
                worst = max(worst, float(np.abs(got["scores"] - expected).max() / np.abs(expected).max()))
                problems += check.check_response(got, expected, arrays, spec.model, weights, spec.bundles.triton.top_k,
                                                 tolerance).problems
            out["models"][backend] = {"name": name, "rel_err": worst, "problems": problems[:5]}
        text = check.metrics_text(server.metrics_url)
        for backend, name in description["ensembles"].items():
            out["models"][backend]["metrics"] = {
                m: check.metric(text, m, name)
                for m in ("grc_cuda_graph_hits_total", "grc_cuda_graph_misses_total", "grc_padded_tokens_total")}
            out["models"][backend]["gpu_utilization_metric"] = "nv_gpu_utilization" in text
    return out


def served_on_gpu(work: Path, seed: int) -> dict[str, Any]:
    loaded, bundle = build_bundle(work)
    result: dict[str, Any] = {"in_process": in_process(loaded, bundle, seed)}
    code, text = deploy(loaded, work)
    result["deploy"] = {"exit": code, "output_tail": text[-3000:]}
    result["served"] = served(loaded, bundle, seed)
    return result


def assert_served(result: dict[str, Any], seed: int) -> None:
    for backend, r in result["in_process"].items():
        assert not r["problems"], f"seed={seed} in-process {backend}: {r}"
        if backend in ("aotinductor", "pytorch_kernels"):
            assert r["stats"]["graph_hits"] > 0 and r["stats"]["graph_misses"] == 0, (backend, r["stats"])
        else:
            assert r["stats"]["graph_hits"] == 0, (backend, r["stats"])  # the eager baseline captures nothing
    assert result["deploy"]["exit"] == 0, result["deploy"]["output_tail"]
    for backend, r in result["served"]["models"].items():
        assert not r["problems"], f"seed={seed} served {backend}: {r}"
        hits = r["metrics"]["grc_cuda_graph_hits_total"]
        if backend in ("aotinductor", "pytorch_kernels"):
            assert hits and hits > 0 and r["metrics"]["grc_cuda_graph_misses_total"] == 0, (backend, r["metrics"])
        else:
            assert hits == 0, (backend, r["metrics"])
