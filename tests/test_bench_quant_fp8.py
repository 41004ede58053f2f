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
    assert set(spec["modes"]) == {"eager_bf16", "eager_fp8"}
    assert all(m["p50_ms"] > 0 and m["samples"] >= 10 for m in spec["modes"].values())
    assert "GPU figures" in spec["skipped"]["gemm, compiled"]
    assert spec["agreement"]["finite"] and 0 < spec["agreement"]["max_abs_fp8_vs_bf16"] < 0.1
    ranking = spec["ranking"]
    for label in ("bf16", "fp8"):
        figures = ranking[label]["figures"]
        assert {f["task"] for f in figures} == {"ctr", "engagement"}
        assert ranking[label]["passed"] == all(f["ok"] for f in figures)
    # fp8 moves the scores more than bf16 does: the figures measure the precision
    worst = {label: max(f["mean_abs"] for f in ranking[label]["figures"]) for label in ("bf16", "fp8")}
    assert 0 < worst["bf16"] < worst["fp8"]
    assert len(spec["fp8"]["scales"]) == 5 and spec["fp8"]["calibration"]["seed"] == 20261202
    assert (tmp_path / "quant-fp8-dry-run.log").read_text().count("ranking") >= 2
