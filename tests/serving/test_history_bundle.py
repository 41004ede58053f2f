"""The history-cached model's place in the triton bundle, without a server (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from grc.serving.common.history_cache import shard_of
from grc.serving.triton import bundle as bd
from grc.serving.triton import history_bundle as hb
from grc.serving.triton.model_config import render_config
from grc.serving.triton.models.history_router import split_by_shard
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


def test_the_bundle_lists_the_metrics_the_cached_models_declare(tmp_path: Path) -> None:
    """bundle.json and the README name the cache's figures the models export (models/metrics.py): the store's, and
    the arena's apart (declared only where the entries live in an arena)."""
    spec = spec_with(tmp_path, enabled=True, store="arena")
    described = hb.describe(spec)
    assert described["metrics"] == [
        "grc_history_cache_hits_total",
        "grc_history_cache_misses_total",
        "grc_history_cache_evictions_total",
        "grc_history_cache_bytes",
    ]
    assert described["arena_metrics"] == [
        "grc_history_cache_splits_total",
        "grc_history_cache_unplaced_total",
        "grc_history_cache_moves_total",
        "grc_history_cache_in_place_total",
        "grc_history_cache_arena_bytes",
    ]
    assert described["store"] == "arena"
    readme = hb.readme_section(spec)
    assert all(name in readme for name in described["arena_metrics"]), readme
    assert "`history_cache.store`: arena" in readme


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="budget_mb"):
        HistoryCacheConfig(budget_mb=0)


def test_several_instances_are_one_model_each_behind_a_router(tmp_path: Path) -> None:
    spec = spec_with(tmp_path, enabled=True, budget_mb=2.0, instances=3)
    (tmp_path / "manifest.json").write_text('{"shards": []}')
    configs = hb.model_configs(spec, tmp_path)
    assert [(m.name, module) for m, module in configs] == [
        ("mtgr-tiny-cache-0", "history_cached"),
        ("mtgr-tiny-cache-1", "history_cached"),
        ("mtgr-tiny-cache-2", "history_cached"),
        ("mtgr-tiny", "history_router"),
    ]
    for msg, _ in configs:
        render_config(msg)
    *shards, (router, _) = configs
    assert all(m.instance_group[0].count == 1 for m, _ in shards)
    assert router.instance_group[0].count == 3 and not router.model_warmup
    assert json.loads(router.parameters["shards"].string_value) == [m.name for m, _ in shards]
    assert [i.name for i in router.input if i.optional] == ["user_id"]
    assert hb.describe(spec)["models"] == [m.name for m, _ in shards]


def test_a_gpu_cache_model_is_pinned_to_one_gpu(tmp_path: Path) -> None:
    """count 1 with several GPUs listed (or none: every visible GPU) would start one instance, one
    store, per GPU, and Triton would spread a user's requests over them."""
    (tmp_path / "manifest.json").write_text('{"shards": []}')
    path = write_spec(
        tmp_path,
        TEST_SPECS / "mtgr-tiny.yaml",
        {
            "bundles.triton.history_cache": {"enabled": True, "instances": 3},
            "bundles.triton.instance_kind": "KIND_GPU",
            "bundles.triton.gpus": [0, 1],
        },
    )
    configs = hb.model_configs(load_spec(path).spec, tmp_path)
    assert [list(m.instance_group[0].gpus) for m, _ in configs[:3]] == [[0], [1], [0]]
    assert configs[3][0].instance_group[0].kind == configs[3][0].instance_group[0].KIND_CPU
    single = write_spec(tmp_path, path, {"bundles.triton.history_cache": {"enabled": True, "instances": 1}})
    ((msg, _),) = hb.model_configs(load_spec(single).spec, tmp_path)
    assert list(msg.instance_group[0].gpus) == [0]


def test_shards_are_stable_across_processes_and_spread_evenly() -> None:
    users = [*range(-5000, 5000, 3), 2**63 - 1, -(2**63)]
    here = [shard_of(u, 4) for u in users]
    code = f"from grc.serving.common.history_cache import shard_of; print([shard_of(u, 4) for u in {users!r}])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(there.stdout) == here
    counts = np.bincount(here, minlength=4) / len(here)
    assert counts.min() > 0.2 and counts.max() < 0.3, counts


def test_a_request_is_split_by_shard_in_order() -> None:
    users = np.array([[11], [12], [13], [14], [15], [16]], np.int64)
    parts = split_by_shard(users, 6, 2, turn=0)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(6))
    for shard, rows in parts.items():
        assert rows.tolist() == sorted(rows.tolist())
        assert all(shard_of(int(users[r, 0]), 2) == shard for r in rows)
    assert set(split_by_shard(None, 6, 2, turn=1)) == {1}  # no user: one shard, in turn
    malformed = split_by_shard(users.astype(np.int32), 6, 2, turn=0)
    assert list(malformed) == [0] and malformed[0].tolist() == list(range(6))  # refused there, with its message
