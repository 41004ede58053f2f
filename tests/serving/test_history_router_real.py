"""Several history-cache instances on a REAL tritonserver (CPU): mtgr-tiny with
``history_cache.instances: 2``, i.e. models ``mtgr-tiny-cache-0`` / ``-1`` (one instance, one store
each) behind the router ``mtgr-tiny``.

Every request of a user reaches its own shard's store, whichever router instance takes it: its
second visit is a hit there and the other shard counts nothing; a request of two users on two
shards is split, answered in order, and each user's entry lands in its own shard. Answers match
the float64 PyTorch model. Skipped only where the server cannot be installed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from grc.model.sample import random_batch
from grc.serving.common import request as rq
from grc.serving.common.history_cache import shard_of
from grc.serving.triton.server import ServerInstall
from tests.serving.test_history_cache_real import Served, first_events, serve_mtgr_tiny, settled_metrics, user

pytestmark = pytest.mark.slow
SHARDS = 2


@pytest.fixture(scope="module")
def served(install: ServerInstall, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cache = {"enabled": True, "budget_mb": 4, "instances": SHARDS}
    yield from serve_mtgr_tiny(install, tmp_path_factory.mktemp("history_router"), cache)


def shard_counts(served: Served) -> dict[int, dict[str, float]]:
    """shard -> {hits, misses} from the server's metrics endpoint."""
    text = settled_metrics(served.server.metrics_url)
    out: dict[int, dict[str, float]] = {k: {"hits": 0.0, "misses": 0.0} for k in range(SHARDS)}
    name = re.escape(served.model)
    for kind, shard, value in re.findall(
        rf'^grc_history_cache_(hits|misses)_total\{{model="{name}-cache-(\d+)"\}} (\S+)$', text, re.M
    ):
        out[int(shard)][kind] = float(value)
    return out


def users_on(shard: int, count: int, start: int) -> list[int]:
    return [u for u in range(start, start + 1000) if shard_of(u, SHARDS) == shard][:count]


def test_each_user_always_reaches_its_own_shard(served: Served) -> None:
    spec = served.spec
    chosen = {k: users_on(k, 2, 1000) for k in range(SHARDS)}
    before = shard_counts(served)
    for ids in chosen.values():
        for uid in ids:
            full = user(spec, 24, 4, seed=uid)
            earlier = first_events(spec, full, 18)
            served.assert_right(earlier, served.infer(earlier, user=uid))  # miss
            for _ in range(3):  # the router's instances take turns: every visit must find the entry
                served.assert_right(full, served.infer(full, user=uid))
    after = shard_counts(served)
    for k, ids in chosen.items():
        assert after[k]["misses"] - before[k]["misses"] == len(ids), (k, before, after)
        assert after[k]["hits"] - before[k]["hits"] == 3 * len(ids), (k, before, after)


def test_a_request_of_users_on_two_shards_is_split_and_answered_in_order(served: Served) -> None:
    spec = served.spec
    a, b = users_on(0, 1, 5000)[0], users_on(1, 1, 5000)[0]
    batch = random_batch(spec.model, 2, 20, 3, torch.Generator().manual_seed(a), exact=True)
    both = [rq.user_request(batch, u, spec.model) for u in range(2)]
    arrays = {k: np.concatenate([both[0][k], both[1][k]]) for k in both[0]}
    ids = np.array([[a], [b]], np.int64)
    before = shard_counts(served)
    first = served.infer({**arrays, "user_id": ids}, user=None)
    served.assert_right(arrays, first)
    again = served.infer({**arrays, "user_id": ids}, user=None)
    served.assert_right(arrays, again)
    np.testing.assert_array_equal(first["ranked_items"], again["ranked_items"])
    after = shard_counts(served)
    for k in range(SHARDS):  # one user each: a miss, then a hit
        assert (after[k]["misses"] - before[k]["misses"], after[k]["hits"] - before[k]["hits"]) == (1, 1)
    single = served.infer(both[1], user=b)  # user b alone: found in its shard
    served.assert_right(both[1], single)
    assert shard_counts(served)[1]["hits"] - after[1]["hits"] == 1
