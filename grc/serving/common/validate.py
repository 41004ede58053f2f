"""Every check a served request goes through, in one place: Triton's python steps and vLLM's prompt decoder
call these, so both servers refuse the same requests with the same words.

Rules (the README's serving sections state them; bundle.json carries the numbers):
- timestamps (``history_timestamps`` and ``request_time``) lie in [TIME_MIN, TIME_MAX] = [-2**61, 2**61 - 1]
  seconds: any difference of two then fits int64 (no time gap can wrap), and vLLM's prompt encoding carries
  exactly this range;
- the history kept is independent of the candidate count: at most ``max_history = max_seq_len - profile tokens
  - max_candidates`` events (request.max_history); a longer history keeps its ``max_history`` newest events by
  timestamp (ties: the later position), in request order, or is refused when truncation is off;
- the internal steps of the Triton ensemble (dense_*, postprocess) check their inputs as strictly as
  preprocess does: a client can call them directly, and one bad request must fail alone.

numpy only (no torch, no vLLM): the client encoder, the vLLM worker and Triton's stubs all import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from grc.serving.common import request as rq
from grc.spec.schema import ModelConfig

TIME_MIN = -(1 << 61)
TIME_MAX = (1 << 61) - 1
TIME_RANGE = "[-2**61, 2**61 - 1] seconds"


class RequestError(ValueError):
    """A request the model cannot take; the message goes back to the client (HTTP 400)."""


# --------------------------------------------------------------------------- rules shared by every path


def check_times(name: str, values: np.ndarray) -> None:
    # two reductions, no mask: the common case (every stamp in range) allocates nothing
    if values.size and (values.min() < TIME_MIN or values.max() > TIME_MAX):
        bad = values[(values < TIME_MIN) | (values > TIME_MAX)]
        raise RequestError(f"{name}: timestamp {int(bad.flat[0])} is outside the accepted range {TIME_RANGE}")


def newest_events(times: np.ndarray, keep: int) -> np.ndarray:
    """Indices [users, keep] of each user's ``keep`` newest events by time (ties: the later position),
    in request order. ``times`` is [users, events]."""
    order = np.argsort(times, axis=1, kind="stable")[:, times.shape[1] - keep :]
    return np.sort(order, axis=1)


# --------------------------------------------------------------------------- the client's request


def parse(arrays: dict[str, np.ndarray | None], cfg: ModelConfig, truncate: bool) -> dict[str, np.ndarray]:
    """Check one request (batch first, see grc/serving/common/request.py); return its arrays, the history cut to
    ``max_history`` newest events when ``truncate``. A served model keeps one ``RequestParser`` instead."""
    return RequestParser(cfg, truncate)(arrays)


class RequestParser:
    """``parse`` for one model, with what depends on the model alone worked out once (input specs and dtypes,
    the history and candidate groups, each id input's vocabulary): the served steps check every request
    with one. On the H200 host the check was 0.10-0.25 ms per request (serve-h200-*.json), a tenth of it
    rebuilding the input specs."""

    def __init__(self, cfg: ModelConfig, truncate: bool):
        self.cfg, self.truncate = cfg, truncate
        # per input: its spec, dtype, ndim and the (axis, size) of its fixed dimensions (a request's shapes are
        # checked with these alone, the check's per-input cost)
        self.specs = [
            (
                s,
                np.dtype(rq.NP_TYPES[s.datatype]),
                1 + len(s.dims),
                [(a, n) for a, n in enumerate(s.dims, 1) if n != -1],
            )
            for s in rq.request_inputs(cfg)
        ]
        self.history = [rq.history_input(t) for t in cfg.history] + [rq.HISTORY_TIME]
        self.candidates = [rq.candidate_input(t) for t in cfg.candidate] + ([rq.CROSS] if cfg.cross_features else [])
        self.ids = [
            (f"{kind}_{t}", t, cfg.tables[t].vocab_size)
            for kind, tables in (("profile", cfg.profile), ("history", cfg.history), ("candidate", cfg.candidate))
            for t in tables
        ]
        self.room = rq.max_history(cfg)
        # the inputs whose values are checked (_values), the rest being shapes alone
        self.valued = [name for name, _, _ in self.ids] + [rq.CROSS] * bool(cfg.cross_features)
        self.valued += [rq.HISTORY_TIME, rq.REQUEST_TIME]

    def __call__(self, arrays: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        out, h = self._shaped(arrays)
        self._values(out)
        return self._fit(out, h)

    def check_all(
        self, requests: Sequence[Mapping[str, np.ndarray | None]]
    ) -> list[dict[str, np.ndarray] | RequestError]:
        """``__call__`` for every request of an execute: per request its arrays, or the RequestError ``__call__``
        raises for it (the same words; one bad request fails alone). The shapes are checked per request, the
        values (ids, times, cross features) once over all the requests' arrays joined: each check is a few numpy
        calls whatever the size, so per request they cost more than the work (ids, times and cross were ~15 us
        of a request's ~30 us on this CPU). Only when the joined check fails are the requests checked one by one,
        to find which."""
        results: dict[int, dict[str, np.ndarray] | RequestError] = {}
        shaped: dict[int, tuple[dict[str, np.ndarray], int]] = {}  # the requests whose shapes are good
        for i, arrays in enumerate(requests):
            try:
                shaped[i] = self._shaped(arrays)
            except RequestError as exc:
                results[i] = exc
        if shaped and not self._all_valued([out for out, _ in shaped.values()]):
            for i, (out, _) in list(shaped.items()):  # which requests: each alone, as __call__ checks it
                try:
                    self._values(out)
                except RequestError as exc:
                    results[i] = exc
                    del shaped[i]
        for i, (out, h) in shaped.items():
            try:
                results[i] = self._fit(out, h)
            except RequestError as exc:
                results[i] = exc
        return [results[i] for i in range(len(requests))]

    def _all_valued(self, outs: list[dict[str, np.ndarray]]) -> bool:
        """Whether every request's values pass ``_values``, checked once over the requests' arrays joined."""
        # flattened by ravel (views) and joined: a third cheaper than concatenate(axis=None) for 6 requests
        joined = outs[0] if len(outs) == 1 else {n: np.concatenate([o[n].ravel() for o in outs]) for n in self.valued}
        try:
            self._values(joined)
        except RequestError:
            return False
        return True

    def _shaped(self, arrays: Mapping[str, np.ndarray | None]) -> tuple[dict[str, np.ndarray], int]:
        """The request's inputs with their dtypes, shapes and counts checked; and its history length."""
        cfg = self.cfg
        out: dict[str, np.ndarray] = {}
        users = None
        try:
            for spec, want, ndim, fixed in self.specs:
                a = arrays.get(spec.name)
                if a is None:
                    raise RequestError  # named below
                if a.dtype != want:
                    raise RequestError(f"{spec.name}: expected {spec.datatype} (got {a.dtype})")
                shape = a.shape
                if len(shape) != ndim:
                    raise RequestError(f"{spec.name}: {_expected_shape(spec.dims, a)}")
                if users is None:
                    users = shape[0]
                elif shape[0] != users:
                    raise RequestError(f"{spec.name}: batch {shape[0]} differs from the other inputs' {users}")
                for axis, size in fixed:
                    if shape[axis] != size:
                        raise RequestError(f"{spec.name}: {_expected_shape(spec.dims, a)}")
                out[spec.name] = a
        except RequestError:
            # missing inputs are named before any other problem; looked for only here (1.5 us a request)
            missing = [s.name for s, *_ in self.specs if arrays.get(s.name) is None]
            if missing:
                raise RequestError(f"missing input(s): {', '.join(missing)}") from None
            raise
        if not users:
            raise RequestError("empty request: batch dimension 0")
        h = _same_length(out, self.history, "history event")
        c = _same_length(out, self.candidates, "candidate")
        if h == 0:
            raise RequestError(f"empty history: {self.history[0]} has no events; a request needs at least one")
        if c == 0:
            raise RequestError(f"no candidates: {self.candidates[0]} is empty; a request needs at least one")
        if c > cfg.max_candidates:
            raise RequestError(f"too many candidates: {c} (model.max_candidates is {cfg.max_candidates})")
        return out, h

    def _values(self, arrays: dict[str, np.ndarray]) -> None:
        """The values of ``self.valued``: any shape will do (check_all passes them flattened and joined)."""
        for name, table, vocab in self.ids:
            _check_ids(arrays[name], name, table, vocab)
        if self.cfg.cross_features and not np.isfinite(arrays[rq.CROSS]).all():
            raise RequestError(f"{rq.CROSS}: values must be finite")
        check_times(rq.HISTORY_TIME, arrays[rq.HISTORY_TIME])
        check_times(rq.REQUEST_TIME, arrays[rq.REQUEST_TIME])

    def _fit(self, out: dict[str, np.ndarray], h: int) -> dict[str, np.ndarray]:
        """The history cut to its ``room`` newest events (or refused when truncation is off)."""
        cfg = self.cfg
        if h > self.room:
            if not self.truncate:
                raise RequestError(
                    f"history too long: {h} events; the model keeps at most {self.room} (max_seq_len "
                    f"{cfg.hstu.max_seq_len} - {len(cfg.profile)} profile tokens - max_candidates "
                    f"{cfg.max_candidates})"
                )
            keep = newest_events(out[rq.HISTORY_TIME], self.room)
            for name in self.history:
                out[name] = np.take_along_axis(out[name], keep, axis=1)
        return out


def _expected_shape(dims: tuple[int, ...], a: np.ndarray) -> str:
    return f"expected shape [batch, {', '.join(map(str, dims))}] (got {list(a.shape)})"


def _same_length(arrays: dict[str, np.ndarray], names: list[str], what: str) -> int:
    counts = [arrays[name].shape[1] for name in names]
    if counts.count(counts[0]) != len(counts):
        listed = ", ".join(f"{n} {k}" for n, k in zip(names, counts, strict=True))
        raise RequestError(f"every {what} tensor needs one value per {what}, got different lengths: {listed}")
    return counts[0]


def _check_ids(ids: np.ndarray, name: str, table: str, vocab: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):  # the mask only to name the first bad id
        bad = ids[(ids < 0) | (ids >= vocab)]
        raise RequestError(f"{name}: unknown id {int(bad[0])}: the {table} table has ids 0..{vocab - 1}")


# --------------------------------------------------------------------------- the ensemble's internal steps


def _typed(r: dict[str, np.ndarray | None], types: dict[str, type]) -> dict[str, np.ndarray]:
    missing = [n for n in types if r.get(n) is None]
    if missing:
        raise RequestError(f"missing input(s): {', '.join(missing)}")
    for name, dtype in types.items():
        if r[name].dtype != np.dtype(dtype):  # type: ignore[union-attr]
            raise RequestError(f"{name}: expected {np.dtype(dtype)} (got {r[name].dtype})")  # type: ignore[union-attr]
    return r  # type: ignore[return-value]


def _counts(
    r: dict[str, np.ndarray], users: int, tokens: int, max_seq_len: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """lengths and num_candidates, one per user: 1 <= num_candidates < lengths <= the tokens sent (and
    max_seq_len): every user has at least one history event before its candidates."""
    for name in ("lengths", "num_candidates"):
        if r[name].shape != (users, 1):
            raise RequestError(f"{name}: expected shape {[users, 1]} (got {list(r[name].shape)})")
    lengths, cands = r["lengths"].reshape(-1), r["num_candidates"].reshape(-1)
    limit = tokens if max_seq_len is None else min(tokens, max_seq_len)
    bad = (lengths > limit) | (cands < 1) | (cands >= lengths)
    if bad.any():
        u = int(np.nonzero(bad)[0][0])
        why = "" if max_seq_len is None else f" ({tokens} tokens sent, max_seq_len {max_seq_len})"
        raise RequestError(
            f"user {u}: lengths {int(lengths[u])} and num_candidates {int(cands[u])} must satisfy "
            f"1 <= num_candidates < lengths <= {limit}{why}"
        )
    return lengths, cands


def check_dense(r: dict[str, np.ndarray | None], width: int, max_seq_len: int) -> dict[str, np.ndarray]:
    """The dense step's request: tokens FP32 [b, L, width] (finite), timestamps INT64 [b, L] (in range),
    lengths and num_candidates INT64 [b, 1] that fit L."""
    a = _typed(r, {"tokens": np.float32, "timestamps": np.int64, "lengths": np.int64, "num_candidates": np.int64})
    tokens, stamps = a["tokens"], a["timestamps"]
    if tokens.ndim != 3 or tokens.shape[2] != width or 0 in tokens.shape:
        raise RequestError(f"tokens: expected shape [batch, tokens, {width}] (got {list(tokens.shape)})")
    b, n = tokens.shape[:2]
    if stamps.shape != (b, n):
        raise RequestError(f"timestamps: expected shape {[b, n]} (got {list(stamps.shape)})")
    _counts(a, b, n, max_seq_len)
    if not np.isfinite(tokens).all():
        raise RequestError("tokens: values must be finite (got NaN or inf)")
    check_times("timestamps", stamps)
    return a


def check_postprocess(r: dict[str, np.ndarray | None], tasks: int) -> dict[str, np.ndarray]:
    """postprocess's request: scores FP32 [b, L, tasks] (finite), lengths and num_candidates INT64 [b, 1],
    candidate_ids INT64 [b, c] with every num_candidates == c <= lengths - 1 and lengths <= L."""
    a = _typed(r, {"scores": np.float32, "lengths": np.int64, "num_candidates": np.int64,
                   "candidate_ids": np.int64})  # fmt: skip
    scores, ids = a["scores"], a["candidate_ids"]
    if scores.ndim != 3 or scores.shape[2] != tasks or 0 in scores.shape:
        raise RequestError(f"scores: expected shape [batch, tokens, {tasks}] (got {list(scores.shape)})")
    b, n = scores.shape[:2]
    if ids.ndim != 2 or ids.shape[0] != b:
        raise RequestError(f"candidate_ids: expected shape [{b}, candidates] (got {list(ids.shape)})")
    _, cands = _counts(a, b, n, None)
    if (cands != ids.shape[1]).any():
        raise RequestError(f"num_candidates {cands.tolist()} differ from the {ids.shape[1]} candidate_ids sent")
    if not np.isfinite(scores).all():
        raise RequestError("scores: values must be finite (got NaN or inf)")
    return a
