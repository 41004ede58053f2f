"""The user-history cache inside the fused model's Ranker, in-process on CPU, in float64.

A Ranker built from the config parameters the bundle writes for a cached fused model (backend pytorch:
the reference ops), then cast to float64: users sent with a user_id go through the cache step, the
same users without one through the fused model's whole dense step; both must agree to 1e-9 relative,
and with the float64 PyTorch reference. Hits, misses, invalidation and eviction are read from the
store's counters. Fresh seeds each run, printed on failure.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from grc.model.sample import random_batch
from grc.serving.common import request as rq
from grc.serving.common.validate import RequestError
from grc.serving.ranker.ranker import Ranker
from grc.serving.triton import check
from grc.serving.triton.fused_bundle import fused_config
from grc.spec.loader import load_spec
from grc.spec.schema import Spec
from tests.conftest import TEST_SPECS, run_build, write_spec
from tests.serving.test_history_cache_real import first_events, user

EXACT = 1e-9  # float64: cached and uncached differ only by summation order


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Spec, Path]:
    folder = tmp_path_factory.mktemp("fused-cache")
    spec_path = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml")
    run_build(spec_path, only=["weights"])
    model_dir = folder / "m"
    model_dir.mkdir()
    (model_dir / "weights").symlink_to(folder / "artifacts" / "mtgr-tiny" / "weights")
    return load_spec(spec_path).spec, model_dir


def params(spec: Spec, backend: str, cache: dict[str, Any] | None) -> dict[str, str]:
    """What the bundle writes for a fused model of ``backend`` (``cache``: the history_cache section)."""
    if cache is not None:
        over: dict[str, Any] = {f"bundles.triton.{k}": v for k, v in (("pipeline", "fused"), ("backend", backend))}
        over["bundles.triton.history_cache"] = cache
        if backend == "aotinductor":
            over["engine.aoti"] = {"enabled": True, "targets": ["cpu"]}
        folder = Path(tempfile.mkdtemp(prefix="fused-cache-spec-"))
        spec = load_spec(write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", over)).spec
    msg = fused_config(spec, "m", backend, None, 0 if cache is not None else None)
    return {k: v.string_value for k, v in msg.parameters.items()}


def float64_ranker(spec: Spec, model_dir: Path, cache: dict[str, Any]) -> Ranker:
    """A cached fused model of backend pytorch, in float64: its whole path (users without user_id) and
    its cached step run the same GRDense module."""
    said: list[str] = []
    ranker = Ranker.from_model_dir(model_dir, "cpu", params(spec, "pytorch", cache), log=said.append)
    assert ranker.history is not None
    assert any("history cache" in m and "GRDense.score" in m for m in said), said
    ranker.projector.double()
    ranker.dense_dtype = torch.float64
    ranker.history.dense.double()  # the very module the pytorch runner closes over
    return ranker


def with_ids(arrays: dict[str, np.ndarray], *ids: int) -> dict[str, np.ndarray]:
    return {**arrays, "user_id": np.array([[i] for i in ids], np.int64)}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def scores(ranker: Ranker, *requests: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [o["scores"] for o in ranker.rank([ranker.check(dict(r)) for r in requests])]


def test_cached_scores_equal_the_whole_path_float64(built: tuple[Spec, Path]) -> None:
    spec, model_dir = built
    seed = secrets.randbits(31)
    cached = float64_ranker(spec, model_dir, {"enabled": True})
    plain = cached  # requests without user_id: the fused model's whole dense step, nothing cached
    reference = check.Reference(spec.model, model_dir / "weights")
    full = user(spec, 36, 6, seed)
    store = cached.history.caches.cache if cached.history else None
    assert store is not None
    visits = [first_events(spec, full, 30), full, full]  # a miss, a hit with 6 new events, a hit with none
    for i, arrays in enumerate(visits):
        (got,) = scores(cached, with_ids(arrays, 11))
        (whole,) = scores(plain, arrays)
        assert rel(got, whole) <= EXACT, f"seed={seed} visit {i}: {rel(got, whole):.2e}"
        assert rel(got, reference.scores(arrays)) <= 1e-4, f"seed={seed} visit {i} vs the float64 reference"
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries) == (2, 1, 1), stats
    (again,) = scores(cached, full)  # no user_id: the whole path, nothing counted
    assert rel(again, scores(plain, full)[0]) <= EXACT and store.stats().hits == 2 and store.stats().misses == 1


def test_a_served_hit_plans_from_host_values_only(built: tuple[Spec, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The served step's reuse check is the store's, on host copies of the stamps (UserCaches.visit,
    CachedHistory.reusable_rows): neither it nor the plan reads the cached timestamps where the K/V live
    (UserKV.reusable_rows / reusable_at: a device sync per call on a GPU)."""
    from grc.model.kv_cache import UserKV

    spec, model_dir = built
    seed = secrets.randbits(31)
    cached = float64_ranker(spec, model_dir, {"enabled": True})
    full = user(spec, 36, 6, seed)
    scores(cached, with_ids(first_events(spec, full, 30), 5))  # a miss: the entry the hit reuses

    def refuse(*_: object) -> bool:
        raise AssertionError("plan_score re-checked a cache the store had checked on the host")

    monkeypatch.setattr(UserKV, "reusable_at", refuse)
    monkeypatch.setattr(UserKV, "reusable_rows", refuse)
    (hit,) = scores(cached, with_ids(full, 5))
    assert cached.history is not None and cached.history.caches.cache.stats().hits == 1
    assert rel(hit, scores(cached, full)[0]) <= EXACT, f"seed={seed}"


def test_a_mixed_batch_is_split_and_answered_in_order(built: tuple[Spec, Path]) -> None:
    """One rank() of: a request without ids, a returning user (hit), two new users in one request
    (misses), a request of a user whose history changed (a miss that replaces the entry)."""
    spec, model_dir = built
    seed = secrets.randbits(31)
    cached = float64_ranker(spec, model_dir, {"enabled": True})
    plain = cached  # requests without user_id: the fused model's whole dense step, nothing cached
    a, b = user(spec, 24, 4, seed), user(spec, 24, 4, seed + 1)
    changed = {k: v.copy() for k, v in b.items()}
    table = rq.history_input(spec.model.history[0])
    changed[table][0, 2] = (changed[table][0, 2] + 1) % spec.model.tables[spec.model.history[0]].vocab_size
    scores(cached, with_ids(first_events(spec, a, 20), 1), with_ids(b, 2))  # two misses, kept
    pair = random_batch(spec.model, 2, 16, 3, torch.Generator().manual_seed(seed + 2), exact=True)
    two = [rq.user_request(pair, u, spec.model) for u in range(2)]
    two_users = {k: np.concatenate([two[0][k], two[1][k]]) for k in two[0]}
    batch = [a, with_ids(a, 1), with_ids(two_users, 3, 4), with_ids(changed, 2)]
    store = cached.history.caches.cache if cached.history else None
    assert store is not None
    before = store.stats()
    got = scores(cached, *batch)
    expected = scores(plain, *[{k: v for k, v in r.items() if k != "user_id"} for r in batch])
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape and rel(g, e) <= EXACT, f"seed={seed} request {i}: {rel(g, e):.2e}"
    after = store.stats()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 3), (before, after)
    assert after.entries == 4


def test_a_small_budget_evicts_the_least_recently_used_user(built: tuple[Spec, Path]) -> None:
    spec, model_dir = built
    cached = float64_ranker(spec, model_dir, {"enabled": True, "budget_mb": 0.16, "max_user_mb": 0.16})
    store = cached.history.caches.cache if cached.history else None
    assert store is not None
    users = {uid: user(spec, 40, 3, seed=uid) for uid in (1, 2, 3)}
    for uid, arrays in users.items():  # float64 K/V: ~68 KB each in a ~168 KB budget
        scores(cached, with_ids(arrays, uid))
    stats = store.stats()
    assert stats.evictions >= 1 and stats.bytes <= store.budget and stats.bytes == store.stored_bytes()
    scores(cached, with_ids(users[1], 1))  # user 1 went first
    assert store.stats().misses == stats.misses + 1 and store.stats().hits == stats.hits


def test_the_cache_figures_the_served_models_export(built: tuple[Spec, Path]) -> None:
    """What fused.py and history_cached.py export (models/metrics.py, read from their UserCaches): with store arena
    the arena's counters too, in a fresh arena on this CPU instance exactly: a returning user grown in place at
    each hit, the same user twice in one step grown in place once and moved once, no step split, none unplaced;
    with copies only the store's figures are declared."""
    from grc.serving.triton.models.metrics import HISTORY_ARENA, HISTORY_CACHE, history_cache_declared
    from grc.serving.triton.models.metrics import history_cache_values as values

    spec, model_dir = built

    def quiet(_: str) -> None:
        pass

    copies = Ranker.from_model_dir(
        model_dir, "cpu", params(spec, "pytorch", {"enabled": True, "store": "copies"}), quiet
    )
    assert copies.history is not None and copies.history.caches.arena is None
    assert history_cache_declared(copies.history.caches) == HISTORY_CACHE
    assert set(values(copies.history.caches)) >= set(HISTORY_CACHE)
    ranker = Ranker.from_model_dir(
        model_dir, "cpu", params(spec, "pytorch", {"enabled": True, "store": "arena"}), quiet
    )
    assert ranker.history is not None and ranker.history.caches.arena is not None
    caches, step = ranker.history.caches, ranker.history.caches.arena
    assert history_cache_declared(caches) == {**HISTORY_CACHE, **HISTORY_ARENA}
    full = user(spec, 30, 4, seed=8)
    scores(ranker, with_ids(first_events(spec, full, 24), 8))  # a miss: a new extent, nothing moved
    scores(ranker, with_ids(full, 8), with_ids(full, 9))  # a hit grown in place; another user's miss after it
    got = values(caches)
    assert (got["hits"], got["misses"], got["in_place"], got["moves"]) == (1, 2, 1, 0), got
    twice = {k: np.concatenate([a, a]) for k, a in full.items()}
    scores(ranker, with_ids(twice, 8, 8))  # user 8 twice in one step: claimed in place once, copied once
    got = values(caches)
    assert (got["hits"], got["in_place"], got["moves"], got["splits"], got["unplaced"]) == (3, 2, 1, 0, 0), got
    assert (step.arena.in_place, step.arena.moves) == (2, 1)
    assert got["arena_bytes"] == step.arena.nbytes > caches.cache.budget
    step.splits, step.unplaced = 3, 2  # read from the step itself, not counted apart
    assert (values(caches)["splits"], values(caches)["unplaced"]) == (3, 2)


def test_user_id_is_checked_and_refused_without_a_cache(built: tuple[Spec, Path]) -> None:
    spec, model_dir = built
    arrays = user(spec, 5, 2, seed=3)
    plain = Ranker.from_model_dir(model_dir, "cpu", params(spec, "pytorch", None), log=lambda m: None)
    with pytest.raises(RequestError, match=r"user_id: this model keeps no history cache"):
        plain.check(with_ids(arrays, 1))
    cached = Ranker.from_model_dir(model_dir, "cpu", params(spec, "pytorch", {"enabled": True}), log=lambda m: None)
    with pytest.raises(RequestError, match=r"user_id: expected INT64 \[1, 1\]"):
        cached.check({**arrays, "user_id": np.zeros((1, 2), np.int64)})


@pytest.mark.parametrize("backend", ["pytorch", "pytorch_kernels", "aotinductor"])
def test_the_config_says_what_scores_cached_users(built: tuple[Spec, Path], backend: str) -> None:
    spec, _ = built
    note = params(spec, backend, {"enabled": True})["history_scoring"]
    impl = "pytorch" if backend == "pytorch" else "triton"
    assert "GRDense.score" in note and f"(impl {impl})" in note
    assert ("runs no prefill/score package" in note) == (backend == "aotinductor")


@pytest.mark.slow
def test_aotinductor_serves_cached_users_through_the_kernels_and_says_so(tmp_path: Path) -> None:
    """A built aotinductor bundle with the cache (the CPU package): users without user_id run the package,
    users with it GRDense.score (the model runs no prefill/score package), said in the load log; both agree
    with each other and with the float64 model to float32 rounding."""
    from grc.serving.triton import bundle as bd
    from grc.serving.triton.model_config import load_config

    over = {
        "engine.aoti": {"enabled": True, "targets": ["cpu"]},
        "bundles.triton": {"pipeline": "fused", "backend": "aotinductor", "history_cache": {"enabled": True}},
    }
    spec_path = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", over)
    assert run_build(spec_path, only=["triton"])["aoti"] == "built"
    spec = load_spec(spec_path).spec
    model_dir = tmp_path / "artifacts" / spec.name / "triton" / bd.MODEL_REPOSITORY / spec.name
    config = {k: v.string_value for k, v in load_config(model_dir).parameters.items()}
    said: list[str] = []
    ranker = Ranker.from_model_dir(model_dir / "1", "cpu", config, log=said.append)
    assert any("runs no prefill/score package" in m and "pytorch_kernels implementation" in m for m in said), said
    reference = check.Reference(spec.model, model_dir / "1" / "weights")
    full = user(spec, 30, 5, secrets.randbits(31))
    for arrays in (first_events(spec, full, 24), full):  # a miss, then a hit with 6 new events
        (cached,) = scores(ranker, with_ids(arrays, 9))
        (whole,) = scores(ranker, arrays)
        assert rel(cached, whole) <= 1e-5 and rel(cached, reference.scores(arrays)) <= 1e-5
    assert ranker.history is not None and ranker.history.caches.cache.stats().hits == 1
