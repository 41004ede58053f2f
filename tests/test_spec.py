"""Spec language: extends, and precise errors (file:line: field.path: message, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from grc.cli import main
from grc.spec.loader import load_spec
from tests.conftest import SPECS, TEST_SPECS

GOOD = (TEST_SPECS / "mtgr-tiny.yaml").read_text()


def _errors(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], name: str = "bad.yaml") -> str:
    (tmp_path / name).write_text(text)
    code = main(["validate", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


CASES = [
    # (what is wrong, edit applied to a valid spec, expected fragment with its line)
    (
        "typo in a key",
        ("    num_layers: 3", "    num_layer: 3"),
        ":8: model.hstu.num_layer: unknown key; did you mean 'num_layers'?",
    ),
    (
        "heads do not divide dims",
        ("    num_heads: 2", "    num_heads: 5"),
        ":9: model.hstu.num_heads: must divide attention_dim 32 (got 5)",
    ),
    ("wrong enum value", ("  kind: mtgr", "  kind: mtgrr"), ":4: model.kind: expected 'hstu' or 'mtgr' (got 'mtgrr')"),
    ("wrong type", ("  d_model: 32", "  d_model: wide"), ":5: model.d_model: expected a valid integer"),
    (
        "non-positive size",
        ("    user: {vocab_size: 500}", "    user: {vocab_size: 0}"),
        ":16: model.tables.user.vocab_size: expected greater than or equal to 1 (got 0)",
    ),
    (
        "unknown table named",
        ("  history: [item, category, action]", "  history: [item, categroy, action]"),
        ":22: model.history[1]: names table 'categroy', which model.tables does not define; did you mean 'category'?",
    ),
    (
        "bad mask",
        ("    time_buckets: 20", "    time_buckets: 20\n    history_mask: casual"),
        ":15: model.hstu.history_mask: expected 'causal' or 'full' (got 'casual')",
    ),
    ("typo in a section", ("weights:", "weigths:"), ":27: weigths: unknown key; did you mean 'weights'?"),
    (
        "bad surgery pass",
        ("weights:", "surgery:\n  passes: [fold_constants, fuse_everything]\nweights:"),
        ":28: surgery.passes[1]: expected 'fold_constants'",
    ),
    (
        "init and checkpoint both",
        ("  init: {seed: 3}", "  init: {seed: 3}\n  checkpoint: x.safetensors"),
        "weights.checkpoint: give either init or checkpoint, not both",
    ),
    (
        "bad tolerance",
        ("  export: {max_abs: 1.0e-5, max_rel: 1.0e-4}", "  export: {max_abs: -1, max_rel: 1.0e-4}"),
        ":31: verify.export.max_abs: expected greater than 0 (got -1)",
    ),
    ("duplicate key", ("  d_model: 32", "  d_model: 32\n  d_model: 64"), ":6: model.d_model: duplicate key"),
    ("YAML syntax", ("  history: [item, category, action]", "  history: [item, category, action"), ": YAML syntax:"),
    (
        "candidates leave no room",
        ("  max_candidates: 24", "  max_candidates: 200"),
        "model.max_candidates: 200 + 2 profile tokens leave no room for history within hstu.max_seq_len 96",
    ),
]


@pytest.mark.parametrize(("what", "edit", "expected"), CASES, ids=[c[0] for c in CASES])
def test_mistake_gives_precise_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, edit: tuple[str, str], expected: str
) -> None:
    old, new = edit
    assert old in GOOD, f"test edit does not apply: {old!r}"
    err = _errors(tmp_path, GOOD.replace(old, new, 1), capsys)
    assert "bad.yaml" in err
    assert expected in err, err


def test_extends_cycle_and_missing_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    assert main(["validate", str(tmp_path / "a.yaml")]) == 2
    assert "extends: cycle" in capsys.readouterr().err
    err = _errors(tmp_path, "extends: nowhere.yaml\nname: c\n", capsys, "c.yaml")
    assert "c.yaml:1: extends: " in err and "nowhere.yaml: file not found" in err


def test_extends_merges_maps_and_replaces_lists(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(GOOD)
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\nmodel:\n  hstu: {num_layers: 5}\n  tasks: [ctr]\n"
    )
    spec = load_spec(tmp_path / "child.yaml").spec
    assert spec.model.hstu.num_layers == 5  # overridden
    assert spec.model.hstu.num_heads == 2  # kept from the base (deep merge)
    assert spec.model.tasks == ["ctr"]  # lists replace
    assert spec.model.tables["user"].vocab_size == 500


def test_error_in_base_names_the_base_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.yaml").write_text(GOOD.replace("    num_heads: 2", "    num_heads: 3"))
    err = _errors(tmp_path, "extends: base.yaml\nname: child\n", capsys, "child.yaml")
    assert "base.yaml:9: model.hstu.num_heads: must divide attention_dim 32 (got 3)" in err


@pytest.mark.parametrize("name", ["hstu-tiny", "mtgr-small", "mtgr-base", "mtgr-large"])
def test_shipped_specs_validate(name: str) -> None:
    assert main(["validate", str(SPECS / f"{name}.yaml")]) == 0


def test_parameter_totals_reach_the_targets(capsys: pytest.CaptureFixture[str]) -> None:
    from grc.model.params import parameter_summary

    for name, target in (("mtgr-small", 2e9), ("mtgr-base", 4e9), ("mtgr-large", 8e9)):
        total = sum(c for _, _, c in parameter_summary(load_spec(SPECS / f"{name}.yaml").spec.model))
        assert 0.95 * target < total < 1.05 * target, (name, total)
    assert main(["show", str(SPECS / "mtgr-large.yaml")]) == 0
    assert "embedding total" in capsys.readouterr().out


def test_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "model" in schema["properties"] and "extends" in schema["properties"]


def _numbers_without_bounds(node: object, path: str = "") -> list[str]:
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _numbers_without_bounds(v, f"{path}/{i}")]
    if not isinstance(node, dict):
        return []
    out = [p for k, v in node.items() for p in _numbers_without_bounds(v, f"{path}/{k}")]
    if node.get("type") in ("integer", "number") and not {"maximum", "exclusiveMaximum"} & set(node):
        out.append(path)
    return out


def test_schema_publishes_a_bound_for_every_number(capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes have stated bounds, and `grc schema` publishes them (editors flag a value past one)."""
    import json

    from grc.spec import limits

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert _numbers_without_bounds(schema) == []
    hstu = schema["$defs"]["HSTUConfig"]["properties"]
    assert hstu["max_seq_len"]["maximum"] == limits.MAX_SEQ_LEN
    assert hstu["time_buckets"]["maximum"] == limits.MAX_TIME_BUCKETS
    assert schema["$defs"]["ModelConfig"]["properties"]["tables"]["patternProperties"]
    assert schema["properties"]["name"]["pattern"] == limits.NAME_PATTERN
    assert "kernels" not in schema["properties"]
