"""RequestParser.check_all and Ranker.check_all (an execute's requests checked together) answer each request
exactly as the one-by-one check does: the same arrays for a good one, the same RequestError words for a bad
one, whatever else is in the batch. Fast: no server, mtgr-tiny (it has cross features)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from grc.serving.common import request as rq
from grc.serving.common import validate
from grc.serving.common.validate import RequestError, RequestParser
from grc.serving.ranker.ranker import Ranker
from grc.serving.triton import bundle as bd
from grc.spec.loader import load_spec
from grc.spec.schema import ModelConfig, Spec
from tests.conftest import TEST_SPECS
from tests.serving.test_fused_history_cache import built, params  # noqa: F401 (built: a fixture)

Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def spec() -> Spec:
    return load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec


def _set(name: str, at: tuple[int, ...], value: Any) -> Callable[[Arrays, ModelConfig], None]:
    def change(r: Arrays, cfg: ModelConfig) -> None:
        r[name] = r[name].copy()
        r[name][at] = value

    return change


def _long_history(r: Arrays, cfg: ModelConfig) -> None:
    """More events than the model keeps, not in time order (truncation keeps the newest by time)."""
    h = rq.max_history(cfg) + 7
    rng = np.random.default_rng(h)
    for t in cfg.history:
        r[rq.history_input(t)] = rng.integers(0, cfg.tables[t].vocab_size, (1, h), dtype=np.int64)
    r[rq.HISTORY_TIME] = rng.permutation(h).astype(np.int64)[None] + 1_000


def _both(*changes: Callable[[Arrays, ModelConfig], None]) -> Callable[[Arrays, ModelConfig], None]:
    def change(r: Arrays, cfg: ModelConfig) -> None:
        for c in changes:
            c(r, cfg)

    return change


ITEM = 2000  # mtgr-tiny's item vocabulary
CASES: dict[str, Callable[[Arrays, ModelConfig], object]] = {
    "good": lambda r, cfg: None,
    "unknown id": _set("candidate_item", (0, 3), 10_000),
    "id at the vocabulary's edge": _set("history_item", (0, 1), ITEM),
    "last id": _set("history_item", (0, 1), ITEM - 1),  # accepted
    "negative id": _set("profile_city", (0, 0), -1),
    "history time out of range": _set(rq.HISTORY_TIME, (0, 2), validate.TIME_MAX + 1),
    "request time out of range": _set(rq.REQUEST_TIME, (0, 0), validate.TIME_MIN - 1),
    "time at the range's edge": _set(rq.REQUEST_TIME, (0, 0), validate.TIME_MAX),  # accepted
    "NaN cross": _set(rq.CROSS, (0, 1, 2), np.nan),
    "inf cross": _set(rq.CROSS, (0, 0, 0), -np.inf),
    "wrong dtype": lambda r, cfg: r.update(history_action=r["history_action"].astype(np.int32)),
    "wrong shape": lambda r, cfg: r.update(profile_user=r["profile_user"][:, None]),
    "wrong fixed dimension": lambda r, cfg: r.update(cross_features=r["cross_features"][:, :, :2]),
    "missing input": lambda r, cfg: r.pop("request_time"),
    "batch differs": lambda r, cfg: r.update(request_time=np.zeros((2, 1), np.int64)),
    "lengths differ": lambda r, cfg: r.update(history_action=r["history_action"][:, :1]),
    "too many candidates": lambda r, cfg: r.update(
        {
            n: np.repeat(r[n][:, :1], cfg.max_candidates + 1, axis=1)
            for n in (*map(rq.candidate_input, cfg.candidate), rq.CROSS)
        }
    ),
    "long history": _long_history,  # kept newest (truncate) or refused
    "long history, unknown id": _both(_long_history, _set("candidate_item", (0, 0), ITEM)),  # the id named first
    "unknown id and time": _both(_set(rq.HISTORY_TIME, (0, 0), -(2**62)), _set("candidate_category", (0, 0), 50)),
}


def _request(spec: Spec, case: str, users: int = 1) -> Arrays:
    one = bd.sample_request(spec)
    r = rq.stack_requests([one] * users) if users > 1 else dict(one)
    CASES[case](r, spec.model)
    return r


def _same_answer(got: Arrays | RequestError, check: Callable[[Any], Arrays], request: Arrays, what: str) -> None:
    """``got`` (from a batch) is what ``check`` (one by one) returns or raises for ``request``."""
    try:
        want = check(dict(request))
    except RequestError as exc:
        assert isinstance(got, RequestError), (what, got)
        assert str(got) == str(exc), what
        return
    assert isinstance(got, dict), (what, got)
    assert got.keys() == want.keys(), what
    for name in want:
        assert got[name].dtype == want[name].dtype, (what, name)
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


@pytest.mark.parametrize("truncate", [True, False])
def test_a_mixed_batch_gets_what_each_request_gets_alone(spec: Spec, truncate: bool) -> None:
    parser = RequestParser(spec.model, truncate)
    cases = list(CASES)
    requests = [_request(spec, c) for c in cases] + [_request(spec, "good", users=3)]
    got = parser.check_all([dict(r) for r in requests])
    assert len(got) == len(requests)
    for case, r, answer in zip([*cases, "3 users"], requests, got, strict=True):
        _same_answer(answer, parser, r, case)
    refused = {c for c, a in zip(cases, got, strict=False) if isinstance(a, RequestError)}
    accepted = {"good", "last id", "time at the range's edge"} | ({"long history"} if truncate else set())
    assert refused == set(cases) - accepted


def test_random_batches_answer_as_one_by_one(spec: Spec) -> None:
    """Random mixes (repeats, several bad at once, a bad user among several, all bad, all good)."""
    rng = random.Random(5)
    parser = RequestParser(spec.model, truncate=True)
    pool = [(c, _request(spec, c)) for c in CASES]
    pool += [(f"3 users, {c}", rq.stack_requests([_request(spec, "good"), _request(spec, c), _request(spec, "good")]))
             for c in ("unknown id", "NaN cross", "history time out of range")]  # fmt: skip
    for trial in range(40):
        batch = rng.choices(pool, k=rng.randint(1, 8))
        if trial == 0:
            batch = [p for p in pool if p[0] == "good"] * 5
        got = parser.check_all([dict(r) for _, r in batch])
        for (case, r), answer in zip(batch, got, strict=True):
            _same_answer(answer, parser, r, f"trial {trial}: {case}")
    assert parser.check_all([]) == []


def test_check_all_leaves_the_requests_as_sent(spec: Spec) -> None:
    """A long history is cut in the answer, not in the arrays the client sent (they may be the server's
    zero-copy views)."""
    parser = RequestParser(spec.model, truncate=True)
    requests = [_request(spec, "long history"), _request(spec, "good")]
    sent = [{k: v.copy() for k, v in r.items()} for r in requests]
    parser.check_all(requests)
    for r, s in zip(requests, sent, strict=True):
        assert r.keys() == s.keys()
        for name in r:
            np.testing.assert_array_equal(r[name], s[name])


def test_ranker_check_all_answers_as_check(spec: Spec, built: tuple[Spec, Path]) -> None:  # noqa: F811
    """The user_id rules too: refused without a cache, its shape checked after the request's."""
    spec, model_dir = built
    plain = Ranker.from_model_dir(model_dir, "cpu", params(spec, "pytorch", None), log=lambda m: None)
    cached = Ranker.from_model_dir(model_dir, "cpu", params(spec, "pytorch", {"enabled": True}), log=lambda m: None)
    good, bad = _request(spec, "good"), _request(spec, "unknown id")
    requests = [
        good,
        {**good, "user_id": np.array([[7]], np.int64)},
        {**good, "user_id": np.zeros((1, 2), np.int64)},  # a bad user_id shape
        {**bad, "user_id": np.zeros((1, 2), np.int64)},  # the request's problem named first
        bad,
        {**_request(spec, "good", users=2), "user_id": np.array([[1], [2]], np.int64)},
    ]
    for ranker in (plain, cached):
        got = ranker.check_all(requests)
        for i, (r, answer) in enumerate(zip(requests, got, strict=True)):
            _same_answer(answer, ranker.check, r, f"request {i}")
    assert [isinstance(a, dict) for a in cached.check_all(requests)] == [True, True, False, False, False, True]
    assert [isinstance(a, dict) for a in plain.check_all(requests)] == [True, False, False, False, False, False]


@pytest.fixture
def fake_io(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """steps.execute's reads and responses without a python-backend stub: a request is its dict of arrays, a
    response ("ok", outputs) or ("error", message, is a bad request); the log is returned."""
    from grc.serving.triton.models import steps

    logged: list[str] = []
    monkeypatch.setattr(steps.io, "read_all", lambda request, names: {n: request.get(n) for n in names})
    monkeypatch.setattr(steps.io, "response", lambda out: ("ok", out))
    monkeypatch.setattr(
        steps.io, "error_response", lambda message, invalid_argument=True: ("error", message, invalid_argument)
    )
    monkeypatch.setattr(steps.io, "log", logged.append)
    return logged


def test_an_execute_checking_together_answers_as_one_checking_each(spec: Spec, fake_io: list[str]) -> None:
    """steps.execute with check_all (fused) gives every request the response it gets with check alone: 400s
    naming the problem for the bad ones, the good ones run; and where check_all itself fails (a bug), each
    request is checked alone, the failure logged."""
    from grc.serving.triton.models import steps

    parser = RequestParser(spec.model, truncate=True)
    names = [s.name for s in rq.request_inputs(spec.model)]
    requests = [_request(spec, c) for c in ("good", "unknown id", "NaN cross", "good", "wrong dtype", "long history")]

    def run(checked: list[Arrays]) -> list[Arrays]:
        return [{"events": np.array([r[rq.HISTORY_TIME].shape[1]])} for r in checked]

    def broken(raws: list[dict[str, np.ndarray | None]]) -> list[Arrays | RequestError]:
        raise ZeroDivisionError("a bug")

    alone = steps.execute(requests, "m", names, parser, run)
    assert [r[0] for r in alone] == ["ok", "error", "error", "ok", "error", "ok"]
    assert alone[1][1:] == ("m: bad request: candidate_item: unknown id 10000: the item table has ids 0..1999", True)
    for check_all in (parser.check_all, broken):
        together = steps.execute(requests, "m", names, parser, run, check_all=check_all)
        assert [r[:2] for r in together] == [r[:2] for r in alone]
        events = [r[1]["events"].item() for r in together if r[0] == "ok"]
        assert events == [requests[0][rq.HISTORY_TIME].shape[1]] * 2 + [rq.max_history(spec.model)]
    assert len(fake_io) == 1 and "checking the requests together failed" in fake_io[0] and "a bug" in fake_io[0]
