"""HSTU / MTGR: feature tokens -> HSTU stack -> multi-task heads on the candidate tokens.

The model splits where production GR serving splits it:
- ``TokenProjector`` (dense, small): per-kind projections of looked-up embeddings into d_model.
- ``GRDense``: the HSTU stack, group norms and task heads. This is what ONNX export, surgery and
  engines compile; its inputs are tokens [.., D], per-user lengths, candidate counts, timestamps.
- The embedding tables (``tables.py``, nearly all parameters) stay in sharded safetensors and are
  looked up where the request is parsed (Triton preprocess, vLLM model), as TorchRec-style
  deployments do. A candidate's score depends only on its user's history, profile and itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grc.model.hstu import GroupLayerNorm, HSTULayer
from grc.model.jagged import lengths_of, local_index
from grc.model.kernel_ops import candidate_heads
from grc.model.kv_cache import HistoryCacheUnsupported, ScorePlan, UserKV, grown, to_device_once
from grc.model.tables import Tables
from grc.spec.schema import ModelConfig

T = TypeVar("T", torch.Tensor, np.ndarray)


class TaskHeads(nn.Module):
    """One two-layer MLP per task, stacked so every task runs in one batched matmul."""

    def __init__(self, d_model: int, hidden: int, tasks: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(tasks, d_model, hidden))
        self.b1 = nn.Parameter(torch.zeros(tasks, hidden))
        self.w2 = nn.Parameter(torch.zeros(tasks, hidden))
        self.b2 = nn.Parameter(torch.zeros(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(torch.einsum("...d,tdh->...th", x, self.w1) + self.b1)
        return torch.sigmoid((hidden * self.w2).sum(-1) + self.b2)


def token_groups(cfg: ModelConfig, idx: T, n_ctx: T) -> T:
    """Group id per token: 0 profile, 1 history, 2 candidate (MTGR); 0 for every token (HSTU). Torch tensors
    (the model, traced and exported) or numpy arrays (host-side layouts: grc/serving/common/score_graphs.py)."""
    if isinstance(idx, np.ndarray):
        if cfg.kind == "hstu":
            return np.zeros_like(idx)
        return (idx >= len(cfg.profile)).astype(np.int64) + (idx >= n_ctx)
    if cfg.kind == "hstu":
        return torch.zeros_like(idx)
    return (idx >= len(cfg.profile)).long() + (idx >= n_ctx).long()


class GRDense(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        groups = len(cfg.token_groups)
        self.layers = nn.ModuleList(HSTULayer(cfg.d_model, cfg.hstu, groups) for _ in range(cfg.hstu.num_layers))
        self.final_norm: GroupLayerNorm = GroupLayerNorm(cfg.d_model, groups, cfg.hstu.eps)
        self.heads: TaskHeads = TaskHeads(cfg.d_model, cfg.head_hidden, len(cfg.tasks))

    @property
    def hstu_layers(self) -> Iterable[HSTULayer]:
        """The layers, typed (an nn.ModuleList yields plain Modules to a type checker)."""
        return cast("Iterable[HSTULayer]", self.layers)

    def forward_padded(
        self, tokens: torch.Tensor, lengths: torch.Tensor, num_candidates: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        """tokens [B, N, D] -> scores [B, N, tasks]; zero except at each user's candidate tokens."""
        idx = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1)
        n_ctx = (lengths - num_candidates).view(-1, 1)
        group = token_groups(self.cfg, idx, n_ctx)
        x = tokens
        for layer in self.hstu_layers:
            x = layer.forward_padded(x, group, lengths, num_candidates, timestamps)
        # every row: the exported ONNX stays static-shaped for TensorRT (a gather of the candidate
        # rows would add NonZero and data-dependent shapes); forward_jagged scores candidates only
        scores = self.heads(self.final_norm(x, group))
        is_candidate = (idx >= n_ctx) & (idx < lengths.view(-1, 1))
        return scores * is_candidate.unsqueeze(-1).to(scores.dtype)

    def forward_jagged(
        self,
        tokens: torch.Tensor,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        impl: str = "pytorch",
        fuse: bool = False,
    ) -> torch.Tensor:
        """tokens [T, D] -> scores [T, tasks]; zero except at candidate tokens. fuse (impl="triton"
        only): the fused Triton GEMMs and heads of kernels/fused_*.py, the GPU compile path."""
        lengths = lengths_of(offsets)
        idx = local_index(offsets)
        n_ctx = torch.repeat_interleave(lengths - num_candidates, lengths)
        group = token_groups(self.cfg, idx, n_ctx)
        x = tokens
        for layer in self.hstu_layers:
            x = layer.forward_jagged(x, group, offsets, num_candidates, timestamps, impl=impl, fuse=fuse)
        return self.candidate_scores(x, group, idx >= n_ctx, fuse)

    def candidate_scores(
        self, x: torch.Tensor, group: torch.Tensor, is_candidate: torch.Tensor, fuse: bool = False
    ) -> torch.Tensor:
        """[T, tasks]: the final norm and the heads on the candidate rows only, zeros elsewhere.
        fuse: one Triton kernel that skips candidate-free row blocks (static shapes: what compiled
        graphs and CUDA graphs run); else the candidate rows gathered and their scores scattered
        back (a row count that depends on the data: eager only)."""
        if fuse:
            n, h = self.final_norm, self.heads
            return candidate_heads(x, group, is_candidate, n.weight, n.bias, h.w1, h.b1, h.w2, h.b2, n.eps)
        rows = is_candidate.nonzero().squeeze(1)
        scores = self.heads(self.final_norm(x[rows], group[rows]))
        return scores.new_zeros(x.shape[0], scores.shape[-1]).index_copy(0, rows, scores)

    # ------------------------------------------------------------------ the history cache
    # prefill + score give exactly the rows forward_jagged gives for the same sequence (see
    # grc/model/kv_cache.py for why, and the README's history-cache section for the contract).

    def prefill(
        self, tokens: torch.Tensor, timestamps: torch.Tensor, profile: int, now: int, impl: str = "pytorch"
    ) -> UserKV:
        """One user's cached tokens (``profile`` profile tokens, then history events) [n, D] ->
        every layer's K/V of them, to be reused by ``score``. ``now``: the request time."""
        empty = self.empty_cache(profile, tokens)
        offsets = torch.tensor([0, tokens.shape[0]], device=tokens.device)
        no_candidates = torch.zeros(1, dtype=torch.int64, device=tokens.device)
        _, (cache,) = self._extend([empty], tokens, offsets, no_candidates, timestamps, [now], impl)
        return cache

    def score(
        self,
        caches: list[UserKV],
        tokens: torch.Tensor,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        now: list[int],
        impl: str = "pytorch",
        *,
        reuse_checked: bool = False,
    ) -> tuple[torch.Tensor, list[UserKV]]:
        """B users' new tokens [Tq, D] (``offsets``: per user its new history events, then its
        ``num_candidates`` candidates) against their caches, at request times ``now``.
        Returns the candidates' scores [sum(num_candidates), tasks] and each user's cache
        extended by its new history events. ``reuse_checked``: the caller has checked on the host that
        every cache is reusable at ``now`` (plan_score's own check reads the device)."""
        if num_candidates.numel() != len(caches) or bool((num_candidates < 1).any()):
            raise ValueError(
                f"score: every user needs at least one candidate (num_candidates "
                f"{num_candidates.tolist()} for {len(caches)} cached users)"
            )
        return self._extend(caches, tokens, offsets, num_candidates, timestamps, now, impl, reuse_checked)

    def empty_cache(self, profile: int, like: torch.Tensor) -> UserKV:
        h = self.cfg.hstu
        return UserKV.empty(h.num_layers, h.num_heads, h.head_qk, h.head_v, profile, like)

    def plan_score(
        self,
        caches: list[UserKV],
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        now: list[int],
        reuse_checked: bool = False,
    ) -> ScorePlan:
        """Everything a score step needs besides the tokens and the K/V, built from host integers
        (one read of ``offsets`` and ``num_candidates``; host tensors: no device sync) and copied to the
        device in one non-blocking transfer: ``run_plan`` then launches device work only, without a host
        sync, so it can be captured in a CUDA graph. Each cache is checked reusable at its ``now``
        (``UserKV.reusable_at``, which reads its timestamps: one device sync per user on a GPU) unless
        ``reuse_checked`` says the caller did that on the host (UserCaches.visit)."""
        h = self.cfg.hstu
        if h.history_mask != "causal":
            raise HistoryCacheUnsupported(
                f"hstu.history_mask {h.history_mask}: every history row attends to later events, so a new "
                "event changes the cached rows; the history cache needs history_mask causal"
            )
        for b, cache in enumerate(caches):
            if not reuse_checked and not cache.reusable_at(now[b], h.time_buckets):
                raise ValueError(
                    f"user {b}: the cache was computed at another request time whose time buckets "
                    f"differ (check UserKV.reusable_at before scoring)"
                )
        bounds = [int(o) for o in offsets.tolist()]
        candidates = [int(c) for c in num_candidates.tolist()]
        past = [c.length for c in caches]
        new = [bounds[b + 1] - bounds[b] for b in range(len(caches))]
        total = [p + n for p, n in zip(past, new, strict=True)]
        if any(t > h.max_seq_len for t in total):
            raise ValueError(f"cached + new tokens {total} exceed max_seq_len {h.max_seq_len}")
        idx = torch.cat([torch.arange(p, t) for p, t in zip(past, total, strict=True)])  # absolute positions
        n_ctx = torch.repeat_interleave(torch.tensor(total) - torch.tensor(candidates), torch.tensor(new))
        device = timestamps.device
        kv_starts = [0, *itertools.accumulate(total)]
        # the key rows' stamps: the cached ones from the host (UserKV keeps them there), the new ones where they are
        cached_at = torch.cat([torch.arange(a, a + p) for a, p in zip(kv_starts, past, strict=False)])
        new_at = torch.cat([torch.arange(a + p, a + t) for a, p, t in zip(kv_starts, past, total, strict=False)])
        layout = to_device_once(
            {
                "q_offsets": torch.tensor(bounds),
                "kv_offsets": torch.tensor(kv_starts),
                "num_candidates": torch.tensor(candidates),
                "group": token_groups(self.cfg, idx, n_ctx),
                "candidate_rows": torch.nonzero(idx >= n_ctx).view(-1),
                "cached_stamps": torch.cat([c.timestamps_at(now[b]) for b, c in enumerate(caches)]),
                "cached_at": cached_at,
                "new_at": new_at,
            },
            device,
        )
        stamps = torch.empty(kv_starts[-1], dtype=torch.int64, device=device)
        stamps.index_copy_(0, layout.pop("cached_at"), layout.pop("cached_stamps"))
        stamps.index_copy_(0, layout.pop("new_at"), timestamps)
        return ScorePlan(bounds=bounds, candidates=candidates, kv_timestamps=stamps, **layout)

    def run_plan(
        self, plan: ScorePlan, caches: list[UserKV], tokens: torch.Tensor, impl: str = "pytorch"
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The new tokens [Tq, D] through every layer against the caches: the candidates' scores
        [sum(num_candidates), tasks] and every layer's K, V of the new tokens."""
        x = tokens
        new_k, new_v = [], []
        for layer_index, layer in enumerate(self.hstu_layers):
            past_kv = [(c.keys[layer_index], c.values[layer_index]) for c in caches]
            x, k, v = layer.forward_cached(
                x,
                plan.group,
                past_kv,
                plan.q_offsets,
                plan.kv_offsets,
                plan.kv_timestamps,
                plan.num_candidates,
                impl,
                bounds=plan.bounds,
            )
            new_k.append(k)
            new_v.append(v)
        rows = plan.candidate_rows
        return self.heads(self.final_norm(x[rows], plan.group[rows])), new_k, new_v

    def run_scattered(
        self,
        tokens: torch.Tensor,
        group: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        slots: torch.Tensor,
        q_offsets: torch.Tensor,
        kv_offsets: torch.Tensor,
        kv_timestamps: torch.Tensor,
        num_candidates: torch.Tensor,
        is_candidate: torch.Tensor,
        impl: str = "pytorch",
        fuse: bool = False,
        max_user_keys: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``run_plan`` on sequences already laid out (``HSTULayer.forward_scattered``, which fills the new rows
        of ``past_keys`` / ``past_values`` [Tkv, H, D] in place): scores [Tq, tasks] of the new rows, zero except
        where ``is_candidate`` [Tq] (the caller keeps those rows), and every layer's K, V of the new rows. No host
        read, no data-dependent shape: CUDA-graph capturable. fuse: the fused GEMMs and heads kernel.
        ``kv_offsets`` as [users, 2] (start, end) ranges with ``max_user_keys`` (a bound on one user's keys):
        the buffers are an arena whose rows between users' ranges are never read (the device arena,
        grc/serving/common/row_arena.py)."""
        x = tokens
        new_k, new_v = [], []
        for layer, past_k, past_v in zip(self.hstu_layers, past_keys, past_values, strict=True):
            x, k, v = layer.forward_scattered(
                x, group, past_k, past_v, slots, q_offsets, kv_offsets, kv_timestamps, num_candidates, impl, fuse,
                max_user_keys,
            )  # fmt: skip
            new_k.append(k)
            new_v.append(v)
        if fuse:
            return self.candidate_scores(x, group, is_candidate, fuse=True), new_k, new_v
        return self.heads(self.final_norm(x, group)), new_k, new_v  # every row: no data-dependent gather

    def _extend(
        self,
        caches: list[UserKV],
        tokens: torch.Tensor,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        now: list[int],
        impl: str,
        reuse_checked: bool = False,
    ) -> tuple[torch.Tensor, list[UserKV]]:
        plan = self.plan_score(caches, offsets, num_candidates, timestamps, now, reuse_checked)
        scores, new_k, new_v = self.run_plan(plan, caches, tokens, impl)
        return scores, grown(caches, plan.bounds, plan.candidates, new_k, new_v, timestamps, now)


@dataclass
class Batch:
    """Raw requests of B users: ids are embedding rows, ``*_offsets`` are [B+1] jagged offsets."""

    profile: torch.Tensor  # [B, n_profile] int64, one id per profile table
    history: dict[str, torch.Tensor]  # table -> [Th] int64
    history_time: torch.Tensor  # [Th] int64 seconds
    history_offsets: torch.Tensor  # [B+1]
    candidates: dict[str, torch.Tensor]  # table -> [Tc] int64
    candidate_offsets: torch.Tensor  # [B+1]
    cross: torch.Tensor  # [Tc, cross_features] float
    request_time: torch.Tensor  # [B] int64

    @property
    def users(self) -> int:
        return int(self.request_time.numel())


@dataclass
class Tokens:
    """A jagged token batch: the dense model's input."""

    tokens: torch.Tensor  # [T, D]
    offsets: torch.Tensor  # [B+1]
    num_candidates: torch.Tensor  # [B]
    timestamps: torch.Tensor  # [T]


class TokenProjector(nn.Module):
    """Looked-up embeddings -> d_model tokens, one projection per token kind."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.profile = nn.ModuleDict({name: nn.Linear(cfg.table_dim(name), cfg.d_model) for name in cfg.profile})
        self.history = nn.Linear(sum(cfg.table_dim(n) for n in cfg.history), cfg.d_model)
        self.candidate = nn.Linear(sum(cfg.table_dim(n) for n in cfg.candidate) + cfg.cross_features, cfg.d_model)

    def forward(self, batch: Batch, tables: Tables) -> Tokens:
        cfg = self.cfg
        dtype = self.history.weight.dtype
        prof = [self.profile[n](tables.lookup(n, batch.profile[:, i]).to(dtype)) for i, n in enumerate(cfg.profile)]
        hist = self.history(torch.cat([tables.lookup(n, batch.history[n]).to(dtype) for n in cfg.history], -1))
        cand_parts = [tables.lookup(n, batch.candidates[n]).to(dtype) for n in cfg.candidate]
        cand = self.candidate(torch.cat([*cand_parts, batch.cross.to(dtype)], -1))
        pieces, times, sizes = [], [], []
        ho, co = batch.history_offsets.tolist(), batch.candidate_offsets.tolist()
        for b in range(batch.users):
            user_prof = [p[b : b + 1] for p in prof]
            n_c = co[b + 1] - co[b]
            pieces += [*user_prof, hist[ho[b] : ho[b + 1]], cand[co[b] : co[b + 1]]]
            now = batch.request_time[b : b + 1]
            times += [now.expand(len(user_prof)), batch.history_time[ho[b] : ho[b + 1]], now.expand(n_c)]
            sizes.append(len(user_prof) + ho[b + 1] - ho[b] + n_c)
        offsets = torch.zeros(batch.users + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
        return Tokens(
            tokens=torch.cat(pieces),
            offsets=offsets,
            num_candidates=lengths_of(batch.candidate_offsets),
            timestamps=torch.cat(times).to(torch.int64),
        )


class GRModel(nn.Module):
    """The whole model: tables -> tokens -> dense. ``forward`` returns [Tc, tasks] candidate scores."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.projector = TokenProjector(cfg)
        self.dense = GRDense(cfg)

    def forward(self, batch: Batch, tables: Tables, impl: str = "pytorch") -> torch.Tensor:
        tok = self.projector(batch, tables)
        scores = self.dense.forward_jagged(tok.tokens, tok.offsets, tok.num_candidates, tok.timestamps, impl=impl)
        idx = local_index(tok.offsets)
        n_ctx = torch.repeat_interleave(lengths_of(tok.offsets) - tok.num_candidates, lengths_of(tok.offsets))
        return scores[idx >= n_ctx]
