"""The disk budget: a build says what it will write and refuses, before any stage runs, what the
artifacts filesystem cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from grc.build.budget import stage_bytes
from grc.cli import main
from grc.spec.limits import MAX_VOCAB, MAX_WIDTH
from grc.spec.loader import load_spec
from grc.stages import stage_named
from tests.conftest import TEST_SPECS, write_spec


def test_a_build_that_cannot_fit_is_refused_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The largest table the schema allows (2**36 rows x 16,384 float32) is 4 PiB: valid, and no
    disk holds it. Before the budget, the weights stage started writing it."""
    spec = write_spec(
        tmp_path,
        TEST_SPECS / "mtgr-tiny.yaml",
        {"model.tables.item": {"vocab_size": MAX_VOCAB, "dim": MAX_WIDTH}, "weights.table_block_rows": 1 << 21},
    )
    assert main(["validate", str(spec)]) == 0
    artifacts = tmp_path / "artifacts"
    assert main(["build", str(spec), "--artifacts", str(artifacts), "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert "mtgr-tiny: this build writes at least 4096.0 TiB" in err, err
    assert "free" in err and "weights" in err and "Traceback" not in err
    root = artifacts / "mtgr-tiny"
    assert not (root / "weights").exists() and not list(root.glob(".*tmp*")), list(root.iterdir())


def test_estimates_are_at_most_what_the_stages_write(built_tiny: tuple[Path, Path]) -> None:
    """A refusal is never a false alarm: each estimate is at most the bytes its stage wrote, and the
    weights' (nearly all the bytes of a real model) is close to them."""
    spec, artifacts = built_tiny
    root = artifacts / load_spec(spec).spec.name
    written = {}
    for estimate in stage_bytes(load_spec(spec).spec):
        folder = root / stage_named(estimate.stage).output
        written[estimate.stage] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert estimate.bytes <= written[estimate.stage], (estimate, written)
    weights = next(e for e in stage_bytes(load_spec(spec).spec) if e.stage == "weights")
    assert weights.bytes > 0.8 * written["weights"], (weights, written)
