"""The history cache served by a REAL tritonserver (CPU): mtgr-tiny built with
bundles.triton.history_cache on, a small budget so that eviction happens.

Cached answers equal uncached ones and the float64 PyTorch model; a changed history prefix is a
miss; a small budget evicts least-recently-used users; the figures (the store's, and with store arena the
arena's) are read from the server's metrics endpoint. Skipped only where the server cannot be installed.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from grc.model.sample import random_batch
from grc.serving.common import request as rq
from grc.serving.triton import bundle as bd
from grc.serving.triton import check
from grc.serving.triton.model_config import load_config
from grc.serving.triton.models.metrics import HISTORY_CACHE_EVERY_S
from grc.serving.triton.server import ServerInstall, TritonServer
from grc.spec.loader import load_spec
from grc.spec.schema import Spec
from tests.conftest import TEST_SPECS, run_build, write_spec

pytestmark = pytest.mark.slow
BUDGET_MB = 0.08  # ~2 users of 40 events in mtgr-tiny (~34 KB each)
# the cache's counters are sent at most every HISTORY_CACHE_EVERY_S, what waits by the model's own thread once that is
# over (models/metrics.py): read that long after the last request, with slack for a loaded host, they are exact
SETTLE_S = HISTORY_CACHE_EVERY_S + 0.25


def settled_metrics(url: str) -> str:
    """The server's metrics text once the history cache's counters of every request answered so far were sent."""
    time.sleep(SETTLE_S)
    return urllib.request.urlopen(url, timeout=10).read().decode()


class Served:
    def __init__(self, spec: Spec, folder: Path, server: TritonServer):
        self.spec, self.server = spec, server
        self.model = bd.load_description(folder)["ensemble"]
        weights = folder / bd.MODEL_REPOSITORY / bd.PREPROCESS / "1" / "weights"
        self.reference = check.Reference(spec.model, weights)

    def infer(self, arrays: dict[str, np.ndarray], user: int | None) -> dict[str, np.ndarray]:
        if user is not None:
            arrays = {**arrays, "user_id": np.array([[user]], np.int64)}
        return check.infer(self.server.http_url, "http", self.model, arrays)

    def metrics(self) -> dict[str, float]:
        text = settled_metrics(self.server.metrics_url)
        found = re.findall(r'^(grc_history_cache_\w+)\{model="' + re.escape(self.model) + r'"\} (\S+)$', text, re.M)
        return {name: float(value) for name, value in found}

    def assert_right(self, arrays: dict[str, np.ndarray], response: dict[str, np.ndarray]) -> None:
        result = check.spec_check(self.spec, response, self.reference.scores(arrays), arrays)
        assert result.ok, result.problems


def serve_mtgr_tiny(install: ServerInstall, folder: Path, cache: Mapping[str, object]) -> Iterator[Served]:
    """mtgr-tiny built with ``bundles.triton.history_cache: cache`` in ``folder``, on a started server."""
    spec_path = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", {"bundles.triton.history_cache": cache})
    run_build(spec_path, only=["triton"])
    spec = load_spec(spec_path).spec
    bundle = folder / "artifacts" / spec.name / "triton"
    with TritonServer(bundle / bd.MODEL_REPOSITORY, install=install, startup_timeout_s=180) as server:
        yield Served(spec, bundle, server)


@pytest.fixture(scope="module", params=["auto", "arena"])
def served(install: ServerInstall, tmp_path_factory: pytest.TempPathFactory, request: Any) -> Iterator[Served]:
    """store auto (on a CPU instance a tensor per entry) and arena (entries as rows of one host buffer, the GPU
    default's bookkeeping): every test below runs against both."""
    cache = {"enabled": True, "budget_mb": BUDGET_MB, "max_user_mb": BUDGET_MB, "store": request.param}
    yield from serve_mtgr_tiny(install, tmp_path_factory.mktemp("history_cache"), cache)


def user(spec: Spec, history: int, candidates: int, seed: int) -> dict[str, np.ndarray]:
    return rq.user_request(
        random_batch(spec.model, 1, history, candidates, torch.Generator().manual_seed(seed)), 0, spec.model
    )


def first_events(spec: Spec, arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The same request with only its first ``n`` history events (an earlier visit)."""
    history = {rq.history_input(t) for t in spec.model.history} | {rq.HISTORY_TIME}
    return {k: a[:, :n] if k in history else a for k, a in arrays.items()}


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[f"grc_history_cache_{name}"] - before.get(f"grc_history_cache_{name}", 0.0)


def test_the_bundle_serves_the_cached_model_under_the_plain_name(served: Served) -> None:
    assert served.model == served.spec.name
    repo = served.server.model_repository
    config = load_config(repo / served.model)
    user_id = next(i for i in config.input if i.name == "user_id")
    assert user_id.optional and list(user_id.dims) == [1]
    assert config.instance_group[0].count == 1  # one store every request of a user reaches
    assert (repo / f"{served.model}-onnxruntime").is_dir()  # the uncached ensemble stays


def test_a_hit_scores_like_the_uncached_request(served: Served) -> None:
    spec = served.spec
    full = user(spec, 36, 6, seed=1)
    before = served.metrics()
    first = served.infer(first_events(spec, full, 30), user=101)  # miss: computed whole, kept
    served.assert_right(first_events(spec, full, 30), first)
    cached = served.infer(full, user=101)  # hit: 6 new events + 6 candidates computed
    again = served.infer(full, user=101)  # hit with an empty delta: only the candidates
    plain = served.infer(full, user=None)  # no user_id: nothing cached, nothing counted
    after = served.metrics()
    assert delta(before, after, "hits_total") == 2
    assert delta(before, after, "misses_total") == 1
    for response in (cached, again):
        served.assert_right(full, response)
        np.testing.assert_allclose(response["scores"], plain["scores"], rtol=1e-5, atol=1e-6)
        assert np.array_equal(response["ranked_items"], plain["ranked_items"])
    assert after["grc_history_cache_bytes"] > 0


def test_a_changed_history_prefix_is_a_miss(served: Served) -> None:
    spec = served.spec
    full = user(spec, 20, 4, seed=2)
    served.infer(full, user=202)
    changed = {k: a.copy() for k, a in full.items()}
    table = spec.model.history[0]
    changed[rq.history_input(table)][0, 3] = (changed[rq.history_input(table)][0, 3] + 1) % 2000
    before = served.metrics()
    response = served.infer(changed, user=202)
    served.assert_right(changed, response)
    moved = {k: a.copy() for k, a in full.items()}
    moved[rq.HISTORY_TIME][0, 0] -= 1  # same ids, another timestamp
    served.assert_right(moved, served.infer(moved, user=202))
    after = served.metrics()
    assert delta(before, after, "misses_total") == 2 and delta(before, after, "hits_total") == 0


def test_a_small_budget_evicts_the_least_recently_used_users(served: Served) -> None:
    spec = served.spec
    users = {uid: user(spec, 40, 3, seed=uid) for uid in (301, 302, 303)}
    before = served.metrics()
    for uid, arrays in users.items():  # three ~34 KB entries in a ~84 KB budget
        served.infer(arrays, user=uid)
    mid = served.metrics()
    assert delta(before, mid, "evictions_total") >= 1
    assert mid["grc_history_cache_bytes"] <= BUDGET_MB * (1 << 20)
    served.assert_right(users[301], served.infer(users[301], user=301))  # 301 was evicted first
    after = served.metrics()
    assert delta(mid, after, "misses_total") == 1 and delta(mid, after, "hits_total") == 0


def test_a_bad_user_id_is_refused_and_the_server_serves_on(served: Served) -> None:
    arrays = user(served.spec, 5, 2, seed=4)
    with pytest.raises(InferenceServerException, match="user_id"):  # Triton checks the config's dims
        check.infer(served.server.http_url, "http", served.model, {**arrays, "user_id": np.zeros((1, 2), np.int64)})
    served.assert_right(arrays, served.infer(arrays, user=5))


def test_a_history_cut_at_the_length_limit_is_a_miss_then_a_hit(served: Served) -> None:
    spec = served.spec
    room = spec.model.hstu.max_seq_len - len(spec.model.profile) - 4  # events that fit beside 4 candidates
    longer = user(spec, room + 2, 4, seed=6)
    at_limit = first_events(spec, longer, room)
    before = served.metrics()
    served.assert_right(at_limit, served.infer(at_limit, user=606))  # miss: kept whole
    served.assert_right(longer, served.infer(longer, user=606))  # cut to its latest events: slid, a miss
    served.assert_right(longer, served.infer(longer, user=606))  # cut the same way again: a hit
    after = served.metrics()
    assert delta(before, after, "misses_total") == 2 and delta(before, after, "hits_total") == 1


ARENA_FIGURES = ("splits_total", "unplaced_total", "moves_total", "in_place_total", "arena_bytes")


def test_the_arena_counts_entries_grown_in_place_and_moved(served: Served) -> None:
    """The arena's own figures on the metrics port (models/metrics.py HISTORY_ARENA), with store arena: a returning
    user's entry grows where it lies; the same user twice in one request is grown in place once and moved (copied to
    a new extent) once. Requests of one or two users always fit the arena's headroom: no step split, none unplaced.
    A store of copies (auto, on this CPU instance) has no arena and declares none of them."""
    spec = served.spec
    before = served.metrics()
    if spec.bundles.triton.history_cache.store != "arena":
        assert not {f"grc_history_cache_{f}" for f in ARENA_FIGURES} & set(before), before
        return
    full = user(spec, 30, 4, seed=8)
    served.assert_right(first_events(spec, full, 24), served.infer(first_events(spec, full, 24), user=808))  # miss
    served.assert_right(full, served.infer(full, user=808))  # a hit with 6 new events: grown in place or moved
    served.assert_right(full, served.infer(full, user=808))  # no new events: its candidates' rows came back after it
    mid = served.metrics()
    assert delta(before, mid, "hits_total") == 2 and delta(before, mid, "misses_total") == 1
    assert delta(before, mid, "in_place_total") >= 1, (before, mid)
    assert delta(before, mid, "in_place_total") + delta(before, mid, "moves_total") == 2, (before, mid)
    twice = {k: np.concatenate([a, a]) for k, a in full.items()}
    ids = np.array([[808], [808]], np.int64)
    response = check.infer(served.server.http_url, "http", served.model, {**twice, "user_id": ids})
    served.assert_right(twice, response)
    after = served.metrics()
    assert delta(mid, after, "hits_total") == 2
    assert (delta(mid, after, "in_place_total"), delta(mid, after, "moves_total")) == (1, 1), (mid, after)
    assert after["grc_history_cache_splits_total"] == 0 and after["grc_history_cache_unplaced_total"] == 0, after
    assert after["grc_history_cache_arena_bytes"] > BUDGET_MB * (1 << 20)  # the budget's rows and one step's headroom


def test_a_visit_a_minute_later_reuses_the_older_events(served: Served) -> None:
    """The newest events are seconds old: a minute later their time buckets against the profile
    tokens moved, the older events' did not. The visit is a hit that reuses the older rows and
    recomputes the rest, and its scores are still the float64 model's."""
    spec = served.spec
    full = user(spec, 30, 4, seed=7)
    now = int(full[rq.REQUEST_TIME][0, 0])
    stamps = now - 86_400 * np.arange(30, 0, -1)  # a day apart, oldest first (no bucket edge within 60 s)
    stamps[24:27] = [now - 9, now - 6, now - 3]  # then three events seconds before the first visit
    stamps[27:] = [now + 10, now + 20, now + 30]  # and three before the second
    full[rq.HISTORY_TIME] = stamps[None].astype(np.int64)
    first = first_events(spec, full, 27) | {rq.REQUEST_TIME: np.array([[now]], np.int64)}
    later = full | {rq.REQUEST_TIME: np.array([[now + 60]], np.int64)}
    before = served.metrics()
    served.assert_right(first, served.infer(first, user=707))  # miss: 27 events kept
    served.assert_right(later, served.infer(later, user=707))  # 60 s later: a hit on the 24 older rows
    after = served.metrics()
    assert delta(before, after, "misses_total") == 1 and delta(before, after, "hits_total") == 1
