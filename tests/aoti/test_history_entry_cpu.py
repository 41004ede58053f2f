"""The history cache's prefill and score entry points as AOTInductor packages, built and run on CPU
(mtgr-tiny: profile tokens and group norms), matched against GRDense.prefill / score in float64 on a
fresh random user. Two AOTInductor compiles for the module (a minute or more on 2 shared cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grc.aoti import history_entry as he
from grc.model.gr import GRDense
from grc.model.params import dense_params, init_tensor
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS

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
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[GRDense, dict[str, Path]]:
    dense = seeded_dense(int(torch.randint(0, 1 << 20, ()).item()))
    out = tmp_path_factory.mktemp("history_entry")
    return dense, he.build(dense, out, torch.device("cpu"), torch.float32)


def test_the_exported_steps_hold_one_cached_attention_per_layer() -> None:
    dense = seeded_dense(1)
    programs = he.export_programs(dense, torch.device("cpu"), torch.float32)
    for program in programs.values():
        ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert ops.count("grc.hstu_attention_cached.default") == dense.cfg.hstu.num_layers


def test_cpu_packages_match_prefill_and_score(built: tuple[GRDense, dict[str, Path]]) -> None:
    dense, packages = built
    assert sorted(packages) == [he.PREFILL, he.SCORE] and all(p.is_file() for p in packages.values())
    seed = int(torch.randint(0, 1 << 30, ()).item())
    errors = he.check(packages, dense, torch.device("cpu"), torch.float32, seed)
    assert all(e < TOLERANCE for e in errors.values()), (errors, seed)
