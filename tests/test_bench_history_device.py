"""bench/history_cache_device.py (the in-process device bench of the history cache) and its time keeping
(bench/history_cache_timeline.py), on the CPU: the model computes in the dtype it is benched in, the issue's
target shape comes first, a phase past its shape's deadline is cut (the row keeps what ran and says what
did not), a shape's estimated cost follows what earlier shapes measured, and a dry run under Triton's
interpreter prints a timestamped line per phase and computes the float64 oracle once per shape."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.history_cache import dense_model
from bench.history_cache_device import DRY_SHAPES, shapes, verdict
from bench.history_cache_timeline import Costs, Cut, ShapeRun, compiled_kernels
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock the test moves by hand (ShapeRun reads elapsed() and prints through say())."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lines: list[str] = []

    def elapsed(self) -> float:
        return self.now

    def say(self, message: str) -> None:
        self.lines.append(message)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_benched_model_computes_in_its_dtype(dtype: torch.dtype) -> None:
    """dense_model loaded the rounded values into float32 parameters: a "bfloat16" bench computed in float32."""
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    model = dense_model(cfg, torch.device("cpu"), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    n, candidates = 12, 3
    tokens = torch.randn(n, cfg.d_model).to(dtype)
    scores = model.forward_jagged(tokens, torch.tensor([0, n]), torch.tensor([candidates]), torch.arange(n) + 10**9)
    assert scores.dtype == dtype


def test_the_issues_target_shape_comes_first_then_by_tokens() -> None:
    cfg = load_spec(REPO / "specs" / "mtgr-small.yaml").spec.model
    order = shapes(cfg, dry_run=False)
    assert order[0] == (cfg.hstu.max_seq_len - 256 - len(cfg.profile), 256)
    rest = [h + c for h, c in order[1:]]
    assert rest == sorted(rest) and len(set(order)) == 4
    assert shapes(cfg, dry_run=True) == list(DRY_SHAPES)


def test_a_phase_past_the_shapes_deadline_is_cut_and_the_row_keeps_what_ran() -> None:
    clock, saved = FakeClock(), []
    row: dict[str, Any] = {"dtype": "bfloat16"}
    run = ShapeRun(clock, "spec bf16 8x2", deadline=10.0, row=row, save=lambda: saved.append(dict(row)))  # type: ignore[arg-type]
    with run.phase("full", "full forward"):
        row["rel_err_full_vs_fp64"], row["ref_nonzero"] = 1e-3, True
        clock.now = 12.0  # the phase ran past the deadline: it finishes, the next does not start
    with (
        pytest.raises(Cut, match=r"cached \(cached score\) not started.*\+10 s") as cut,
        run.phase("cached", "cached score"),
    ):
        row["cached_score_ms"] = 1.0
    assert "cached_score_ms" not in row and list(row["phase_s"]) == ["full"]
    assert saved and saved[-1]["rel_err_full_vs_fp64"] == 1e-3  # written after the phase that ran
    assert clock.lines == ["spec bf16 8x2: full: full forward"]  # printed as it started; the cut one never
    row["cut"] = str(cut.value)
    verdict(row, "bfloat16")
    assert row["ok"] and row["checked"] == ["rel_err_full_vs_fp64"]  # ok covers what ran, and says what
    nothing: dict[str, Any] = {"cut": "prefill_first ... not started"}
    verdict(nothing, "bfloat16")
    assert nothing["ok"] is False and nothing["checked"] == []


def test_a_shapes_estimate_follows_what_earlier_shapes_measured() -> None:
    costs = Costs(per_key_s=45.0, steady_s=10.0)
    assert costs.estimate("mtgr-small", "bfloat16", 1) == 55.0
    costs.update("mtgr-small", "bfloat16", seconds=70.0, first_calls_s=60.0, new_keys=2)  # 30 s per key measured
    assert costs.estimate("mtgr-small", "bfloat16", 0) == 10.0
    assert costs.estimate("mtgr-small", "bfloat16", 1) == 40.0
    assert costs.estimate("mtgr-base", "bfloat16", 1) == 40.0  # the default steady time, the measured key rate
    costs.update("mtgr-small", "bfloat16", seconds=5.0, first_calls_s=1.0, new_keys=0)  # nothing tuned: rate kept
    assert costs.estimate("mtgr-small", "bfloat16", 1) == 34.0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: Triton compiles nothing")
def test_the_compiled_kernel_count_reads_tritons_caches() -> None:
    """kernels/ exports functions named like its modules: the count must read the modules themselves."""
    assert compiled_kernels() == 0  # a number (nothing compiled on this CPU), not None (nothing found)


def test_a_dry_run_prints_each_phase_and_computes_the_oracle_once_per_shape(tmp_path: Path) -> None:
    out = tmp_path / "dry.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "history_cache_device.py"),
            "--dry-run",
            "--out",
            str(out),
            "--specs",
            str(TEST_SPECS / "mtgr-tiny.yaml"),
            "--dtypes",
            "bfloat16,float32",
            "--no-served-check",
            "--session-users",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["cases"]
    assert [(r["dtype"], r["history"], r["candidates"]) for r in rows] == [
        (d, h, c) for d in ("bfloat16", "float32") for h, c in DRY_SHAPES
    ]
    assert all(r["ok"] and "cut" not in r and "error" not in r for r in rows), rows
    assert [r["oracle"].split()[0] for r in rows] == ["computed"] * 2 + ["reused"] * 2
    phases = ["prefill_first", "full", "cached", "oracle", "prefill", "planned", "delta10"]
    assert all(list(r["phase_s"]) == phases for r in rows)
    stamped = re.compile(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\d s\] ")
    for r in rows:  # each phase announced, with the time, before the shape's summary line
        label = f"mtgr-tiny {r['dtype']} {r['history']}x{r['candidates']}: "
        lines = [line for line in proc.stdout.splitlines() if label in line]
        assert [line.split(label)[1].split(":")[0] for line in lines[:-1]] == phases, lines
        assert all(stamped.match(line) for line in lines) and "ok True" in lines[-1]
