"""verify's ranking gates through real builds: quantized tables pass them, a broken quantization
fails the build with the table, and a change of table precision reruns only the stages that read
tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import grc.weights.artifact
from tests.conftest import SPECS, run_build, write_spec

NO_ENGINES: dict[str, object] = {"engine.targets": []}  # TensorRT engines read the ONNX only: not what this is about
READ_TABLES = {"weights", "verify", "triton", "vllm"}
DENSE_ONLY = {"export", "surgery"}


def _ranking(artifacts: Path) -> dict:
    return json.loads((artifacts / "hstu-tiny" / "verify" / "manifest.json").read_text())["ranking"]


def test_table_precision_change_reruns_only_the_stages_that_read_tables(tmp_path: Path) -> None:
    seen = {}
    for dtype in ("bfloat16", "int8", "fp8_e4m3"):
        spec = write_spec(tmp_path, SPECS / "hstu-tiny.yaml", {**NO_ENGINES, "weights.init.embedding_dtype": dtype})
        statuses = run_build(spec)
        if dtype != "bfloat16":
            assert {s for s, v in statuses.items() if v == "built"} == READ_TABLES, statuses
            assert {s for s, v in statuses.items() if v == "up to date"} == DENSE_ONLY, statuses
        ranking = _ranking(tmp_path / "artifacts")
        figures = ranking["figures"]
        assert {f["backend"] for f in figures} == {"pytorch", "export", "surgery"}
        assert all(f["ok"] and f["precision"] == f"tables {dtype}, dense float32" for f in figures)
        assert ranking["gates"]["min_kendall_tau"] == 0.95 and ranking["gates"]["top_k"] == 10
        seen[dtype] = max(f["max_abs"] for f in figures)
    # coarser tables move the scores more: the gate measures the quantization, not nothing
    assert 0 < seen["bfloat16"] < seen["int8"] < seen["fp8_e4m3"]


def _rows_scaled_by_their_neighbour(block: torch.Tensor, kind: str, where: str) -> dict[str, torch.Tensor]:
    """A plausible quantizer bug: every row's scale and offset written one row off."""
    from grc.model.tables import quantize_rows

    out = quantize_rows(block, kind, where)
    return {k: (v if k == "codes" else v.roll(1)) for k, v in out.items()}


def test_a_broken_table_quantization_fails_the_build_with_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grc.build.progress import BuildRecords

    records = BuildRecords()
    monkeypatch.setattr(grc.weights.artifact, "quantize_rows", _rows_scaled_by_their_neighbour)
    spec = write_spec(tmp_path, SPECS / "hstu-tiny.yaml", {**NO_ENGINES, "weights.init.embedding_dtype": "int8"})
    statuses = run_build(spec, expect_ok=False, records=records)
    assert statuses["verify"] == "failed" and statuses["weights"] == "built"
    error = records.get("verify")["error"]  # what the build prints under the failed stage
    assert "ranking gates (verify.ranking) failed" in error and "FAIL: " in error and "top-k ovl" in error
    assert not (tmp_path / "artifacts" / "hstu-tiny" / "verify").exists()  # no stale "passed" report
