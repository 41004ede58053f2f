"""export -> surgery -> verify on a real MTGR: fused node counts, sabotage, polygraphy."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from grc.build.progress import BuildRecords
from grc.spec.loader import load_spec
from tests.conftest import REPO, run_build

ATTENTION_EQUATIONS = {"bihd,bjhd->bhij", "bhij,bjhd->bihd"}


def _root(built: tuple[Path, Path]) -> Path:
    spec, artifacts = built
    return artifacts / load_spec(spec).spec.name


def test_export_has_dynamic_axes_and_manifest(built_mtgr_tiny: tuple[Path, Path]) -> None:
    root = _root(built_mtgr_tiny)
    manifest = json.loads((root / "onnx" / "manifest.json").read_text())
    shapes = {i["name"]: i["shape"] for i in manifest["inputs"]}
    assert shapes["tokens"][:2] == ["users", "tokens"] and shapes["lengths"] == ["users"]
    assert manifest["opset"] >= 17 and manifest["torch"] == torch.__version__
    model = onnx.load(str(root / "onnx" / "model.onnx"))
    onnx.checker.check_model(model)
    assert {o.name for o in model.graph.output} == {"scores"}


def test_surgeried_graph_holds_one_fused_node_per_layer(built_mtgr_tiny: tuple[Path, Path]) -> None:
    spec, _ = built_mtgr_tiny
    cfg = load_spec(spec).spec.model
    root = _root(built_mtgr_tiny)
    model = onnx.load(str(root / "surgery" / "model.onnx"))
    fused = [n for n in model.graph.node if n.op_type == "HSTUAttention"]
    assert len(fused) == cfg.hstu.num_layers == 3
    for node in fused:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "grc" and attrs["plugin_namespace"] == b"grc" and attrs["plugin_version"] == b"1"
        assert attrs["num_heads"] == cfg.hstu.num_heads and np.isclose(attrs["alpha"], cfg.hstu.scale)
        assert attrs["norm"] == cfg.hstu.max_seq_len and attrs["causal"] == 1
        assert len(node.input) == 8
    report = json.loads((root / "surgery" / "manifest.json").read_text())
    replaced = {name for f in report["fusions"] for name in f["replaced"]}
    left = {n.name for n in model.graph.node}
    assert replaced and not (replaced & left)
    equations = {
        onnx.helper.get_attribute_value(a).decode()
        for n in model.graph.node
        if n.op_type == "Einsum"
        for a in n.attribute
        if a.name == "equation"
    }
    assert not (equations & ATTENTION_EQUATIONS)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Where", "Clip", "LessOrEqual", "Or", "Abs"}  # mask and bias ops are gone
    assert report["op_counts"]["after"]["HSTUAttention"] == 3


def test_verify_passed_with_figures(built_mtgr_tiny: tuple[Path, Path]) -> None:
    report = json.loads((_root(built_mtgr_tiny) / "verify" / "manifest.json").read_text())
    figures = report["figures"]
    assert {f["backend"] for f in figures} == {"export", "surgery"} and all(f["ok"] for f in figures)
    assert all(f["max_rel"] < 1e-4 for f in figures)


def _sabotage(monkeypatch: pytest.MonkeyPatch, corrupt) -> None:  # type: ignore[no-untyped-def]
    from grc.onnx.surgery import passes

    real = passes.PASSES["fuse_hstu_attention"]

    def broken(graph, ctx):  # type: ignore[no-untyped-def]
        out = real(graph, ctx)
        node = next(n for n in graph.nodes if n.op == "HSTUAttention")
        corrupt(node)
        return out

    monkeypatch.setitem(passes.PASSES, "fuse_hstu_attention", broken)


def _wrong_alpha(node) -> None:  # type: ignore[no-untyped-def]
    node.attrs["alpha"] *= 1.25


def _dropped_time_bias(node) -> None:  # type: ignore[no-untyped-def]
    node.inputs[7].values = np.zeros_like(node.inputs[7].values)


@pytest.mark.parametrize("corrupt", [_wrong_alpha, _dropped_time_bias], ids=["wrong-alpha", "dropped-bias"])
def test_sabotaged_surgery_fails_verify_with_figures(
    built_mtgr_tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corrupt
) -> None:  # type: ignore[no-untyped-def]
    spec, _ = built_mtgr_tiny
    shutil.copytree(spec.parent, tmp_path / "w")
    spec = tmp_path / "w" / spec.name
    (_root((spec, tmp_path / "w" / "artifacts")) / "surgery" / "manifest.json").unlink()  # force surgery to rerun
    _sabotage(monkeypatch, corrupt)
    records = BuildRecords()
    statuses = run_build(spec, expect_ok=False, records=records)
    assert statuses["surgery"] == "built" and statuses["verify"] == "failed"
    error = records.get("verify")["error"]
    assert "beyond the spec's tolerance" in error and "FAIL" in error and "surgery" in error
    assert "export " in error  # the unsabotaged export row is shown too, and passes
    assert not (_root((spec, tmp_path / "w" / "artifacts")) / "verify" / "manifest.json").exists()


def test_polygraphy_inspects_and_runs_the_artifacts(built_mtgr_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from polygraphy.json import save_json

    from grc.model.sample import random_batch
    from grc.stages.verify import padded_feeds, reference
    from grc.weights import load_model, open_tables

    spec, _ = built_mtgr_tiny
    cfg = load_spec(spec).spec.model
    root = _root(built_mtgr_tiny)
    env = {**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0"}
    polygraphy = [sys.executable, "-m", "polygraphy"] if False else [shutil.which("polygraphy") or "polygraphy"]
    for stage in ("onnx", "surgery"):
        out = subprocess.run(
            [*polygraphy, "inspect", "model", str(root / stage / "model.onnx"), "--show", "layers"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        assert ("HSTUAttention" in out.stdout) == (stage == "surgery")
    model = load_model(cfg, root / "weights").double()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ()).item()))
    with torch.no_grad():
        tok = model.projector(random_batch(cfg, 2, 9, 3, gen), open_tables(cfg, root / "weights"))
    feeds = padded_feeds(tok)
    save_json([feeds], str(tmp_path / "inputs.json"))
    out = subprocess.run(
        [
            *polygraphy,
            "run",
            str(root / "onnx" / "model.onnx"),
            "--onnxrt",
            "--load-inputs",
            str(tmp_path / "inputs.json"),
            "--save-outputs",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(tmp_path / "out.json"))
    scores = results[0][1][0]["scores"]
    from grc.model.jagged import to_jagged

    got = to_jagged(torch.from_numpy(np.asarray(scores)), tok.offsets).numpy()
    expected = reference(model, tok)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5


class _PaddedAttention(torch.nn.Module):
    def __init__(self, heads: int, num_pos: int, num_buckets: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.pos_w = torch.nn.Parameter(torch.randn(heads, 2 * num_pos - 1, generator=gen))
        self.ts_w = torch.nn.Parameter(torch.randn(heads, num_buckets, generator=gen) * 3)

    def forward(self, q, k, v, lengths, num_candidates, timestamps):  # type: ignore[no-untyped-def]
        from grc.model.attention import abs_time_gap, hstu_attention_padded, time_bucket

        out = hstu_attention_padded(q, k, v, lengths, num_candidates, timestamps, self.pos_w, self.ts_w, 0.5, 9.0, True)
        gap = abs_time_gap(timestamps.unsqueeze(2), timestamps.unsqueeze(1))
        return out, time_bucket(gap, self.ts_w.shape[1])


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@pytest.mark.parametrize("num_buckets", [32, 64])
def test_exported_time_gap_saturates_at_the_int64_ends(tmp_path: Path, num_buckets: int) -> None:
    """The ONNX graph traced from the padded attention computes |dt| without wrapping: timestamps
    at INT64_MIN and INT64_MAX (gaps up to 2**64 - 1) land in the last bucket in onnxruntime, as
    the integer rule says, and the attention output matches torch's."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(secrets.randbits(31))
    users, n, heads, d = 2, 6, 2, 8
    q, k, v = (torch.randn(users, n, heads, d, generator=gen) for _ in range(3))
    lengths, nc = torch.tensor([6, 4]), torch.tensor([1, 0])
    stamps = [[INT64_MIN, INT64_MIN + 1, -1, 0, INT64_MAX - 1, INT64_MAX], [INT64_MAX, INT64_MIN, 1 << 40, -7, 0, 0]]
    args = (q, k, v, lengths, nc, torch.tensor(stamps))
    model = _PaddedAttention(heads, 4, num_buckets).eval()
    path = tmp_path / "attention.onnx"
    names = ["q", "k", "v", "lengths", "num_candidates", "timestamps"]
    program = torch.onnx.export(model, args, dynamo=True, optimize=True, input_names=names)
    assert program is not None
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out, buckets = sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    want = [[[min((min(abs(a - b), INT64_MAX) + 1).bit_length() - 1, num_buckets - 1) for b in row] for a in row]
            for row in stamps]  # fmt: skip
    assert buckets.tolist() == want
    with torch.no_grad():
        np.testing.assert_allclose(out, model(*args)[0].numpy(), rtol=1e-5, atol=1e-6)
