"""How one ranking request travels as a vLLM prompt: a list of int32 token ids (no tokenizer).

vLLM's /pooling endpoint carries nothing per request but the prompt's ids (no side channel reaches the
model's forward), and its ids are int32 (>= 0 here: negative ids are refused by the model). So the request is
laid out field by field, each value as one or two non-negative int32 tokens:

  offset  tokens                     value
  0       MAGIC                      0x67726331 ("grc1"): the format version
  1       h                          history events (>= 1)
  2       c                          candidates (1 .. model.max_candidates)
  3, 4    request_time               int64 seconds as two 31-bit halves (see TIME_BIAS)
  5       profile ids                one per model.profile table (MTGR)
  ...     history ids                h per model.history table, table after table
  ...     history timestamps         h events x 2 tokens (31-bit halves, oldest event first)
  ...     candidate ids              c per model.candidate table, table after table
  ...     cross features             c x F float32 values x 2 tokens (their bit pattern's 16-bit halves)

The scores of candidate j come back at the row of its id in the first candidate table (prompt position
``candidate_start + j``); the pooler returns those c rows, [c, tasks], in request order.

Timestamps: the encoding carries exactly grc.serving.common.validate's range [-2**61, 2**61 - 1] (u = t + 2**61 in
[0, 2**62)): ``encode`` refuses one outside it naming the field, and no prompt decodes to one. Any 31-bit half,
2**31 - 1 included, is a valid token. History: at most ``max_history`` = max_seq_len - P - max_candidates events
(the Triton bundle's rule: the kept history never depends on the candidate count); ``encode`` keeps the newest by
time when truncating, ``decode`` refuses a longer one.

No torch and no vLLM here: the client side (``encode``), the model in the vLLM worker (``decode``), the bundle
stage and the tests share this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from grc.serving.common.validate import TIME_MIN, TIME_RANGE, newest_events

FORMAT = "grc-vllm-tokens/1"
MAGIC = 0x67726331
HEADER = 5
LOW31 = (1 << 31) - 1
TIME_BIAS = -TIME_MIN  # int64 t is sent as u = t + 2**61 in [0, 2**62): two 31-bit halves, hi then lo
INT32_MAX = (1 << 31) - 1

# Error codes of a refused request (the pooler returns [[-code, prompt position]]; scores are never negative).
ERRORS = {
    1: "not a grc request: token 0 is not the format magic 0x67726331, or the prompt is shorter than its header",
    2: "prompt length does not match the header's history and candidate counts",
    3: "history or candidate count out of range (1 <= h <= max_seq_len - profile - max_candidates, "
    "1 <= c <= max_candidates)",
    4: "an id is outside its embedding table",
    5: "a token is negative or not an int32",
    6: "a cross feature is not finite",
    7: "the request's boundaries in vLLM's batch do not match its header (chunked prefill or prefix caching on?)",
}


class RequestError(ValueError):
    """A request that cannot be encoded or decoded; ``code`` indexes ERRORS, ``position`` is the prompt index."""

    def __init__(self, code: int, message: str, position: int = 0):
        super().__init__(message)
        self.code = code
        self.position = position


@dataclass(frozen=True)
class Layout:
    """The part of the model config the encoding depends on."""

    profile: tuple[str, ...]
    history: tuple[str, ...]
    candidate: tuple[str, ...]
    cross_features: int
    vocab: dict[str, int]
    max_candidates: int
    max_seq_len: int

    @staticmethod
    def of(model: Any) -> Layout:
        """From a grc ModelConfig (or its JSON dict)."""
        m = model if isinstance(model, dict) else model.model_dump(mode="json")
        return Layout(
            profile=tuple(m["profile"]),
            history=tuple(m["history"]),
            candidate=tuple(m["candidate"]),
            cross_features=int(m["cross_features"]),
            vocab={name: int(t["vocab_size"]) for name, t in m["tables"].items()},
            max_candidates=int(m["max_candidates"]),
            max_seq_len=int(m["hstu"]["max_seq_len"]),
        )

    def length(self, h: int, c: int) -> int:
        per_candidate = len(self.candidate) + 2 * self.cross_features
        return HEADER + len(self.profile) + h * (len(self.history) + 2) + c * per_candidate

    def candidate_start(self, h: int) -> int:
        """Prompt position of candidate 0's id in the first candidate table (where its scores come back)."""
        return HEADER + len(self.profile) + h * (len(self.history) + 2)

    def max_history(self) -> int:
        """grc.serving.common.request.max_history: room is kept for max_candidates whatever c is."""
        return self.max_seq_len - len(self.profile) - self.max_candidates

    def max_prompt_len(self) -> int:
        """The longest valid prompt: what max_model_len must allow."""
        return self.length(self.max_history(), self.max_candidates)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "magic": MAGIC,
            "header": ["magic", "history_events", "candidates", "request_time_hi31", "request_time_lo31"],
            "fields": [
                *(f"profile_{t}" for t in self.profile),
                *(f"history_{t}[h]" for t in self.history),
                "history_timestamps[h] as (hi31, lo31)",
                *(f"candidate_{t}[c]" for t in self.candidate),
                *(
                    [f"cross_features[c][{self.cross_features}] as float32 bits (hi16, lo16)"]
                    if self.cross_features
                    else []
                ),
            ],
            "time_bias": TIME_BIAS,
            "length": "5 + P + h * (H + 2) + c * (C + 2F)",
            "scores_at": "candidate_start + j, candidate_start = 5 + P + h * (H + 2)",
            "max_prompt_len": self.max_prompt_len(),
            "errors": {str(k): v for k, v in ERRORS.items()},
        }


def _split_time(name: str, t: np.ndarray) -> np.ndarray:
    t = t.astype(np.int64)
    bad = t[(t < TIME_MIN) | (t > -TIME_MIN - 1)]
    if bad.size:
        raise RequestError(5, f"{name}: timestamp {int(bad[0])} is outside the accepted range {TIME_RANGE}")
    u = t + TIME_BIAS
    return np.stack([u >> 31, u & LOW31], -1).reshape(-1)


def _join_time(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return ((hi.astype(np.int64) << 31) | lo.astype(np.int64)) - TIME_BIAS


def encode(layout: Layout, arrays: dict[str, np.ndarray], truncate: bool = True) -> list[int]:
    """One user's request (the Triton bundle's tensor names, batch dimension 1 or none) -> prompt ids.

    A history longer than ``max_history`` keeps its newest events by time when ``truncate`` (in request
    order); ids are checked here too, but the model checks again: a client need not use this function.
    """

    def flat(name: str, dtype: type = np.int64) -> np.ndarray:
        if name not in arrays:
            raise RequestError(2, f"missing input {name}")
        return np.asarray(arrays[name], dtype=dtype).reshape(-1)

    hist = {t: flat(f"history_{t}") for t in layout.history}
    times = flat("history_timestamps")
    cands = {t: flat(f"candidate_{t}") for t in layout.candidate}
    h, c = len(times), len(cands[layout.candidate[0]])
    if any(len(v) != h for v in hist.values()) or any(len(v) != c for v in cands.values()):
        raise RequestError(2, "history inputs (and candidate inputs) must have one length")
    if h < 1 or not 1 <= c <= layout.max_candidates:
        raise RequestError(3, f"need >= 1 history event and 1..{layout.max_candidates} candidates (got {h}, {c})")
    room = layout.max_history()
    if h > room:
        if not truncate:
            raise RequestError(3, f"history too long: {h} events; the model keeps at most {room}")
        keep = newest_events(times[None], room)[0]
        hist = {t: v[keep] for t, v in hist.items()}
        times, h = times[keep], room
    parts = [np.array([MAGIC, h, c], np.int64), _split_time("request_time", flat("request_time")[:1])]
    parts += [flat(f"profile_{t}")[:1] for t in layout.profile]
    parts += [hist[t] for t in layout.history]
    parts.append(_split_time("history_timestamps", times))
    parts += [cands[t] for t in layout.candidate]
    if layout.cross_features:
        cross = flat("cross_features", np.float32)
        if cross.size != c * layout.cross_features:
            raise RequestError(2, f"cross_features: expected {c} x {layout.cross_features} values (got {cross.size})")
        bits = cross.view(np.uint32).astype(np.int64)
        parts.append(np.stack([bits >> 16, bits & 0xFFFF], -1).reshape(-1))
    for t in layout.profile:
        _check_ids(layout, t, flat(f"profile_{t}")[:1])
    for t in layout.history:
        _check_ids(layout, t, hist[t])
    for t in layout.candidate:
        _check_ids(layout, t, cands[t])
    ids = np.concatenate(parts)
    return [int(x) for x in ids]


def _check_ids(layout: Layout, table: str, ids: np.ndarray, base: int = 0) -> None:
    bad = np.nonzero((ids < 0) | (ids >= layout.vocab[table]))[0]
    if bad.size:
        raise RequestError(
            4, f"table {table}: id {int(ids[bad[0]])} is outside [0, {layout.vocab[table]})", base + int(bad[0])
        )


@dataclass
class Decoded:
    """One request's fields (numpy), as ``grc.model.gr.Batch`` wants them for one user."""

    profile: np.ndarray  # [P] int64
    history: dict[str, np.ndarray]  # table -> [h] int64
    history_time: np.ndarray  # [h] int64
    candidates: dict[str, np.ndarray]  # table -> [c] int64
    cross: np.ndarray  # [c, F] float32
    request_time: int
    candidate_start: int  # prompt position of candidate 0's scores


def decode(layout: Layout, ids: np.ndarray) -> Decoded:
    """Prompt ids (any int dtype) -> fields; raises RequestError, never anything else, on a bad prompt."""
    ids = np.asarray(ids).astype(np.int64, copy=False).reshape(-1)
    if ids.size < HEADER or int(ids[0]) != MAGIC:
        raise RequestError(1, ERRORS[1])
    bad = np.nonzero((ids < 0) | (ids > INT32_MAX))[0]
    if bad.size:
        raise RequestError(
            5, f"token {int(ids[bad[0]])} at position {int(bad[0])} is not a non-negative int32", int(bad[0])
        )
    h, c = int(ids[1]), int(ids[2])
    if not 1 <= h <= layout.max_history() or not 1 <= c <= layout.max_candidates:
        raise RequestError(
            3, f"h={h}, c={c}: {ERRORS[3]} (max_candidates {layout.max_candidates}, max_seq_len {layout.max_seq_len})"
        )
    if ids.size != layout.length(h, c):
        raise RequestError(2, f"prompt has {ids.size} tokens; h={h}, c={c} need {layout.length(h, c)}")
    pos = HEADER
    request_time = int(_join_time(ids[3:4], ids[4:5])[0])

    def take(n: int) -> tuple[np.ndarray, int]:
        nonlocal pos
        start, pos = pos, pos + n
        return ids[start:pos], start

    profile = np.zeros(len(layout.profile), np.int64)
    for i, t in enumerate(layout.profile):
        profile[i : i + 1], start = take(1)
        _check_ids(layout, t, profile[i : i + 1], start)
    history = {}
    for t in layout.history:
        history[t], start = take(h)
        _check_ids(layout, t, history[t], start)
    halves, _ = take(2 * h)
    history_time = _join_time(halves[0::2], halves[1::2])
    candidate_start = pos
    candidates = {}
    for t in layout.candidate:
        candidates[t], start = take(c)
        _check_ids(layout, t, candidates[t], start)
    f = layout.cross_features
    cross = np.zeros((c, f), np.float32)
    if f:
        halves, start = take(2 * c * f)
        if (halves > 0xFFFF).any():
            raise RequestError(6, "cross feature halves must be 16-bit", start)
        cross = ((halves[0::2] << 16) | halves[1::2]).astype(np.uint32).view(np.float32).reshape(c, f)
        if not np.isfinite(cross).all():
            raise RequestError(6, ERRORS[6], start)
    return Decoded(profile, history, history_time, candidates, cross, request_time, candidate_start)


def batch_of(requests: list[Decoded]) -> Any:
    """Decoded requests -> one ``grc.model.gr.Batch`` (users in list order): what GRModel takes."""
    import torch

    from grc.model.gr import Batch

    def offsets(sizes: list[int]) -> torch.Tensor:
        out = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        out[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
        return out

    def cat(arrays: list[np.ndarray], dtype: Any = np.int64) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays).astype(dtype, copy=False))

    first = requests[0]
    return Batch(
        profile=torch.from_numpy(np.stack([r.profile for r in requests]).astype(np.int64)),
        history={t: cat([r.history[t] for r in requests]) for t in first.history},
        history_time=cat([r.history_time for r in requests]),
        history_offsets=offsets([len(r.history_time) for r in requests]),
        candidates={t: cat([r.candidates[t] for r in requests]) for t in first.candidates},
        candidate_offsets=offsets([len(r.cross) for r in requests]),
        cross=cat([r.cross for r in requests], np.float32),
        request_time=torch.tensor([r.request_time for r in requests], dtype=torch.int64),
    )


def user_arrays(batch: Any, user: int, layout: Layout) -> dict[str, np.ndarray]:
    """User ``user`` of a ``grc.model.gr.Batch`` as one request's arrays (the Triton bundle's names, no batch dim),
    history events oldest first as the format says (a generated batch's need not be)."""
    ho, co = batch.history_offsets.tolist(), batch.candidate_offsets.tolist()
    hs, cs = slice(ho[user], ho[user + 1]), slice(co[user], co[user + 1])
    times = batch.history_time[hs].numpy()
    oldest_first = np.argsort(times, kind="stable")
    out = {f"profile_{t}": batch.profile[user, i : i + 1].numpy() for i, t in enumerate(layout.profile)}
    out.update({f"history_{t}": batch.history[t][hs].numpy()[oldest_first] for t in layout.history})
    out["history_timestamps"] = times[oldest_first]
    out.update({f"candidate_{t}": batch.candidates[t][cs].numpy() for t in layout.candidate})
    if layout.cross_features:
        out["cross_features"] = batch.cross[cs].numpy().astype(np.float32)
    out["request_time"] = batch.request_time[user : user + 1].numpy()
    return out


def sample_batch(model: Any, users: int, history: int, candidates: int, seed: int) -> Any:
    """A seeded random ``Batch`` (grc.model.sample), counts cut to what the model takes; user 0 has the maxima."""
    import torch

    from grc.model.sample import random_batch

    candidates = min(candidates, model.max_candidates)
    history = max(1, min(history, Layout.of(model).max_history()))
    return random_batch(model, users, history, candidates, torch.Generator().manual_seed(seed))
