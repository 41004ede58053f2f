"""Where every looked-up row goes in the jagged token batch, computed on the host from the checked
requests' shapes (numpy), and packed into ONE int64 array: the batch's only host->device copy.

Per user: its profile tokens (one per profile table, in model.profile order), its history events,
then its candidates (TokenProjector's order); profile and candidate tokens carry the request
time, history tokens their event times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from grc.serving.common import request as rq
from grc.serving.ranker import buckets as bk
from grc.spec.schema import ModelConfig


@dataclass
class Layout:
    """Host-side description of a batch: per request (users, candidates), and the packed arrays."""

    shapes: list[tuple[int, int]]  # per request: (users, candidates)
    users: int
    tokens: int
    packed: np.ndarray  # int64, every field below back to back
    fields: dict[str, tuple[int, int]]  # name -> (start, length) in packed (cross: float32 bits)
    bucket: bk.Bucket | None = None  # the CUDA-graph bucket whose padded inputs lead ``packed`` ("padded")


def build(
    requests: list[dict[str, np.ndarray]],
    cfg: ModelConfig,
    skips: np.ndarray | None = None,
    profiled: np.ndarray | None = None,
    events: np.ndarray | None = None,
    bucket: Callable[[int, int], bk.Bucket | None] | None = None,
) -> Layout:
    """The batch's layout, every per-token array computed for all users at once (numpy over the batch: a request
    costs a few slices, not a dozen small arrays). ``skips``: per user (request after request, user after user)
    the leading history events left out, ``profiled``: per user whether its profile tokens are laid out (the
    history cache's step: a hit's cached events and profile tokens are rows of its entry already); default all.
    ``events`` (with ``skips``): the users' events past the skipped ones, back to back [events, history tables + 1]
    (ids in model.history order, then the timestamp: the history cache's visits hold them so), read as columns
    instead of slicing every history input per user (a slice per user and input, ~20 us an execute of 6 users).
    ``bucket``: (users, tokens) -> the CUDA-graph bucket the batch runs in (Bucketed.choose), or None; with one, the
    dense inputs (offsets, num_candidates, timestamps) come first, already padded to it, as one field "padded"
    (buckets.padded_ints: what the bucket's graph reads, copied in one piece)."""
    n_prof = len(cfg.profile)
    first = rq.candidate_input(cfg.candidate[0])
    shapes = [(r[first].shape[0], r[first].shape[1]) for r in requests]
    per_request = np.array(
        [(b, r[rq.HISTORY_TIME].shape[1], c) for (b, c), r in zip(shapes, requests, strict=True)], np.int64
    )
    per_request = per_request.reshape(-1, 3)
    counts = per_request[:, 0]
    h, c = np.repeat(per_request[:, 1], counts), np.repeat(per_request[:, 2], counts)
    users = int(counts.sum())
    if skips is not None:
        h = h - skips
    p = np.full(users, n_prof, np.int64) if profiled is None else np.where(profiled, n_prof, 0)
    lengths = p + h + c
    offsets = np.zeros(users + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    starts = offsets[:-1]
    hist_idx = _ranges(starts + p, h)
    cand_idx = _ranges(starts + p + h, c)

    def history(name: str) -> np.ndarray:
        """One history input of every user, past the skipped events, back to back."""
        if skips is None:
            return np.concatenate([r[name].reshape(-1) for r in requests])
        return np.concatenate([r[name][u, s:] for (r, u), s in zip(cuts, skips.tolist(), strict=True)])

    if skips is not None and events is None:  # per user its events past the skipped ones
        cuts = [(r, u) for r, (b, _) in zip(requests, shapes, strict=True) for u in range(b)]
    now = np.concatenate([r[rq.REQUEST_TIME].reshape(-1) for r in requests])
    stamps = np.repeat(now, lengths)  # request time everywhere, then the history's own times
    stamps[hist_idx] = history(rq.HISTORY_TIME) if events is None else events[:, -1]
    profile_starts = starts if profiled is None else starts[profiled]
    chosen = bucket(users, total) if bucket is not None else None
    dense: dict[str, np.ndarray] = {"offsets": offsets, "num_candidates": c, "timestamps": stamps}
    if chosen is not None:
        dense = {"padded": bk.padded_ints(chosen, cfg.hstu.max_seq_len, offsets, c, stamps)}
    fields: dict[str, np.ndarray] = {
        **dense,
        # where each projected row goes, in the order Ranker._tokens projects them (each profile table's, the
        # history's, the candidates'): ONE index_copy_ puts them in place (one per kind was a launch each)
        "embed_dst": np.concatenate([*(profile_starts + i for i in range(n_prof)), hist_idx, cand_idx]),
        "candidate_dst": cand_idx,  # where the scores are picked (the whole path)
    }
    for t in cfg.profile:
        ids = np.concatenate([r[rq.profile_input(t)][:, 0] for r in requests])
        fields[f"profile:{t}"] = ids if profiled is None else ids[profiled]
    for j, t in enumerate(cfg.history):
        fields[f"history:{t}"] = history(rq.history_input(t)) if events is None else events[:, j]
    for t in cfg.candidate:
        fields[f"candidate:{t}"] = np.concatenate([r[rq.candidate_input(t)].reshape(-1) for r in requests])
    if cfg.cross_features:
        cross = np.concatenate([r[rq.CROSS].reshape(-1, cfg.cross_features) for r in requests]).astype(np.float32)
        bits = cross.reshape(-1).view(np.int32)
        fields["cross"] = np.concatenate([bits, np.zeros(bits.size % 2, np.int32)]).view(np.int64)
    spans, start = {}, 0
    for name, a in fields.items():
        spans[name] = (start, a.size)
        start += a.size
    packed = np.concatenate([a.astype(np.int64, copy=False) for a in fields.values()])
    return Layout(shapes, users, total, packed, spans, chosen)


def _ranges(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """arange(f, f + n) for every (f, n) of ``firsts`` and ``counts``, back to back."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64) + np.repeat(firsts - ends + counts, counts)


def on_device(layout: Layout, device: torch.device, cross_features: int) -> dict[str, torch.Tensor]:
    """The packed arrays copied to ``device`` in one transfer, split back into named views."""
    flat = torch.from_numpy(layout.packed)
    if device.type == "cuda":  # staged in pinned memory: the copy is queued, the host goes on to queue the lookups
        flat = flat.pin_memory().to(device, non_blocking=True)
    # the fields lie back to back: one split makes every view (a slice each was a torch op each)
    out = dict(zip(layout.fields, flat.split_with_sizes([n for _, n in layout.fields.values()]), strict=True))
    if "cross" in out:
        bits = out["cross"].view(torch.float32)  # the float32 features' bits, padded to whole int64s
        out["cross"] = bits[: out["candidate_dst"].numel() * cross_features].view(-1, cross_features)
    return out
