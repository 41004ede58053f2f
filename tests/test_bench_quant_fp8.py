"""bench/gpu_run_fp8.sh's CPU dry run (bench/quant_fp8.py --smoke): the device script's own code on
hstu-tiny, so the one H200 call does not discover a broken bench. Real _scaled_mm (CPU), real ranking."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fp8_bench_dry_run_writes_modes_ranking_and_what_it_skipped(tmp_path: Path) -> None:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", "bench/gpu_run_fp8.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads((tmp_path / "quant-fp8-dry-run.json").read_text())
    assert len(data["source_sha256"]) == 64 and data["smoke"] is True
    spec = data["specs"]["hstu-tiny"]
    assert "errors" not in spec, spec.get("errors")
    # eager and torch.compile'd (session 6's compiled modes died tracing autograd through _scaled_mm)
    assert set(spec["modes"]) == {"eager_bf16", "eager_fp8", "eager_fp8_all", "compiled_bf16", "compiled_fp8"}
    assert all(m["p50_ms"] > 0 and m["samples"] >= 10 for m in spec["modes"].values())
    assert spec["modes"]["compiled_bf16"]["compile_s"] > 0
    assert "GPU figures" in spec["skipped"]["gemm"] and "--smoke" in spec["skipped"]["compiled_fp8_all"]
    for label in ("fp8", "fp8_all"):
        assert spec["agreement"][label]["finite"] and 0 < spec["agreement"][label]["max_abs_vs_bf16"] < 0.1
    ranking = spec["ranking"]
    for label in ("bf16", "fp8", "fp8_all"):
        figures = ranking[label]["figures"]
        assert {f["task"] for f in figures} == {"ctr", "engagement"}
        assert ranking[label]["passed"] == all(f["ok"] for f in figures)
    # fp8 moves the scores more than bf16 does, every GEMM in fp8 more than the package's: the figures
    # measure the precision
    worst = {label: max(f["mean_abs"] for f in ranking[label]["figures"]) for label in ("bf16", "fp8", "fp8_all")}
    assert 0 < worst["bf16"] < worst["fp8"] < worst["fp8_all"]
    layers = 2  # hstu-tiny
    assert len(spec["fp8"]["scales"]) == layers and len(spec["fp8_all"]["scales"]) == 2 * layers + 1
    assert spec["fp8"]["calibration"]["seed"] == 20261202
    assert (tmp_path / "quant-fp8-dry-run.log").read_text().count("ranking") >= 3


def test_a_compiled_bench_model_runs_with_grad_mode_on() -> None:
    """A CUDA graph capture calls the compiled model outside no_grad (session 6): with parameters
    that require grad, torch.compile then traces the backward and fails on _scaled_mm, which has
    none. The bench freezes its models first; on the CPU the same call shows the same failure."""
    import copy
    import sys

    import pytest
    import torch

    sys.path.append(str(REPO / "bench"))  # after the repository: bench/kernels.py must not shadow kernels/
    from quant_fp8 import compiled_run

    from grc.aoti.inputs import random_inputs, seeded_dense
    from grc.aoti.model import JaggedDense
    from grc.engine.aoti_quality import fp8_package_model
    from grc.spec.loader import load_spec

    spec = load_spec(REPO / "specs" / "hstu-tiny.yaml").spec
    dense = seeded_dense(spec.model)
    model = JaggedDense(fp8_package_model(dense, spec)[0].to(torch.bfloat16), "pytorch")
    args = random_inputs(spec.model, 2, 6, 4, torch.Generator().manual_seed(1)).to("cpu", torch.bfloat16).args()
    assert any(p.requires_grad for p in model.parameters())  # as JaggedDense builds it
    unfrozen = copy.deepcopy(model)
    run, _ = compiled_run(model, args, torch.device("cpu"))
    with torch.enable_grad():
        out = run()
    assert out.shape == (args[0].shape[0], len(spec.model.tasks)) and not out.requires_grad
    # what the bench did before: compiled the model as built, called it with grad mode on
    with torch.enable_grad(), pytest.raises(Exception, match="derivative for aten::_scaled_mm is not implemented"):
        torch.compile(unfrozen, dynamic=False)(*args)


def test_gemm_part_runs_each_gemm_and_takes_the_uvqk_one_apart_on_the_cpu() -> None:
    """bench/quant_fp8_gemm.py with the CPU's _scaled_mm and a wall-clock timer: the code the H200 run
    calls, so a bug in it does not cost the device call; its figures are GPU figures (not asserted)."""
    import sys
    import time

    import torch

    sys.path.append(str(REPO / "bench"))  # after the repository: bench/kernels.py must not shadow kernels/
    from quant_fp8_gemm import amdahl, gemm_bench, gemm_linears

    from grc.aoti.inputs import seeded_dense
    from grc.engine.aoti_quality import fp8_package_model
    from grc.model.fp8 import KINDS
    from grc.spec.loader import load_spec

    spec = load_spec(REPO / "specs" / "hstu-tiny.yaml").spec
    dense = seeded_dense(spec.model)

    def timer(fn, args):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(*args)
        assert torch.isfinite(out.float()).all()
        return {"p50_ms": (time.perf_counter() - t) * 1e3 + 1e-6}

    got = gemm_bench(gemm_linears(dense, fp8_package_model(dense, spec, KINDS)[0]), 64, torch.device("cpu"), timer)
    d, layers = spec.model.d_model, spec.model.hstu.num_layers
    assert got["uvqk"]["shape"] == [64, d, 4 * spec.model.hstu.linear_dim] and got["uvqk"]["per_forward"] == layers
    assert got["heads"]["shape"] == [64, d, len(spec.model.tasks) * spec.model.head_hidden]
    parts = ("bf16", "fp8", "quantize", "rowwise_fast", "rowwise_slow", "tensorwise_fast")
    assert all("p50_ms" in got["uvqk"][p] for p in parts), {p: got["uvqk"][p] for p in parts}
    assert all(g["speedup_fp8"] > 0 for g in got.values())
    bound = amdahl(got, eager_bf16_ms=1000.0)
    assert 0 < bound["gemm_share_of_eager_bf16"] < 1 and bound["eager_speedup_bound_all_fp8"] > 0


def test_emulated_gemm_sets_are_gated_with_the_package_set_among_them(tmp_path: Path) -> None:
    """bench/quant_fp8_emulate.py (mtgr-small: a one-off run, bench/results/quant-notes.md) on hstu-tiny:
    every variant scored by the gates, the package's set among them and passing, each fp8 set moving the
    scores more than bf16 and every GEMM in fp8 more than the package's output GEMMs alone."""
    out = tmp_path / "emulated.json"
    done = subprocess.run(
        ["python", "bench/quant_fp8_emulate.py", "--spec", "hstu-tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    variants = json.loads(out.read_text())["variants"]
    assert variants["fp8 out (the package)"]["fp8_gemms"] == ["out"] and variants["fp8 out (the package)"]["passed"]
    mean = {k: max(f["mean_abs"] for f in v["figures"]) for k, v in variants.items()}
    assert len(mean) == 5 and 0 < mean["bf16"] < mean["fp8 out (the package)"] < mean["fp8 all"]
    assert all(v["passed"] == all(f["ok"] for f in v["figures"]) for v in variants.values())
