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


def cpu_variant(folder: Path) -> Path:
    """mtgr-tiny-gpu as KIND_CPU (aoti cpu package, no graphs): the served flow on a host without a GPU
    (the device script's dry run)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mtgr-tiny-cpuvariant.yaml"
    path.write_text(
        f"extends: {GPU_SPEC}\nname: mtgr-tiny-cpuvariant\nengine:\n  aoti: {{targets: [cpu]}}\n"
        "bundles:\n  triton: {instance_kind: KIND_CPU, gpus: [], gpu: {cuda_graphs: false}}\n"
    )
    return path


def build_bundle(work: Path, spec: Path = GPU_SPEC) -> tuple[Any, Path]:
    """(LoadedSpec, bundle folder) of ``spec`` (default mtgr-tiny-gpu) built under ``work``/artifacts."""
    from grc.build.progress import BuildRecords
    from grc.build.runner import build
    from grc.spec.loader import load_spec

    loaded = load_spec(spec)
    records = BuildRecords()
    code = build(loaded, work / "artifacts" / loaded.spec.name, only=["triton"], records=records)
    if code != 0:
        raise AssertionError(f"build of {spec.name} failed ({code}): {records.as_dict()}")
    return loaded, work / "artifacts" / loaded.spec.name / "triton"


def in_process(loaded: Any, bundle: Path, seed: int, device: str = "cuda:0") -> dict[str, Any]:
    """Each fused model folder's Ranker on ``device``, with its own config.pbtxt parameters."""
    from grc.serving.triton import bundle as bd
    from grc.serving.triton.model_config import load_config

    out = {}
    for backend, name in bd.load_description(bundle)["ensembles"].items():
        model_dir = bundle / bd.MODEL_REPOSITORY / name
        params = {k: v.string_value for k, v in load_config(model_dir).parameters.items()}
        out[backend] = fc.ranker_errors(
            loaded.path, model_dir / "1" / "weights", backend, seed, model_dir / "1", device=device, params=params
        )
    return out


def deploy(loaded: Any, work: Path, *flags: str) -> tuple[int, str]:
    """``grc deploy --target triton`` on the built bundle: its exit code and what it printed."""
    from grc.cli import main

    text = io.StringIO()
    old = Path.cwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            code = main(["deploy", "--target", "triton", str(loaded.path), "--timeout", "240", *flags])
    finally:
        os.chdir(old)
    return code, text.getvalue()


def served(loaded: Any, bundle: Path, seed: int, ports: dict[str, int]) -> dict[str, Any]:
    """Requests of one and of two users to every model over gRPC vs float64 (the served tolerance) on the
    server ``grc deploy --detach`` left running (``ports``), and the graph metrics."""
    import numpy as np

    from grc.serving.common import request as rq
    from grc.serving.triton import bundle as bd
    from grc.serving.triton import check, load

    spec = loaded.spec
    description = bd.load_description(bundle)
    tolerance = bd.served_tolerance(description, spec)
    reference = check.Reference(spec.model, bundle / bd.MODEL_REPOSITORY / spec.name / "1" / "weights")
    weights = rq.rank_weights(spec.model, spec.bundles.triton)
    pool = load.request_pool(spec.model, 12, seed=seed, max_history=60, max_candidates=20)
    requests = [*pool[:10], rq.stack_requests([pool[10], pool[10]])]
    out: dict[str, Any] = {"tolerance": tolerance.model_dump(), "models": {}}
    grpc_url, metrics_url = f"127.0.0.1:{ports['grpc']}", f"http://127.0.0.1:{ports['metrics']}/metrics"
    for backend, name in description["ensembles"].items():
        worst, problems = 0.0, []
        for arrays in requests:
            got = check.infer(grpc_url, "grpc", name, arrays)
            expected = reference.scores(arrays)
            worst = max(worst, float(np.abs(got["scores"] - expected).max() / np.abs(expected).max()))
            problems += check.check_response(
                got, expected, arrays, spec.model, weights, spec.bundles.triton.top_k, tolerance
            ).problems
        out["models"][backend] = {"name": name, "rel_err": worst, "problems": problems[:5]}
    text = check.metrics_text(metrics_url)
    for backend, name in description["ensembles"].items():
        out["models"][backend]["metrics"] = {
            m: check.metric(text, m, name)
            for m in ("grc_cuda_graph_hits_total", "grc_cuda_graph_misses_total", "grc_padded_tokens_total")
        }
        out["models"][backend]["gpu_utilization_metric"] = "nv_gpu_utilization" in text
    return out


def served_on_gpu(work: Path, seed: int, spec: Path = GPU_SPEC, device: str = "cuda:0") -> dict[str, Any]:
    """Build, in-process, then ``grc deploy --detach`` (start, smoke test, endpoints), the served checks on
    that server, and ``grc deploy --stop``: one server start. (``spec``/``device``: a KIND_CPU variant
    runs the same flow on a CPU host.)"""
    import json

    from grc.deploy.triton import STATE

    loaded, bundle = build_bundle(work, spec)
    result: dict[str, Any] = {"in_process": in_process(loaded, bundle, seed, device)}
    code, text = deploy(loaded, work, "--detach")
    result["deploy"] = {"exit": code, "output_tail": text[-3000:]}
    if code != 0:
        return result
    try:
        state = json.loads((bundle.parent / STATE).read_text())
        result["served"] = served(loaded, bundle, seed, state["ports"])
    finally:
        stop, said = deploy(loaded, work, "--stop")
        result["stop"] = {"exit": stop, "output_tail": said[-1000:]}
    return result


def assert_served(result: dict[str, Any], seed: int, graphs: bool = True) -> None:
    """``graphs``: CUDA graphs expected (KIND_GPU); without, no hits anywhere."""
    for backend, r in result["in_process"].items():
        assert not r["problems"], f"seed={seed} in-process {backend}: {r}"
        if graphs and backend in ("aotinductor", "pytorch_kernels"):
            assert r["stats"]["graph_hits"] > 0 and r["stats"]["graph_misses"] == 0, (backend, r["stats"])
        else:
            assert r["stats"]["graph_hits"] == 0, (backend, r["stats"])  # the eager baseline captures nothing
    assert result["deploy"]["exit"] == 0, result["deploy"]["output_tail"]
    assert result["stop"]["exit"] == 0, result["stop"]["output_tail"]
    for backend, r in result["served"]["models"].items():
        assert not r["problems"], f"seed={seed} served {backend}: {r}"
        hits = r["metrics"]["grc_cuda_graph_hits_total"]
        if graphs and backend in ("aotinductor", "pytorch_kernels"):
            assert hits and hits > 0 and r["metrics"]["grc_cuda_graph_misses_total"] == 0, (backend, r["metrics"])
        else:
            assert hits == 0, (backend, r["metrics"])
