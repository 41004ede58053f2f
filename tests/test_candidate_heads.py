"""The dense model's tail on candidate rows only, and the fused GPU-compile path of the whole
dense model (kernels/fused_*.py through their PyTorch twins on a CPU) against the model's math."""

from __future__ import annotations

import secrets

import pytest
import torch

from grc.aoti.inputs import random_inputs, seeded_dense
from grc.spec.loader import load_spec
from tests.conftest import SPECS, TEST_SPECS

SPEC_PATHS = [SPECS / "hstu-tiny.yaml", TEST_SPECS / "mtgr-tiny.yaml"]


def _case(spec_path, seed: int):  # type: ignore[no-untyped-def]
    cfg = load_spec(spec_path).spec.model
    dense = seeded_dense(cfg, seed=seed % 1000, std=0.3).double()  # large weights: every term matters
    inp = random_inputs(cfg, 4, 25, 6, torch.Generator().manual_seed(seed)).to("cpu", torch.float64)
    return dense, inp


@pytest.mark.parametrize("spec_path", SPEC_PATHS, ids=["hstu", "mtgr"])
def test_heads_run_on_candidate_rows_only(spec_path) -> None:  # type: ignore[no-untyped-def]
    """forward_jagged gathers the candidate rows before the final norm and the heads (they ran on
    every token) and scatters their scores back into the [T, tasks] zero output."""
    seed = secrets.randbits(31)
    dense, inp = _case(spec_path, seed)
    seen: list[int] = []
    dense.heads.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        scores = dense.forward_jagged(*inp.args())
    candidates = int(inp.num_candidates.sum())
    assert seen == [candidates], f"seed={seed}: the heads saw {seen} rows, {candidates} candidates"
    assert scores.shape == (inp.tokens.shape[0], len(dense.cfg.tasks))
    assert int((scores != 0).any(-1).sum()) == candidates  # sigmoid scores: never exactly 0 at a candidate


@pytest.mark.parametrize("spec_path", SPEC_PATHS, ids=["hstu", "mtgr"])
def test_fused_dense_equals_the_model_in_float64(spec_path) -> None:  # type: ignore[no-untyped-def]
    """forward_jagged(impl="triton", fuse=True): the fused projections and the candidate heads
    (their twins on a CPU) give the plain model's scores, zeros off the candidates included."""
    seed = secrets.randbits(31)
    dense, inp = _case(spec_path, seed)
    with torch.no_grad():
        want = dense.forward_jagged(*inp.args(), impl="pytorch")
        got = dense.forward_jagged(*inp.args(), impl="triton", fuse=True)
    assert want.abs().max() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"seed={seed}")
