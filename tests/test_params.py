"""Parameter counts and FLOPs per sample from the spec, held against the model code and the MTGR
paper (arXiv 2505.18654, Table 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grc.cli import main
from grc.model.params import PAPER_TOKENS, dense_flops_per_sample, dense_parameter_count, dense_params, paper_sample
from grc.spec.loader import load_spec
from tests.conftest import SPECS, TEST_SPECS

ALL_SPECS = [*sorted(SPECS.glob("*.yaml")), *sorted(TEST_SPECS.glob("*.yaml"))]
# Table 2: layers, d_model, heads, GFLOPs per sample
MTGR_TABLE_2 = {
    "mtgr-small": (3, 512, 2, 5.47),
    "mtgr-base": (5, 768, 3, 18.59),
    "mtgr-large": (15, 768, 3, 55.76),
}


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[p.stem for p in ALL_SPECS])
def test_closed_form_count_is_the_model_codes(spec: Path) -> None:
    """The torch-free count (used by the disk budget) equals the meta-device model's parameters."""
    cfg = load_spec(spec).spec.model
    assert dense_parameter_count(cfg) == sum(p.numel for p in dense_params(cfg))


@pytest.mark.parametrize("name", sorted(MTGR_TABLE_2))
def test_mtgr_specs_follow_table_2(name: str) -> None:
    layers, d_model, heads, gflops = MTGR_TABLE_2[name]
    cfg = load_spec(SPECS / f"{name}.yaml").spec.model
    assert (cfg.hstu.num_layers, cfg.d_model, cfg.hstu.num_heads) == (layers, d_model, heads)
    sample = paper_sample(cfg)
    assert sample.tokens == PAPER_TOKENS
    assert sample.hstu / 1e9 == pytest.approx(gflops, abs=0.005)  # the paper's figures, to their rounding
    assert sample.total > sample.hstu  # grc also projects embeddings and runs task heads


def test_flops_grow_as_the_math_says() -> None:
    """Projections are linear in tokens, attention quadratic; doubling the width doubles attention
    and quadruples the projections."""
    cfg = load_spec(SPECS / "mtgr-small.yaml").spec.model
    one, two = dense_flops_per_sample(cfg, 97, 4), dense_flops_per_sample(cfg, 200, 5)
    assert two.tokens == 2 * one.tokens
    assert two.projections == 2 * one.projections and two.attention == 4 * one.attention
    wide = cfg.model_copy(
        update={"d_model": 1024, "hstu": cfg.hstu.model_copy(update={"attention_dim": 1024, "linear_dim": 1024})}
    )
    w = dense_flops_per_sample(wide, 97, 4)
    assert w.projections == 4 * one.projections and w.attention == 2 * one.attention


def test_show_prints_flops_per_sample_and_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(SPECS / "mtgr-small.yaml")]) == 0
    out = capsys.readouterr().out
    assert "dense GFLOPs per sample of 500 tokens (the MTGR paper's Table 2 basis): HSTU layers 5.47" in out
    assert "a build writes at least: weights 3.7 GiB" in out
