"""One history-cache step, written once for both models that serve the cache: the ensemble path's
``history_cached`` (grc/serving/triton/models/history_cached.py, host tokens) and the fused pipeline's
``Ranker`` (grc/serving/ranker/, device tokens).

    visit   a user's entry looked up: how many of its history events the cache already holds
    part    the user's request without those events (what the caller projects into tokens)
    score   the new tokens against the cached K/V in ONE ``GRDense.score`` call (a miss: against an
            empty cache, i.e. the whole sequence), and the grown entries stored for users with an id

The contract (README "User-history cache") lives in history_cache.py: prefix match = hit, anything
else = miss + whole sequence + replace; scores equal the uncached model's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from grc.serving.common import request as rq
from grc.serving.common.history_cache import (
    CachedHistory,
    HistoryCache,
    cached_history,
    match,
    model_namespace,
)
from grc.serving.common.validate import RequestError
from grc.spec.schema import ModelConfig

if TYPE_CHECKING:  # annotations only: the bundle writers import this module's names without torch
    from collections.abc import Callable

    import torch

    from grc.model.gr import GRDense
    from grc.model.kv_cache import UserKV
    from grc.serving.common.arena_graphs import ArenaGraphs, Prepared
    from grc.serving.common.kv_arena import Lease
    from grc.serving.common.score_graphs import GraphedSteps, ScoreGraphs
    from grc.serving.ranker.dense import GraphStats


USER_ID = "user_id"


def user_ids(users: np.ndarray | None, batch: int) -> np.ndarray | None:
    """A request's optional ``user_id`` input checked: [batch] int64 ids, or None (cache nothing)."""
    if users is None:
        return None
    if users.shape != (batch, 1) or users.dtype != np.int64:
        raise RequestError(
            f"{USER_ID}: expected INT64 [{batch}, 1], one id per user (got {users.dtype} {list(users.shape)})"
        )
    return users.reshape(-1).copy()


def event_inputs(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """The inputs ``user_events`` reads: the profile ids', and the events' columns (history ids, then timestamp)."""
    return [rq.profile_input(t) for t in cfg.profile], [rq.history_input(t) for t in cfg.history] + [rq.HISTORY_TIME]


def user_events(
    checked: dict[str, np.ndarray], inputs: tuple[list[str], list[str]], u: int
) -> tuple[np.ndarray, np.ndarray]:
    """User ``u``'s profile ids [P] and events [h, history tables + 1] (ids, then timestamp); ``inputs``:
    ``event_inputs`` of the model (named once per store, not per user)."""
    profiles, names = inputs
    profile = np.array([checked[name][u, 0] for name in profiles], np.int64)
    events = np.empty((checked[rq.HISTORY_TIME].shape[1], len(names)), np.int64)  # fresh: an entry may keep it
    for j, name in enumerate(names):  # a column each (np.stack: an expand_dims per column, ~3x the host time)
        events[:, j] = checked[name][u]
    return profile, events


def user_request(checked: dict[str, np.ndarray], cfg: ModelConfig, u: int, skip_events: int) -> dict[str, np.ndarray]:
    """User ``u`` alone (batch 1), without its first ``skip_events`` history events."""
    history = {rq.history_input(t) for t in cfg.history} | {rq.HISTORY_TIME}
    return {name: a[u : u + 1, skip_events:] if name in history else a[u : u + 1] for name, a in checked.items()}


@dataclass(frozen=True)
class Visit:
    """One user of a request, looked up: ``held`` the cache of its entry (None: a miss, or no id), whose profile
    tokens and first ``reused`` history events are reusable (``kv``)."""

    user: int | None
    profile_ids: np.ndarray
    events: np.ndarray
    now: int
    held: UserKV | None
    reused: int
    lease: Lease | None = None  # where the entry's rows lie in the device arena (UserCaches.arena), if they do

    @property
    def rows(self) -> int:
        """The reusable rows of ``held`` (0: a miss)."""
        return 0 if self.held is None else self.held.profile + self.reused

    @cached_property
    def kv(self) -> UserKV | None:
        """The reusable cache (views of ``held``'s first ``rows``), made when first read: the arena's step reads the
        entry's rows where they lie (two torch slices per hit it never needed)."""
        return None if self.held is None else self.held.prefix(self.rows)


class UserCaches:
    """The store of one model instance plus the model identity its keys carry."""

    def __init__(self, cfg: ModelConfig, budget: int, max_user: int | None, weights_digest: str, dtype: str, impl: str):
        self.cfg = cfg
        self.cache = HistoryCache(budget, max_user)
        # the K/V dtype and the attention implementation are part of what was cached
        self.namespace = model_namespace(cfg.model_dump_json(), weights_digest, f"{dtype}/{impl}")
        self.impl = impl
        self.inputs = event_inputs(cfg)
        self.graphs: ScoreGraphs | None = None  # set on a GPU with CUDA graphs on: the step replayed from graphs
        self.arena: ArenaGraphs | None = None  # set instead: entries kept as rows of one device arena (use_arena)

    @property
    def graphed(self) -> GraphedSteps | None:
        """The graphed step in use (the arena's or the copies'), if any: its captures are what the trace writes."""
        return self.arena if self.arena is not None else self.graphs

    def use_store(
        self, dense: GRDense, store: str, stats: GraphStats, max_users: int, log: Callable[[str], None], graphs: bool
    ) -> GraphedSteps | None:
        """Where entries live and what scores them (bundles.triton.history_cache.store; ``graphs``: the instance
        replays its steps from CUDA graphs): ``arena``, rows of one buffer of the budget on the dense model's device
        (allocated now) that the step reads and grows in place (grc/serving/common/arena_graphs.py; without graphs
        run eagerly at each step's exact shape); ``copies``, a tensor per entry, with graphs copied into the step's
        buffers and out (score_graphs.py), without them scored by ``GRDense.score``; ``auto``, arena with graphs,
        else copies. -> the graphed or arena step (None: GRDense.score). Said through ``log``; the caller warms up."""
        from grc.model.kv_cache import KVLayout
        from grc.serving.common.arena_graphs import ArenaGraphs
        from grc.serving.common.kv_arena import KVArena
        from grc.serving.common.score_graphs import ScoreGraphs

        if store not in ("auto", "arena", "copies"):
            raise ValueError(f"history cache store: expected auto, arena or copies (got {store!r})")
        if store == "copies" or (store == "auto" and not graphs):
            if not graphs:
                return None
            self.graphs = ScoreGraphs(dense, self.impl, stats, max_users)
            log("history cache: entries as tensors of their own; the cached score step runs in CUDA graphs (captured "
                "per padded shape at first use), each hit's entry copied in and the grown entry out")  # fmt: skip
            return self.graphs
        like = next(dense.parameters())
        h = dense.cfg.hstu
        headroom = max_users * h.max_seq_len  # one step's rows, allocated before the store evicts for its grown entries
        layout = KVLayout(h.num_layers, h.num_heads, h.head_qk, h.head_v)
        scratch = ArenaGraphs.scratch_rows(dense, max_users)
        arena = KVArena.for_budget(layout, self.cache.budget, headroom, scratch, like)
        step = ArenaGraphs(dense, self.impl, stats, max_users, arena, graphs=graphs)
        self.use_arena(step)
        how = "in CUDA graphs (captured per padded shape at first use)" if graphs else "eagerly, at each step's shape"
        log(f"history cache: entries as rows of one {arena.nbytes / (1 << 20):.0f} MiB arena on {like.device} "
            f"({arena.alloc.rows} rows of {arena.row_bytes} bytes, {headroom} of them one step's headroom); the cached "
            f"score step reads and grows them in place, {how}")  # fmt: skip
        return step

    def use_arena(self, arena: ArenaGraphs) -> None:
        """Keep entries in ``arena.arena`` and score through ``arena`` (before the first request: the store must
        be empty, its entries counted at their extents' capacity from then on)."""
        if self.cache.stats().entries:
            raise RuntimeError("use_arena: the store already holds entries")
        arena.arena.attach(self.cache)
        self.arena = arena

    def visit(self, checked: dict[str, np.ndarray], u: int, user: int | None) -> Visit:
        """User ``u`` of a checked request, with its id (None: cache nothing, count nothing)."""
        ids, events = user_events(checked, self.inputs, u)
        now = int(checked[rq.REQUEST_TIME][u, 0])
        if user is None:
            return Visit(None, ids, events, now, None, 0)
        buckets = self.cfg.hstu.time_buckets
        reused = 0

        def usable(entry: CachedHistory) -> bool:
            nonlocal reused
            found = match(entry, ids, events, now, buckets)
            reused = found if isinstance(found, int) else 0
            return isinstance(found, int)

        found = self.cache.lookup((self.namespace, user), usable)
        if found is None:
            return Visit(user, ids, events, now, None, 0)
        return Visit(user, ids, events, now, found.kv, reused, found.lease)

    def score(
        self,
        dense: GRDense,
        visits: list[Visit],
        tokens: torch.Tensor,
        stamps: torch.Tensor,
        bounds: list[int],
        candidates: list[int],
        host_stamps: np.ndarray,
        prepared: Prepared | None = None,
        trimmed: bool = False,
    ) -> torch.Tensor:
        """The visits' parts back to back: tokens [T, D] and stamps [T] (visit b's rows ``bounds[b]:bounds[b+1]``:
        profile tokens, the new history events, the candidates; on the dense model's device and dtype;
        ``host_stamps`` the same stamps on the host) -> the candidates' scores [sum(candidates), tasks] in visit
        order; the grown entries of users with an id are stored. Whole tensors, not one per visit: the caller's
        per-visit slices and this step's re-slicing were 3 torch ops per user, each a few us of host time (a step
        of misses now slices nothing; bench/served_host_profile.py). ``trimmed``: the rows hold only what the cache
        does not, a hit's profile tokens left out (the fused Ranker lays out only those: ``layout.build``'s
        ``profiled``), so nothing is sliced here. ``prepared``: with the arena, its step as ``prepare`` placed and
        planned it for these arguments (trimmed; None: placed and planned here). The arena's step reads the stamps
        from the host (``stamps`` unread)."""
        import torch

        if not trimmed:
            profile = len(self.cfg.profile)
            spans = [(a + (profile if v.held is not None else 0), b)  # a hit holds the profile tokens already
                     for v, (a, b) in zip(visits, itertools.pairwise(bounds), strict=True)]  # fmt: skip
            if any(v.held is not None for v in visits):
                tokens = torch.cat([tokens[a:b] for a, b in spans])
                host_stamps = np.concatenate([host_stamps[a:b] for a, b in spans])
                if self.arena is None:
                    stamps = torch.cat([stamps[a:b] for a, b in spans])
            bounds = [0, *itertools.accumulate(b - a for a, b in spans)]
        if self.arena is not None:
            return self._score_in_arena(visits, tokens, bounds, candidates, host_stamps, prepared)
        profile = len(self.cfg.profile)
        # GRDense.score (or the copies step) takes an empty cache for a miss and the new rows' stamps on the device
        caches = [v.kv if v.kv is not None else dense.empty_cache(profile, tokens) for v in visits]
        args = (
            caches,
            tokens,
            torch.tensor(bounds),  # host integers: score reads them without a device sync
            torch.tensor(candidates),
            stamps,
            [v.now for v in visits],
            self.impl,
        )
        with torch.no_grad():
            # reuse_checked: visit() kept only the rows reusable at each request's time (host events)
            if self.graphs is None:
                scores, grown = dense.score(*args, reuse_checked=True)
            else:  # the graphed step lays the key rows' stamps out on the host
                scores, grown = self.graphs.score(*args, reuse_checked=True, host_timestamps=host_stamps)
        for v, kv in zip(visits, grown, strict=True):
            if v.user is not None:
                entry = cached_history(kv, v.profile_ids, v.events, v.now, owned=True)  # visit's own arrays
                self.cache.store((self.namespace, v.user), entry)
        return scores

    def prepare(
        self, visits: list[Visit], bounds: list[int], candidates: list[int], host: np.ndarray
    ) -> Prepared | None:
        """With the arena: ``score``'s placement and plan (ArenaGraphs.prepare) before the tokens are computed,
        for the arguments ``score`` then takes (None without the arena). The caller passes the result to
        ``score``, or to ``abandon`` if computing the tokens fails."""
        if self.arena is None:
            return None
        from grc.serving.common.arena_graphs import ArenaUser

        users = [ArenaUser(v.held, v.lease, v.user is not None, v.now, v.rows, v.events[:, -1]) for v in visits]
        try:
            return self.arena.prepare(users, bounds, candidates, host)
        except BaseException:
            self._discard(visits)
            raise

    def token_buffer(self, prepared: Prepared | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Where the prepared step's new tokens may be computed in place (ArenaGraphs.token_buffer; None without the
        arena): ``score`` then copies them nowhere."""
        return None if prepared is None or self.arena is None else self.arena.token_buffer(prepared, dtype)

    def abandon(self, visits: list[Visit], prepared: Prepared | None) -> None:
        """A prepared step that will not run: its extents and pins go back, and its users' entries go (a hit's was
        claimed for the step)."""
        if prepared is not None:
            assert self.arena is not None
            try:
                self.arena.abandon(prepared)
            finally:
                self._discard(visits)

    def _discard(self, visits: list[Visit]) -> None:
        for v in visits:
            if v.user is not None:
                self.cache.discard((self.namespace, v.user))

    def _score_in_arena(
        self,
        visits: list[Visit],
        tokens: torch.Tensor,
        offsets: list[int],
        candidates: list[int],
        host: np.ndarray,
        prepared: Prepared | None,
    ) -> torch.Tensor:
        """``score`` through the arena's step: the grown entries are rows of the arena, each stored as the owner of
        its lease. A step that fails lets its users' entries go: it may have rewritten rows they hold."""
        import torch

        assert self.arena is not None
        if prepared is None:
            prepared = self.prepare(visits, offsets, candidates, host)
            assert prepared is not None

        def keep(b: int, kv: UserKV, lease: Lease) -> None:
            v = visits[b]
            entry = cached_history(kv, v.profile_ids, v.events, v.now, lease, owned=True)  # visit's own arrays
            lease.owner = entry
            self.cache.store((self.namespace, v.user), entry)

        try:
            with torch.no_grad():
                scores = self.arena.finish(prepared, tokens, keep)
        except BaseException:
            self._discard(visits)
            raise
        return scores
