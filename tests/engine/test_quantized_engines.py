"""int8 / fp8 engines through real builds: ModelOpt's Q/DQ graph (calibrated on the CPU, on seeded
users of their own), its ranking figures in onnxruntime gated by verify, TensorRT-RTX plans for
sm80 (int8) and sm89 (fp8) with the plugin layers and the calibration digest; a broken calibration
fails verify with the table.

hstu-tiny's seeded weights give candidates whose scores differ little (within-user std 0.017 / 0.033
for its two tasks), so quantizing its dense GEMMs moves the ranking measurably: on the 32 held-out
users int8 gave Kendall tau 0.93-0.95 and top-10 overlap 0.96-0.98, fp8 (e4m3, per-tensor
activations) tau 0.86-0.87 and overlap 0.94-0.95 vs fp32. The default gates (0.95) fail fp8 here;
this spec states the gates it holds them to.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import grc.stages.quantize
from grc.build.runner import plan
from grc.spec.loader import load_spec
from tests.conftest import SPECS, in_dir, run_build, write_spec
from tests.engine.test_engine_build import _require_toolchain

TARGETS = [
    {"name": "sm80-int8", "sm": "sm80", "precision": "int8"},
    {"name": "sm89-fp8", "sm": "sm89", "precision": "fp8"},
]
GATES = {"min_kendall_tau": 0.8, "min_top_k_overlap": 0.9, "max_mean_abs": 0.01, "max_abs": 0.05}
CALIBRATION = {"seed": 4242, "users": 8, "history": 24}


def _spec(tmp_path: Path, targets: list[dict[str, str]]) -> Path:
    return write_spec(
        tmp_path,
        SPECS / "hstu-tiny.yaml",
        {
            "engine.targets": targets,
            "engine.calibration": CALIBRATION,
            "verify.ranking": {**GATES},
            "bundles": {"triton": {"enabled": False}, "vllm": {"enabled": False}},
        },
    )


def _manifest(root: Path, stage: str) -> dict:  # type: ignore[type-arg]
    return json.loads((root / stage / "manifest.json").read_text())


def test_int8_and_fp8_engines_from_calibrated_qdq_graphs(tmp_path: Path) -> None:
    _require_toolchain()
    statuses = run_build(_spec(tmp_path, TARGETS), only=["verify", "engine"])
    assert statuses["quantize"] == "built" and statuses["engine"] == "built", statuses
    root = tmp_path / "artifacts" / "hstu-tiny"
    quantized = _manifest(root, "quantized")
    surgery = onnx.load(str(root / "surgery" / "model.onnx"), load_external_data=False)
    attention = sorted(n.name for n in surgery.graph.node if n.op_type == "HSTUAttention")
    assert len(attention) == 2
    zero_point = {"int8": "INT8", "fp8": "FLOAT8E4M3FN"}
    for precision, entry in quantized["precisions"].items():
        graph = onnx.load(str(root / "quantized" / entry["model"]))
        ops = [n.op_type for n in graph.graph.node]
        # the GEMM inputs are quantized to the precision, the attention node is the same custom node
        assert entry["tool"] == "nvidia-modelopt" and entry["quantize_nodes"] == ops.count("QuantizeLinear") > 0
        assert entry["zero_point_types"] == [zero_point[precision]]
        assert sorted(n.name for n in graph.graph.node if n.op_type == "HSTUAttention") == attention
        assert {n.domain for n in graph.graph.node if n.op_type == "HSTUAttention"} == {"grc"}
        cal = entry["calibration"]
        assert cal["seed"] == CALIBRATION["seed"] and cal["users"] == CALIBRATION["users"]
        assert len(cal["digest"]) == 64
    assert set(quantized["precisions"]) == {"int8", "fp8"}

    figures = _manifest(root, "verify")["ranking"]["figures"]
    by_backend = {f["backend"]: f for f in figures if f["task"] == "ctr"}
    assert {"onnxrt-int8", "onnxrt-fp8"} <= set(by_backend)
    assert all(f["ok"] for f in figures)
    # the quantized graphs really round: their scores move far more than the float graph's
    assert by_backend["onnxrt-int8"]["mean_abs"] > 100 * by_backend["surgery"]["mean_abs"]
    assert by_backend["onnxrt-fp8"]["mean_abs"] > 100 * by_backend["surgery"]["mean_abs"]
    assert "int8 Q/DQ" in by_backend["onnxrt-int8"]["precision"]

    engines = _manifest(root, "engines")
    assert engines["built"] == ["sm80-int8", "sm89-fp8"]
    for target, precision, sm in (("sm80-int8", "int8", 80), ("sm89-fp8", "fp8", 89)):
        meta = json.loads((root / "engines" / target / "metadata.json").read_text())
        assert meta["precision"] == precision and meta["plan"]["target_sms"] == [sm]
        assert meta["onnx"]["built_from_sha256"] == quantized["sha256"][f"{precision}/model.onnx"]
        assert (
            meta["quantization"]["calibration"]["digest"] == quantized["precisions"][precision]["calibration"]["digest"]
        )
        assert sorted(meta["plugin_layers"]) == attention
        gated = meta["quantization"]["ranking"]["figures"]  # the figures verify gated this graph on
        assert {f["backend"] for f in gated} == {f"onnxrt-{precision}"} and all(f["ok"] for f in gated)
        assert meta["quantization"]["ranking"]["gates"]["min_kendall_tau"] == GATES["min_kendall_tau"]
        layer_types = {row["type"] for row in meta["network_layers"]}
        assert {"QUANTIZE", "DEQUANTIZE", "PLUGIN_V3"} <= layer_types

    # other calibration users: the quantize stage and what reads its graphs go stale, nothing upstream
    spec = write_spec(tmp_path, tmp_path / "hstu-tiny.yaml", {"engine.calibration": {**CALIBRATION, "seed": 7}})
    with in_dir(tmp_path):
        rows = {r.task: r for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny"))}
    assert rows["quantize"].state == "stale" and rows["quantize"].reasons == ["engine.calibration.seed changed"]
    assert all(rows[t].state == "up to date" for t in ("weights", "export", "surgery", "plugins"))


def test_a_broken_calibration_fails_verify_with_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plausible bug: the calibration users' embeddings never reach the feeds (zeros). The ranges
    ModelOpt measures are then those of the norms' biases alone, and the real users saturate."""
    from grc.build.progress import BuildRecords

    real = grc.stages.quantize.calibration_feeds

    def zero_tokens(ctx):  # type: ignore[no-untyped-def]
        feeds, about = real(ctx)
        return {**feeds, "tokens": np.zeros_like(feeds["tokens"])}, about

    monkeypatch.setattr(grc.stages.quantize, "calibration_feeds", zero_tokens)
    records = BuildRecords()
    statuses = run_build(_spec(tmp_path, TARGETS[:1]), only=["engine"], expect_ok=False, records=records)
    assert statuses["quantize"] == "built" and statuses["verify"] == "failed", statuses
    assert statuses.get("engine") != "built"  # no engine from a graph that failed its gates
    error = records.get("verify")["error"]
    assert "ranking gates (verify.ranking) failed" in error and "onnxrt-int8" in error and "FAIL: " in error
    assert "surgery   tables float32, dense float32  ctr" in error  # the float graphs still pass, in the table
    assert not (tmp_path / "artifacts" / "hstu-tiny" / "verify").exists()
