"""The history cache in the FUSED model on a REAL tritonserver (CPU): mtgr-tiny with pipeline fused,
backend pytorch_kernels (grc's kernels; their PyTorch reference on a CPU), instance_count 2 and
``history_cache.instances: 2``, i.e. fused models ``mtgr-tiny-cache-0`` / ``-1`` (one instance, one store
each) behind the router ``mtgr-tiny``, each store a small budget so that eviction happens.

A hit scores like the same request without user_id (the fused model's whole dense step) and like the
float64 PyTorch model; a changed prefix is a miss; the least-recently-used user is evicted; a bad request
sent with hits in one batch fails alone; every request of a user reaches its own store whichever router
instance takes it. Figures from the server's metrics endpoint. Skipped only where the server cannot be
installed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from grc.serving.common import request as rq
from grc.serving.common.history_cache import shard_of
from grc.serving.triton import bundle as bd
from grc.serving.triton import check
from grc.serving.triton.model_config import load_config
from grc.serving.triton.server import ServerInstall, TritonServer
from grc.spec.loader import load_spec
from grc.spec.schema import Spec
from tests.conftest import TEST_SPECS, in_dir, run_build, write_spec
from tests.serving.test_history_cache_real import first_events, settled_metrics, user

pytestmark = pytest.mark.slow
SHARDS = 2
BUDGET_MB = 0.08  # ~2 users of 40 events in mtgr-tiny (~34 KB each) per store


class Served:
    def __init__(self, spec: Spec, folder: Path, server: TritonServer):
        self.spec, self.server, self.folder = spec, server, folder
        self.model = bd.load_description(folder)["ensemble"]
        weights = folder / bd.MODEL_REPOSITORY / f"{self.model}-cache-0" / "1" / "weights"
        self.reference = check.Reference(spec.model, weights)

    def infer(self, arrays: dict[str, np.ndarray], user: int | None, model: str | None = None) -> dict[str, np.ndarray]:
        if user is not None:
            arrays = {**arrays, "user_id": np.array([[user]], np.int64)}
        return check.infer(self.server.http_url, "http", model or self.model, arrays)

    def counts(self) -> dict[int, dict[str, float]]:
        """shard -> {hits, misses, evictions, bytes} from the metrics endpoint."""
        text = settled_metrics(self.server.metrics_url)
        out: dict[int, dict[str, float]] = {k: {} for k in range(SHARDS)}
        name = re.escape(self.model)
        for kind, shard, value in re.findall(
            rf'^grc_history_cache_(\w+?)(?:_total)?\{{model="{name}-cache-(\d+)"\}} (\S+)$', text, re.M
        ):
            out[int(shard)][kind] = float(value)
        return out

    def assert_right(self, arrays: dict[str, np.ndarray], response: dict[str, np.ndarray]) -> None:
        result = check.spec_check(self.spec, response, self.reference.scores(arrays), arrays)
        assert result.ok, result.problems


TRITON = {
    "pipeline": "fused",
    "backend": "pytorch_kernels",
    "instance_count": SHARDS,
    "max_queue_delay_us": 20000,
    "history_cache": {"enabled": True, "instances": SHARDS, "budget_mb": BUDGET_MB, "max_user_mb": BUDGET_MB},
}


@pytest.fixture(scope="module")
def served(install: ServerInstall, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("fused_history_cache")
    spec_path = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", {"bundles.triton": TRITON})
    statuses = run_build(spec_path, only=["triton"])
    assert statuses["triton"] == "built" and "export" not in statuses  # fused: no ONNX
    spec = load_spec(spec_path).spec
    bundle = folder / "artifacts" / spec.name / "triton"
    with TritonServer(bundle / bd.MODEL_REPOSITORY, install=install, startup_timeout_s=240) as server:
        yield Served(spec, bundle, server)


def users_on(shard: int, count: int, start: int) -> list[int]:
    return [u for u in range(start, start + 1000) if shard_of(u, SHARDS) == shard][:count]


def delta(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]], shard: int, kind: str) -> float:
    return after[shard].get(kind, 0.0) - before[shard].get(kind, 0.0)


def test_the_bundle_serves_cached_fused_models_behind_the_router(served: Served) -> None:
    repo = served.server.model_repository
    assert served.model == "mtgr-tiny"
    assert sorted(p.name for p in repo.iterdir()) == ["mtgr-tiny", "mtgr-tiny-cache-0", "mtgr-tiny-cache-1"]
    description = bd.load_description(served.folder)
    assert description["history_cache"]["module"] == "fused"
    assert "pytorch_kernels" in description["history_cache"]["scoring"]
    for k in range(SHARDS):
        config = load_config(repo / f"mtgr-tiny-cache-{k}")
        user_id = next(i for i in config.input if i.name == "user_id")
        assert user_id.optional and list(user_id.dims) == [1]
        assert config.instance_group[0].count == 1  # one store every request of its users reaches
        assert config.parameters["backend"].string_value == "pytorch_kernels"
        assert "GRDense.score" in config.parameters["history_scoring"].string_value
    readme = (served.folder / "README.md").read_text()
    assert "a router (`history_router`) in front of 2 cached models" in readme
    assert "users with user_id: GRDense.score with grc's Triton kernels" in readme


def test_a_hit_scores_like_the_uncached_request(served: Served) -> None:
    spec = served.spec
    uid = users_on(0, 1, 100)[0]
    full = user(spec, 36, 6, seed=1)
    before = served.counts()
    first = served.infer(first_events(spec, full, 30), user=uid)  # miss: computed whole, kept
    served.assert_right(first_events(spec, full, 30), first)
    cached = served.infer(full, user=uid)  # hit: 6 new events + 6 candidates
    again = served.infer(full, user=uid)  # hit with an empty delta: only the candidates
    plain = served.infer(full, user=None)  # no user_id: the whole dense step, nothing cached or counted
    after = served.counts()
    assert delta(before, after, 0, "hits") == 2 and delta(before, after, 0, "misses") == 1, (before, after)
    assert delta(before, after, 1, "hits") == 0 and delta(before, after, 1, "misses") == 0
    for response in (cached, again):
        served.assert_right(full, response)
        np.testing.assert_allclose(response["scores"], plain["scores"], rtol=1e-5, atol=1e-6)
        assert np.array_equal(response["ranked_items"], plain["ranked_items"])
    assert after[0]["bytes"] > 0
    assert not set(ARENA_FIGURES) & set(after[0]), after  # store auto on a CPU instance: copies, no arena


def test_a_changed_history_prefix_is_a_miss(served: Served) -> None:
    spec = served.spec
    uid = users_on(1, 1, 200)[0]
    full = user(spec, 20, 4, seed=2)
    served.infer(full, user=uid)
    changed = {k: a.copy() for k, a in full.items()}
    table = rq.history_input(spec.model.history[0])
    changed[table][0, 3] = (changed[table][0, 3] + 1) % spec.model.tables[spec.model.history[0]].vocab_size
    moved = {k: a.copy() for k, a in full.items()}
    moved[rq.HISTORY_TIME][0, 0] -= 1  # same ids, another timestamp
    before = served.counts()
    served.assert_right(changed, served.infer(changed, user=uid))
    served.assert_right(moved, served.infer(moved, user=uid))
    after = served.counts()
    assert delta(before, after, 1, "misses") == 2 and delta(before, after, 1, "hits") == 0, (before, after)


def test_a_small_budget_evicts_the_least_recently_used_user(served: Served) -> None:
    spec = served.spec
    ids = users_on(0, 3, 300)
    users = {uid: user(spec, 40, 3, seed=uid) for uid in ids}
    before = served.counts()
    for uid, arrays in users.items():  # three ~34 KB entries in one ~84 KB store
        served.infer(arrays, user=uid)
    mid = served.counts()
    assert delta(before, mid, 0, "evictions") >= 1 and mid[0]["bytes"] <= BUDGET_MB * (1 << 20)
    served.assert_right(users[ids[0]], served.infer(users[ids[0]], user=ids[0]))  # evicted first
    after = served.counts()
    assert delta(mid, after, 0, "misses") == 1 and delta(mid, after, 0, "hits") == 0, (mid, after)


def test_a_bad_request_among_hits_fails_alone(served: Served) -> None:
    """Sent together to one store's model (its batcher waits 20 ms to merge them): two returning users
    (hits), a request without user_id, and a bad one; the bad one gets 400 naming the problem, every
    good one its right answer, and the hits still count."""
    spec = served.spec
    shard_model = f"{served.model}-cache-0"
    ids = users_on(0, 2, 400)
    visits = {uid: user(spec, 24, 4, seed=uid) for uid in ids}
    for uid, arrays in visits.items():
        served.infer(first_events(spec, arrays, 20), user=uid, model=shard_model)  # misses, kept
    plain = user(spec, 10, 3, seed=5)
    bad = {**plain, "candidate_item": np.full_like(plain["candidate_item"], spec.model.tables["item"].vocab_size)}
    jobs: list[tuple[dict[str, np.ndarray], int | None]] = [*((a, u) for u, a in visits.items()), (plain, None)]
    jobs.append((bad, ids[0]))
    answers: dict[int, Any] = {}

    def send(i: int, arrays: dict[str, np.ndarray], uid: int | None) -> None:
        try:
            answers[i] = served.infer(arrays, user=uid, model=shard_model)
        except Exception as exc:
            answers[i] = exc

    before = served.counts()
    threads = [threading.Thread(target=send, args=(i, a, u)) for i, (a, u) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "bad request: candidate_item: unknown id 2000" in str(answers[3]), answers[3]
    for i, (arrays, _) in enumerate(jobs[:3]):
        assert isinstance(answers[i], dict), answers[i]
        served.assert_right(arrays, answers[i])
    assert delta(before, served.counts(), 0, "hits") == 2


def test_each_user_always_reaches_its_own_store(served: Served) -> None:
    spec = served.spec
    chosen = {k: users_on(k, 2, 1000) for k in range(SHARDS)}
    before = served.counts()
    for ids in chosen.values():
        for uid in ids:
            full = user(spec, 24, 4, seed=uid)
            earlier = first_events(spec, full, 18)
            served.assert_right(earlier, served.infer(earlier, user=uid))  # miss
            for _ in range(3):  # the router's two instances take turns: every visit must find the entry
                served.assert_right(full, served.infer(full, user=uid))
    after = served.counts()
    for k, ids in chosen.items():
        assert delta(before, after, k, "misses") == len(ids), (k, before, after)
        assert delta(before, after, k, "hits") == 3 * len(ids), (k, before, after)


def test_a_request_of_users_on_two_stores_is_split_and_answered_in_order(served: Served) -> None:
    spec = served.spec
    a, b = users_on(0, 1, 5000)[0], users_on(1, 1, 5000)[0]
    both = [user(spec, 20, 3, seed=a), user(spec, 20, 3, seed=b)]
    arrays = {k: np.concatenate([both[0][k], both[1][k]]) for k in both[0]}
    ids = np.array([[a], [b]], np.int64)
    before = served.counts()
    first = served.infer({**arrays, "user_id": ids}, user=None)
    again = served.infer({**arrays, "user_id": ids}, user=None)
    for response in (first, again):
        served.assert_right(arrays, response)
    after = served.counts()
    for k in range(SHARDS):  # one user each: a miss, then a hit
        assert (delta(before, after, k, "misses"), delta(before, after, k, "hits")) == (1, 1), (k, before, after)


ARENA_FIGURES = ("splits", "unplaced", "moves", "in_place", "arena_bytes")


def test_with_store_arena_the_fused_models_export_the_arenas_figures(install: ServerInstall, tmp_path: Path) -> None:
    """store arena (on these CPU instances each store's arena is host memory, its steps eager): each fused model
    exports the arena's own figures (models/metrics.py HISTORY_ARENA). A returning user's entry grows where it lies;
    the same user twice in one request is grown in place once and moved once; nothing split or unplaced; the other
    store, untouched, exports its arena's zeros."""
    cache = {"enabled": True, "instances": SHARDS, "budget_mb": BUDGET_MB, "max_user_mb": BUDGET_MB, "store": "arena"}
    triton = {**TRITON, "history_cache": cache}
    spec_path = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {"bundles.triton": triton})
    run_build(spec_path, only=["triton"])
    spec = load_spec(spec_path).spec
    bundle = tmp_path / "artifacts" / spec.name / "triton"
    with TritonServer(bundle / bd.MODEL_REPOSITORY, install=install, startup_timeout_s=240) as server:
        served = Served(spec, bundle, server)
        uid = users_on(0, 1, 800)[0]
        full = user(spec, 30, 4, seed=8)
        before = served.counts()
        served.assert_right(first_events(spec, full, 24), served.infer(first_events(spec, full, 24), user=uid))
        for _ in range(2):  # 6 new events, then none: grown in place each time (the rows after it are free)
            served.assert_right(full, served.infer(full, user=uid))
        mid = served.counts()
        assert (delta(before, mid, 0, "hits"), delta(before, mid, 0, "misses")) == (2, 1), (before, mid)
        assert (delta(before, mid, 0, "in_place"), delta(before, mid, 0, "moves")) == (2, 0), (before, mid)
        twice = {k: np.concatenate([a, a]) for k, a in full.items()}
        response = served.infer({**twice, "user_id": np.array([[uid], [uid]], np.int64)}, user=None)
        served.assert_right(twice, response)
        after = served.counts()
        assert (delta(mid, after, 0, "in_place"), delta(mid, after, 0, "moves")) == (1, 1), (mid, after)
        for k in range(SHARDS):
            assert (after[k]["splits"], after[k]["unplaced"]) == (0, 0), after
            assert after[k]["arena_bytes"] > BUDGET_MB * (1 << 20), after  # the budget's rows and a step's headroom
        assert (after[1]["in_place"], after[1]["moves"]) == (0, 0), after


def test_grc_deploy_smoke_tests_the_router(install: ServerInstall, tmp_path: Path, capsys: Any) -> None:
    """``grc deploy`` reads the built model from the bundle: with a router in front, from its first store
    (the router holds neither the model config nor weights)."""
    from grc.cli import main

    spec_path = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {"bundles.triton": TRITON})
    run_build(spec_path, only=["triton"])
    with in_dir(tmp_path):
        assert main(["deploy", "--target", "triton", spec_path.name, "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "smoke test: mtgr-tiny vs PyTorch" in out and out.count(" ok ") >= 2, out
