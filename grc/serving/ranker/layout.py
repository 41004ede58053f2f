"""Where every looked-up row goes in the jagged token batch, computed on the host from the checked
requests' shapes (numpy), and packed into ONE int64 array: the batch's only host->device copy.

Per user: its profile tokens (one per profile table, in model.profile order), its history events,
then its candidates (TokenProjector's order); profile and candidate tokens carry the request
time, history tokens their event times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grc.serving.common import request as rq
from grc.spec.schema import ModelConfig


@dataclass
class Layout:
    """Host-side description of a batch: per request (users, candidates), and the packed arrays."""

    shapes: list[tuple[int, int]]  # per request: (users, candidates)
    users: int
    tokens: int
    packed: np.ndarray  # int64, every field below back to back
    fields: dict[str, tuple[int, int]]  # name -> (start, length) in packed (cross: float32 bits)


def build(requests: list[dict[str, np.ndarray]], cfg: ModelConfig) -> Layout:
    n_prof = len(cfg.profile)
    per_user_len: list[int] = []
    hist_t: list[tuple[int, int, int]] = []
    shapes: list[tuple[int, int]] = []
    for r in requests:
        b, h = r[rq.HISTORY_TIME].shape
        c = r[rq.candidate_input(cfg.candidate[0])].shape[1]
        shapes.append((b, c))
        per_user_len += [n_prof + h + c] * b
        hist_t.append((b, h, c))
    users = len(per_user_len)
    offsets = np.zeros(users + 1, np.int64)
    offsets[1:] = np.cumsum(per_user_len)
    total = int(offsets[-1])
    starts = offsets[:-1]
    hist_dst, cand_dst, cand_count = [], [], []
    u = 0
    for b, h, c in hist_t:
        s = starts[u : u + b, None]
        hist_dst.append((s + n_prof + np.arange(h)[None]).reshape(-1))
        cand_dst.append((s + n_prof + h + np.arange(c)[None]).reshape(-1))
        cand_count += [c] * b
        u += b
    hist_idx, cand_idx = np.concatenate(hist_dst), np.concatenate(cand_dst)
    now = np.concatenate([r[rq.REQUEST_TIME].reshape(-1) for r in requests])
    stamps = np.repeat(now, per_user_len)  # request time everywhere, then the history's own times
    stamps[hist_idx] = np.concatenate([r[rq.HISTORY_TIME].reshape(-1) for r in requests])
    fields: dict[str, np.ndarray] = {
        "offsets": offsets,
        "num_candidates": np.asarray(cand_count, np.int64),
        "timestamps": stamps,
        "history_dst": hist_idx,
        "candidate_dst": cand_idx,
    }
    for i, t in enumerate(cfg.profile):
        fields[f"profile:{t}"] = np.concatenate([r[rq.profile_input(t)][:, 0] for r in requests])
        fields[f"profile_dst:{t}"] = starts + i
    for t in cfg.history:
        fields[f"history:{t}"] = np.concatenate([r[rq.history_input(t)].reshape(-1) for r in requests])
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
    return Layout(shapes, users, total, packed, spans)


def on_device(layout: Layout, device: torch.device, cross_features: int) -> dict[str, torch.Tensor]:
    """The packed arrays copied to ``device`` in one transfer, split back into named views."""
    flat = torch.from_numpy(layout.packed)
    if device.type == "cuda":  # staged in pinned memory: the copy is queued, the host goes on to queue the lookups
        flat = flat.pin_memory().to(device, non_blocking=True)
    out = {name: flat[start : start + n] for name, (start, n) in layout.fields.items()}
    if "cross" in out:
        bits = out["cross"].view(torch.float32)  # the float32 features' bits, padded to whole int64s
        out["cross"] = bits[: out["candidate_dst"].numel() * cross_features].view(-1, cross_features)
    return out
