"""bench/serve.py on the CPU: its request pool, and its main path end to end against the real tritonserver on
a tiny fused spec (the GPU specs' three backends on KIND_CPU), so a device run does not discover a broken
bench. The figures are CPU figures; what is checked is that every mode ran, was checked and was recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grc.serving.common import request as rq
from grc.serving.common.validate import parse
from grc.spec.loader import load_spec
from tests.conftest import REPO, TEST_SPECS

sys.path.insert(0, str(REPO / "bench"))
from serve_pool import request_pool, size_ranges

FUSED_CPU = TEST_SPECS / "mtgr-tiny-fused-cpu.yaml"


def test_request_pool_draws_realistic_valid_requests_reproducibly() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    (h_lo, h_hi), (c_lo, c_hi) = size_ranges(cfg)
    assert (h_lo, h_hi) == (50, rq.max_history(cfg)) and (c_lo, c_hi) == (16, cfg.max_candidates)
    pool = request_pool(cfg, 64, seed=5)
    histories = [r[rq.HISTORY_TIME].shape[1] for r in pool]
    candidates = [r[rq.candidate_input(cfg.candidate[0])].shape[1] for r in pool]
    assert h_lo <= min(histories) and max(histories) <= h_hi and len(set(histories)) > 5
    assert c_lo <= min(candidates) and max(candidates) <= c_hi and len(set(candidates)) > 3
    for r in pool:
        for t in cfg.profile:
            assert r[rq.profile_input(t)].min() >= 0 and r[rq.profile_input(t)].max() < cfg.tables[t].vocab_size
        for t in cfg.history:
            assert r[rq.history_input(t)].max() < cfg.tables[t].vocab_size
        times = r[rq.HISTORY_TIME][0]
        assert (np.diff(times) >= 0).all() and times[-1] < r[rq.REQUEST_TIME][0, 0]
        parse(dict(r), cfg, truncate=False)  # the server's own checks accept it, nothing cut
    again = request_pool(cfg, 64, seed=5)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(pool, again, strict=True) for k in a)
    other = request_pool(cfg, 64, seed=6)
    assert any(a[rq.HISTORY_TIME].shape != b[rq.HISTORY_TIME].shape for a, b in zip(pool, other, strict=True))


def test_phase_split_is_per_execute_the_counters_cover_and_leaves_the_rest_to_the_backend() -> None:
    from serve_modes import phase_split

    metrics = {
        "grc_phase_read_seconds_total": 0.02,
        "grc_phase_dense_seconds_total": 0.1,
        "grc_phase_executes_total": 8.0,
        "grc_cuda_graph_hits_total": 5.0,  # not a phase
    }
    out = phase_split(metrics, {"compute_infer_ms": 20.0, "mean_batch": 3.0})
    assert out["phase_ms_per_batch"] == {"read": 0.02 * 1000 / 8, "dense": 0.1 * 1000 / 8}
    assert out["backend_ms_per_batch"] == round(20.0 - (0.02 + 0.1) * 1000 / 8, 3)
    assert phase_split({"grc_cuda_graph_hits_total": 5.0}, {"compute_infer_ms": 20.0}) == {}  # a model without them
    assert phase_split({**metrics, "grc_phase_executes_total": 0.0}, {}) == {}  # no update sent in the row


def serve(tmp_path: Path, out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "bench/serve.py",
        "--specs",
        str(FUSED_CPU),
        "--artifacts",
        str(tmp_path / "art"),
        "--row-seconds",
        "2",
        "--max-requests",
        "12",
        "--pool",
        "8",
        "--sample",
        "2",
        "--out",
        str(out),
        *more,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_serve_measures_every_mode_on_the_real_server_then_reports_a_package_that_fails_to_load(
    tmp_path: Path,
) -> None:
    from tests.serving.conftest import require_tritonserver

    require_tritonserver()
    out = tmp_path / "serve.json"
    done = serve(tmp_path, out, "--concurrency", "1", "2", "--client-processes", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["argv"][0] == "serve.py" and len(data["commit"]) == 40 and data["device"]
    assert data["complete"] is True and "not the GPU claim" in data["what"]
    rows = {(r["mode"], r["concurrency"]): r for r in data["rows"]}
    assert set(rows) == {(m, c) for m in ("grc", "eager", "kernels", "in_process") for c in (1, 2)}
    name = "mtgr-tiny-fused-cpu"
    assert {r["model"] for r in data["rows"]} == {name, f"{name}-pytorch", f"{name}-pytorch_kernels"}
    for (mode, concurrency), r in rows.items():
        assert "skipped" not in r and "failed" not in r, r
        assert r["errors"] == 0 and r["requests"] >= concurrency and r["users_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["checked"]["checked"] == 2 and r["checked"]["problems"] == []
        assert r["checked"]["max_rel"] <= r["checked"]["tolerance"]["max_rel"]
        if mode == "in_process":
            assert r["mean_batch"] == concurrency and set(r["ranker_ms_per_batch"]) == {"check_ms", "rank_ms"}
            assert r["ranker_stats"]["users"] == r["requests"]  # the timed batches, warm-up apart
            assert set(r["phase_ms_per_batch"]) == {"layout", "upload", "embed", "dense", "fetch", "rank"}
        else:  # Triton's own statistics: every request went through the model, queue and compute apart
            assert r["client_processes"] == concurrency  # at most one process per connection
            assert 1 <= r["mean_batch"] <= concurrency
            assert r["server_ms"]["compute_infer_ms"] > 0
    assert data["specs"][name]["server_start_s"] > 0

    # grc's package broken in the built bundle: its model fails to load, its row says why, eager still runs
    package = next((tmp_path / "art" / name / "triton" / "model_repository" / name).rglob("*.pt2"))
    package.unlink()  # a hard link of the aoti stage's output: replace it, do not write through it
    package.write_bytes(b"not a package")
    broken = tmp_path / "broken.json"
    done = serve(tmp_path, broken, "--concurrency", "1", "--modes", "grc", "eager")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NOT CLEAN" in done.stderr and "grc c=1: failed" in done.stderr
    by_mode = {r["mode"]: r for r in json.loads(broken.read_text())["rows"]}
    assert "failed to load" in by_mode["grc"]["failed"] and "users_per_s" not in by_mode["grc"]
    assert by_mode["eager"]["errors"] == 0 and by_mode["eager"]["checked"]["problems"] == []
