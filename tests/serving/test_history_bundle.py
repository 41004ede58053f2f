"""The history-cached model's place in the triton bundle, without a server (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from grc.serving.triton import bundle as bd
from grc.serving.triton import history_bundle as hb
from grc.serving.triton.model_config import render_config
from grc.spec.loader import load_spec
from grc.spec.schema import HistoryCacheConfig, Spec
from tests.conftest import SPECS, TEST_SPECS, write_spec


def spec_with(tmp_path: Path, **cache: object) -> Spec:
    path = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {"bundles.triton.history_cache": cache})
    return load_spec(path).spec


def test_the_cached_model_takes_the_plain_name_and_an_optional_user_id(tmp_path: Path) -> None:
    spec = spec_with(tmp_path, enabled=True, budget_mb=2.0)
    assert bd.ensemble_names(spec) == {"onnxruntime": "mtgr-tiny-onnxruntime"}
    (tmp_path / "manifest.json").write_text('{"shards": []}')
    msg = hb.cached_model_config(spec, tmp_path)
    render_config(msg)  # what Triton would refuse, refused here
    assert msg.name == "mtgr-tiny" and msg.instance_group[0].count == 1
    assert [i.name for i in msg.input if i.optional] == ["user_id"]
    assert msg.parameters["budget_bytes"].string_value == str(2 << 20)
    assert msg.parameters["max_user_bytes"].string_value == str((2 << 20) // 8)
    (tmp_path / "manifest.json").write_text('{"shards": [1]}')  # other weights: another namespace
    assert hb.cached_model_config(spec, tmp_path).parameters["weights_digest"] != msg.parameters["weights_digest"]


def test_off_by_default_and_on_in_the_shipped_mtgr_specs(tmp_path: Path) -> None:
    assert not hb.enabled(spec_with(tmp_path))
    assert bd.ensemble_names(spec_with(tmp_path))["onnxruntime"] == "mtgr-tiny"
    for name in ("mtgr-small", "mtgr-base", "mtgr-large"):
        assert hb.enabled(load_spec(SPECS / f"{name}.yaml").spec), name


def test_full_history_mask_cannot_be_cached(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path,
        TEST_SPECS / "mtgr-tiny.yaml",
        {"bundles.triton.history_cache": {"enabled": True}, "model.hstu.history_mask": "full"},
    )
    (problem,) = hb.problems(load_spec(path).spec)
    assert "history_cache: needs model.hstu.history_mask causal" in problem


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="budget_mb"):
        HistoryCacheConfig(budget_mb=0)
