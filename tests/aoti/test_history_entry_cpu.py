"""The history cache's prefill and score entry points as AOTInductor packages, built by the aoti stage
(engine.aoti.history_entries) and run on CPU (mtgr-tiny: profile tokens and group norms), matched against
GRDense.prefill / score in float64 on a fresh random user. Three AOTInductor compiles for the module (the
model's package and the two entry points: a minute or more on 2 shared cores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from grc.aoti import history_entry as he
from grc.build.fingerprint import sha256_file
from grc.model.gr import GRDense
from grc.model.params import dense_params, init_tensor
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS, run_build, write_spec

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # float32 packages vs the float64 model (verify.export's)


def seeded_dense(seed: int) -> GRDense:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = GRDense(cfg)
    state = {
        p.name.removeprefix("dense."): init_tensor(p, seed, 0.2, torch.float32)
        for p in dense_params(cfg)
        if p.name.startswith("dense.")
    }
    dense.load_state_dict(state)
    return dense.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[GRDense, dict[str, Path], dict[str, Any]]:
    """The aoti stage with engine.aoti.history_entries on: its cpu target's entry packages and manifest entry."""
    from grc.weights import load_model

    folder = tmp_path_factory.mktemp("history_entry")
    aoti = {"enabled": True, "targets": ["cpu"], "history_entries": True}
    spec = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", {"engine.aoti": aoti})
    assert run_build(spec, only=["aoti"]) == {"weights": "built", "aoti": "built"}
    root = folder / "artifacts" / "mtgr-tiny"
    entry = json.loads((root / "engines-aoti" / "manifest.json").read_text())
    dense = load_model(load_spec(spec).spec.model, root / "weights").dense.eval()
    record = entry["targets"][0]["history_entries"]
    packages = {name: root / "engines-aoti" / rel for name, rel in record["packages"].items()}
    return dense, packages, entry


def test_the_stage_records_the_entry_points_checked(built: tuple[GRDense, dict[str, Path], dict[str, Any]]) -> None:
    _, packages, manifest = built
    record = manifest["targets"][0]["history_entries"]
    errors = record["parity"]["relative_errors"]
    assert set(errors) == {"prefill_keys", "prefill_values", "scores", "score_keys", "score_values"}
    assert all(0 < e <= record["parity"]["max_rel"] for e in errors.values()), errors  # non-zero data, within
    for rel, digest in record["sha256"].items():
        assert manifest["sha256"][rel] == digest == sha256_file(packages[Path(rel).stem])
    assert record["served"] is False


def test_the_exported_steps_hold_one_cached_attention_per_layer() -> None:
    dense = seeded_dense(1)
    programs = he.export_programs(dense, torch.device("cpu"), torch.float32)
    for program in programs.values():
        ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert ops.count("grc.hstu_attention_cached.default") == dense.cfg.hstu.num_layers


def test_cpu_packages_match_prefill_and_score(built: tuple[GRDense, dict[str, Path], dict[str, Any]]) -> None:
    dense, packages, _ = built
    assert sorted(packages) == [he.PREFILL, he.SCORE] and all(p.is_file() for p in packages.values())
    seed = int(torch.randint(0, 1 << 30, ()).item())
    errors = he.check(packages, dense, torch.device("cpu"), torch.float32, seed)
    assert all(e < TOLERANCE for e in errors.values()), (errors, seed)
