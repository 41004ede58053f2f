"""The history cache's score step replayed from CUDA graphs: what makes a hit pay on a GPU.

Eagerly, one user's cached step at mtgr-small is ~0.24 ms of device work under ~3.5 ms of Python and
launches on the H200 (bench/results/history-cache-profile-h200.json); the uncached request runs the
compiled package in a CUDA graph. So the cached step runs in graphs too: ``GRDense.run_scattered`` on
fixed-shape buffers, one graph per shape (users, new rows, key rows), each captured at its first use
and kept: the least recently used are dropped past ``max_graphs`` shapes. Every shape reads its key rows
from ONE buffer all shapes share (an instance runs one step at a time), grown when a shape needs more rows
(which drops the captured graphs: they read the old buffer). Per-shape key buffers, capped at 4 GiB, were
dropped and recaptured over and over in the served session workload at 16 clients, where batches of 1-16
users mixing hits and misses meet dozens of shapes: a capture stalls the instance ~10-35 ms on the H200.

A step of B users, Tq new rows and Tkv = sum(cached + new) key rows is padded to the smallest rung of
the new-row ladder Tq' >= Tq, then of the key ladder Tkv' >= Tkv + (Tq' - Tq). The padding rows go to
pad users whose rows are all candidates (each attends to itself alone: linear work, finite values) and
who hold at most max_seq_len keys each; spare user slots are empty. A real user's rows cannot change:
attention never crosses users and everything else is row-wise (the same argument as buckets.py). The key
ladder doubles (the new-row ladder grows by 1.25): padding keys cost no device work (they go to pad users
with no queries, or to the pad rows' own sequences), only rows of the shared buffer, and fewer key rungs
mean fewer shapes to capture.

Per call, on the device, outside the graph: the users' cached K/V (one packed tensor per user: every
layer's K and V, ``UserKV.rows``) copied into the shape's key buffers and the new tokens into its token
buffer (one multi-tensor copy), the layout (offsets, slots, groups, candidate rows, and the key rows'
timestamps: host values, the entries keep their stamps on the host) in one copy from pinned memory; then
one replay, and the candidates' scores gathered. The step writes the new rows' K/V into the key buffers
at their slots, right after the user's cached rows, so a grown entry is one contiguous run of the key
buffers, copied out (one clone per user: the next replay reuses the buffers), its stamps a slice of the
host layout. Per user the host launches about two ops, not two per layer: at 16 users per step the host
time, not the device, set the pace (bench/results/history-cache-batches-h200-split.json).

A step no rung holds (more users or rows than the ladders reach) runs ``GRDense.score`` eagerly,
counted in ``GraphStats.graph_misses``: the same scores, slower, and visible in the metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from grc.aoti.runtime import capture_graph
from grc.model.gr import GRDense, token_groups
from grc.model.kv_cache import HistoryCacheUnsupported, KVLayout, UserKV
from grc.serving.ranker.buckets import ladder
from grc.serving.ranker.dense import GraphStats

CAPTURE_LOG_KEPT = 256  # ScoreGraphs.capture_log: each capture's shape, seconds and counts (trace.py writes them)
ALIGN = 2  # int64 elements: each field starts 16-byte aligned (Shape.spans)
# The layout's fields, in the order they are packed into one int64 buffer (sizes: users + 1, users + 1,
# users, new rows each, then the key rows' timestamps: built on the host, they travel with the layout).
FIELDS = ("q_offsets", "kv_offsets", "num_candidates", "group", "slots", "is_candidate", "candidate_rows", "stamps")


@dataclass(frozen=True)
class Shape:
    users: int
    rows: int  # new rows (queries)
    keys: int  # key rows: cached + new, padding included

    def sizes(self) -> dict[str, int]:
        u, r = self.users, self.rows
        return dict(zip(FIELDS, (u + 1, u + 1, u, r, r, r, r, self.keys), strict=True))

    @cached_property
    def spans(self) -> dict[str, tuple[int, int]]:
        """Each field's (start, end) in the packed buffer, every start a multiple of ALIGN elements: Triton
        specialises a kernel on whether each pointer is 16-byte aligned, so a field at an odd int64 offset in some
        shapes and an even one in others compiled a second variant on a request's path (a 2.7 s stall, served
        at 16 clients on the H200, session 14). Worked out once per shape: every step of the shape reads it."""
        return packed_spans(self.sizes())

    @property
    def length(self) -> int:
        """Elements of the packed buffer (the last field's end)."""
        return self.spans[FIELDS[-1]][1]


def packed_spans(sizes: dict[str, int], align: int = ALIGN) -> dict[str, tuple[int, int]]:
    """Each field's (start, end) in one packed buffer, in order, every start a multiple of ``align`` elements (ALIGN:
    16 bytes of int64)."""
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = (start, start + size)
        start = -(-(start + size) // align) * align
    return out


def pad_users(rows: int, keys: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(new rows, key rows) of the pad users that carry ``rows`` padding queries and ``keys`` >= ``rows``
    padding key rows: at most max_seq_len keys each, a user's queries a suffix of its keys."""
    users = []
    while keys > 0:
        k = min(keys, max_seq_len)
        q = min(rows, k)
        users.append((q, k))
        keys, rows = keys - k, rows - q
    return users


@dataclass
class Layout:
    """One step's padded layout, host side: its shape, the packed int64 fields (the key rows' stamps among them),
    per real user where its key rows start, and how many candidate rows the real users have in all."""

    shape: Shape
    packed: np.ndarray
    kv_starts: list[int]
    candidates: int  # candidate rows of the real users (the first entries of candidate_rows)


def plan(
    dense: GRDense,
    caches: list[UserKV],
    bounds: list[int],
    candidates: list[int],
    stamps: np.ndarray,
    now: list[int],
    rows_ladder: list[int],
    keys_ladder: list[int],
) -> Layout | None:
    """The padded layout of B users (``caches``: their cached rows and host stamps; ``bounds``: their new rows'
    offsets, the last ``candidates[b]`` of each user candidates; ``stamps``: the new rows' [Tq] on the host;
    ``now``: the request times the cached profile rows take), or None when no rung holds it."""
    past = [c.length for c in caches]
    max_seq_len = dense.cfg.hstu.max_seq_len
    new = [b - a for a, b in itertools.pairwise(bounds)]
    total_q, total_kv = bounds[-1], sum(past) + bounds[-1]
    rows = next((r for r in rows_ladder if r >= total_q), None)
    if rows is None:
        return None
    keys = next((k for k in keys_ladder if k >= total_kv + rows - total_q), None)
    if keys is None:
        return None
    users = [(n, p + n, c) for p, n, c in zip(past, new, candidates, strict=True)]
    users += [(q, k, k) for q, k in pad_users(rows - total_q, keys - total_kv, max_seq_len)]  # all candidates
    slots = 1 << (len(users) - 1).bit_length()  # user slots: a power of two, the spare ones empty
    users += [(0, 0, 0)] * (slots - len(users))
    shape = Shape(slots, rows, keys)
    packed = np.zeros(shape.length, np.int64)
    q_off, kv_off, n_c, group, slot, mask, picked, kv_stamps = (packed[a:b] for a, b in shape.spans.values())
    n_q, n_kv, n_c[:] = np.array(users, np.int64).T
    np.cumsum(n_q, out=q_off[1:])
    np.cumsum(n_kv, out=kv_off[1:])
    owner = np.repeat(np.arange(slots), n_q)
    position = np.arange(rows) - q_off[owner] + (n_kv - n_q)[owner]  # each new row's place in its sequence
    n_ctx = (n_kv - n_c)[owner]
    group[:] = token_groups(dense.cfg, position, n_ctx)
    slot[:] = kv_off[owner] + position
    mask[:] = (position >= n_ctx) & (owner < len(past))
    chosen = np.flatnonzero(mask)
    picked[: chosen.size] = chosen
    real = bounds[-1]
    kv_stamps[slot[:real]] = stamps  # the new rows' stamps where their K/V go (pad users' keys: 0)
    for cache, start, t in zip(caches, kv_off.tolist(), now, strict=False):  # the cached rows, restamped
        kv_stamps[start : start + cache.length] = cache.timestamps.numpy()
        if cache.length:
            kv_stamps[start : start + min(cache.profile, cache.length)] = t
    return Layout(shape, packed, kv_off[: len(past)].tolist(), int(chosen.size))


class PackedStep:
    """One padded shape's buffers and graph, as both graphed cached steps keep them: the new tokens, the layout's
    int64 fields packed in one device buffer (``shape.spans``) with its pinned host twin, and the captured graph with
    its outputs. Subclasses say what ``run`` launches."""

    def __init__(self, shape: Any, d_model: int, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        self.tokens = torch.zeros(shape.rows, d_model, dtype=dtype, device=device)
        self.packed = torch.zeros(shape.length, dtype=torch.int64, device=device)
        self.fields = {name: self.packed[a:b] for name, (a, b) in shape.spans.items()}
        pin = device.type == "cuda"
        # on a CPU the layout is written where the step reads it: no host twin, no copy per step
        cpu = device.type == "cpu"
        self.host = self.packed if cpu else torch.zeros(self.packed.numel(), dtype=torch.int64, pin_memory=pin)
        self.host_array = self.host.numpy()  # made once: .numpy() is a torch op per call
        self.copied = torch.cuda.Event() if pin else None  # the host buffer is free again once this passed
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes of this shape's own buffers."""
        own = (self.tokens, self.packed) if self.host is self.packed else (self.tokens, self.packed, self.host)
        return sum(t.numel() * t.element_size() for t in own)

    def run(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        raise NotImplementedError

    def capture(self, pool: Any, streams: tuple[Any, Any], seconds: dict[str, float]) -> None:
        """Captured between requests: the allocators' cached blocks kept (capture_graph's free_memory=False; the
        pool a live graph holds, GraphedSteps._capture_pool), on the instance's two side streams."""
        self.graph, self.out = capture_graph(
            lambda: self.run(), [], pool, seconds=seconds, free_memory=False, streams=streams
        )

    def host_buffer(self) -> np.ndarray:
        """The host buffer, for a layout to be written into in place (``upload`` then copies no host memory), once
        the previous call's copy has read it."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_array

    def upload(self, packed: np.ndarray) -> None:
        """The layout's fields to the device in one copy from the pinned host buffer (``packed``: that buffer,
        written in place, or an array copied into it first)."""
        if packed is not self.host_array:
            self.host_buffer()[:] = packed
        if self.host is not self.packed:
            self.packed.copy_(self.host, non_blocking=True)
            if self.copied is not None:
                self.copied.record()


class _Step(PackedStep):
    """One shape of the copies step: its view of the key rows all shapes share."""

    def __init__(self, dense: GRDense, shape: Shape, impl: str, fuse: bool, rows: torch.Tensor, layout: KVLayout):
        """rows: the key rows all shapes share ([>= shape.keys, layout.width], ScoreGraphs._key_rows)."""
        super().__init__(shape, dense.cfg.d_model, rows.dtype, rows.device)
        self.dense, self.impl, self.fuse = dense, impl, fuse
        # every layer's K/V of a key row in one row, packed as the store's entries (UserKV.layout): a user's
        # cached rows go in, and its grown entry comes out, in one copy each
        self.rows = rows[: shape.keys]
        keys, values = layout.split(self.rows)
        self.keys, self.values = list(keys), list(values)
        self.stamps = self.fields["stamps"]  # uploaded with the layout

    def run(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        f = self.fields
        return self.dense.run_scattered(
            self.tokens, f["group"], self.keys, self.values, f["slots"], f["q_offsets"], f["kv_offsets"],
            self.stamps, f["num_candidates"], f["is_candidate"] != 0, self.impl, self.fuse,
        )  # fmt: skip


def capture_counts() -> tuple[int, int, int]:
    """(Triton variants compiled, autotuning keys, cudaMalloc calls) so far: a capture's first eager run took
    ~140 ms served at 16 clients on the H200 and ~5 ms in-process (session 13); the differences say which."""
    from kernels.tuning import jit_state

    return (*jit_state(), int(torch.cuda.memory_stats().get("num_device_alloc", 0)))


class GraphedSteps:
    """What both graphed cached steps share (ScoreGraphs here: entries copied in and out of the step's key rows;
    ArenaGraphs, grc/serving/common/arena_graphs.py: entries read where they lie): the new-row ladder, one kept step
    (buffers and graph) per padded shape, least recently used dropped past ``max_graphs``, captures on the instance's
    two side streams into one shared pool, each logged and counted (``graphs=False``: the same padded step run
    eagerly, which is how the CPU tests check the padding)."""

    RANGES = False  # the step's attention reads keys through [users, 2] ranges (what warm_up compiles)
    # The warm-up step's new history events and candidates. The fused GEMMs' autotuning key leaves the rows out
    # (kernels/fused_linear.py), so their pick is made on this step's rows and then serves every request: made at
    # 16 candidates (~80 rows) it served 266-row hits with tiles 1.5x slower on the H200 in one of two runs
    # (session 21). So the warm-up runs a served hit's rows.
    WARM_EVENTS, WARM_CANDIDATES = 10, 256

    def __init__(
        self,
        dense: GRDense,
        impl: str,
        stats: GraphStats,
        max_users: int,
        graphs: bool = True,
        max_graphs: int = 64,
        fuse: bool | None = None,
    ):
        """fuse (default: with impl "triton"): the layers' fused Triton GEMMs and the heads kernel, as the
        GPU compile path of the uncached model (fewer launches in the graph)."""
        h = dense.cfg.hstu
        if h.history_mask != "causal":
            raise HistoryCacheUnsupported(f"hstu.history_mask {h.history_mask}: the history cache needs causal")
        self.dense, self.impl, self.stats, self.graphs, self.max_graphs = dense, impl, stats, graphs, max_graphs
        self.fuse = impl == "triton" if fuse is None else fuse
        self.rows_ladder = ladder(16, max_users * h.max_seq_len)
        self.layout = KVLayout(h.num_layers, h.num_heads, h.head_qk, h.head_v)
        self.steps: OrderedDict[Any, Any] = OrderedDict()  # padded shape -> its step (buffers, graph)
        self.pool: Any = None  # the graphs' shared memory pool (_capture_pool)
        self.streams: tuple[Any, Any] | None = None  # the captures' warm-up and capture streams, kept (capture_graph)
        self.capture_log: deque[dict[str, Any]] = deque(maxlen=CAPTURE_LOG_KEPT)  # the last captures, one by one

    def warm_up(self, like: torch.Tensor) -> list[tuple[int, bool]]:
        """Before serving (``like``: the device and dtype): the cached attention kernel autotuned for every key the
        steps can meet (kernels.hstu_attention.tune_cached), then one step of a served hit's rows (a miss of one short
        user: WARM_EVENTS + WARM_CANDIDATES), which compiles and tunes the fused GEMMs and the heads kernel at that
        shape and captures its graph. On the H200 a step that met a new autotuning key on a request's path stalled
        the instance for ~18 s (session 9's served session workload at 16 clients). -> the attention keys tuned
        (none when the step runs the reference ops)."""
        if self.impl != "triton":
            return []
        from kernels.hstu_attention import tune_cached

        cfg, h = self.dense.cfg, self.dense.cfg.hstu
        attention = next(iter(self.dense.hstu_layers)).attention  # every layer's tables have the same shapes
        with torch.no_grad():
            tuned = tune_cached(*attention.constants, h.max_seq_len, h.head_qk, h.head_v, like.dtype, self.RANGES)
            cap = h.max_seq_len // 4  # a served hit's rows (WARM_*), capped for short specs
            events, candidates = min(self.WARM_EVENTS, cap), min(self.WARM_CANDIDATES, cap)
            profile, now = len(cfg.profile), 1_750_000_000
            n = profile + events + candidates
            tokens = torch.randn(n, cfg.d_model, generator=torch.Generator().manual_seed(0)).to(like.device, like.dtype)
            gaps = torch.cat([torch.zeros(profile), torch.arange(events, 0, -1) * 60.0, torch.zeros(candidates)])
            stamps = (now - gaps).to(torch.int64)
            served, self.stats = self.stats, GraphStats()  # the served model's counters count requests only
            try:
                self._warm_step(tokens, stamps, candidates, now)
            finally:
                self.stats = served
                self.capture_log.clear()  # they count and list requests' captures only
        return tuned

    def _warm_step(self, tokens: torch.Tensor, stamps: torch.Tensor, candidates: int, now: int) -> None:
        """One user's whole sequence scored as a miss, nothing kept (``stamps`` on the host)."""
        raise NotImplementedError

    def _capture_pool(self) -> Any:
        """The graphs' shared memory pool for the next capture: the one they hold, or a fresh one when no kept step
        has a graph (the key rows grew, or the LRU dropped the last one): captures skip torch.cuda.graph's release
        of cached blocks, and joining a pool no live graph holds fails (capture_graph's free_memory)."""
        if self.pool is None or not any(step.graph is not None for step in self.steps.values()):
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool

    def _kept(self, shape: Any, make: Any) -> Any:
        """The kept step of ``shape`` (``make()`` builds it the first time), now the most recently used."""
        step = self.steps.get(shape)
        if step is None:
            step = self.steps[shape] = make()
            while len(self.steps) > self.max_graphs:  # the least recently used go first
                self.steps.popitem(last=False)
        self.steps.move_to_end(shape)
        return step

    def _replay(self, step: Any) -> Any:
        """``step.run()``'s results: replayed from its graph (captured at its first use, counted and logged), or run
        eagerly without graphs."""
        if not self.graphs:
            return step.run()
        if step.graph is None:
            seconds: dict[str, float] = {}
            if self.streams is None:
                self.streams = (torch.cuda.Stream(), torch.cuda.Stream())
            before = capture_counts()
            step.capture(self._capture_pool(), self.streams, seconds)
            compiles, tunings, allocs = (b - a for a, b in zip(before, capture_counts(), strict=True))
            self.capture_log.append(
                {"shape": dataclasses.astuple(step.shape), "compiles": compiles, "tunings": tunings,
                 "device_allocs": allocs, **{k: round(v, 6) for k, v in seconds.items()}}
            )  # fmt: skip
            self.stats.capture_compiles += compiles
            self.stats.capture_tunings += tunings
            self.stats.capture_device_allocs += allocs
            self.stats.captures += 1
            self.stats.capture_s += seconds["warmup"] + seconds["capture"]
            self.stats.capture_warmup_s += seconds["warmup"]
            self.stats.capture_first_run_s += seconds["first_run"]
            self.stats.capture_wait_s += seconds["wait"]
        assert step.graph is not None
        step.graph.replay()
        self.stats.graph_hits += 1
        return step.out


class ScoreGraphs(GraphedSteps):
    """``GRDense.score`` for the store's users (``UserCaches.score`` calls it when set): the same arguments
    and results, the device step replayed from a CUDA graph per padded shape (users, new rows, key rows), every
    user's cached rows copied into the key rows all shapes share and its grown entry copied back out."""

    def __init__(self, dense: GRDense, impl: str, stats: GraphStats, max_users: int, **kw: Any):
        super().__init__(dense, impl, stats, max_users, **kw)
        self.keys_ladder = ladder(256, 2 * max_users * dense.cfg.hstu.max_seq_len, step=2.0)  # + the padding's keys
        self.rows: torch.Tensor | None = None  # the key rows every shape's step reads: grown on demand

    def _warm_step(self, tokens: torch.Tensor, stamps: torch.Tensor, candidates: int, now: int) -> None:
        empty = self.dense.empty_cache(len(self.dense.cfg.profile), tokens)
        offsets, counts = torch.tensor([0, tokens.shape[0]]), torch.tensor([candidates])
        self.score([empty], tokens, offsets, counts, stamps.to(tokens.device), [now], self.impl, reuse_checked=True)

    @property
    def nbytes(self) -> int:
        """Bytes of the static buffers: the shared key rows and the kept shapes' own (the graphs' intermediates
        come from the shared pool)."""
        shared = 0 if self.rows is None else self.rows.numel() * self.rows.element_size()
        return shared + sum(step.nbytes for step in self.steps.values())

    def _key_rows(self, keys: int, like: torch.Tensor) -> torch.Tensor:
        """The shared key rows, at least ``keys`` of them in ``like``'s dtype and device. Short, they grow to
        ``keys`` or four times what they held (at most the key ladder's top): growing drops every kept step
        (their graphs read the old rows), so it should happen a few times early, not at every larger shape."""
        rows = self.rows
        if rows is None or rows.shape[0] < keys or rows.dtype != like.dtype or rows.device != like.device:
            held = 0 if rows is None else rows.shape[0]
            size = max(keys, min(4 * held, self.keys_ladder[-1]))
            self.steps.clear()
            self.rows = rows = None  # the old rows freed before the new are allocated
            if like.is_cuda:  # rare (a few times early): the old rows and the dropped graphs' pool go back now
                torch.cuda.empty_cache()
            self.rows = rows = torch.zeros(size, self.layout.width, dtype=like.dtype, device=like.device)
        return rows

    def _step(self, shape: Shape, like: torch.Tensor) -> _Step:
        rows = self._key_rows(shape.keys, like)
        step: _Step = self._kept(shape, lambda: _Step(self.dense, shape, self.impl, self.fuse, rows, self.layout))
        return step

    def score(
        self,
        caches: list[UserKV],
        tokens: torch.Tensor,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        now: list[int],
        impl: str,
        *,
        reuse_checked: bool = False,
        host_timestamps: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, list[UserKV]]:
        """As ``GRDense.score`` (``offsets`` / ``num_candidates`` host tensors; ``reuse_checked`` must be true:
        the store checked reuse on the host). ``host_timestamps``: ``timestamps`` as the host has them (the
        served callers do: their layouts are built there); without it they are read back from the device."""
        bounds, candidates = [int(o) for o in offsets.tolist()], [int(c) for c in num_candidates.tolist()]
        past = [c.length for c in caches]
        longest = max((p + b - a for p, (a, b) in zip(past, itertools.pairwise(bounds), strict=True)), default=0)
        ours = impl == self.impl and reuse_checked and longest <= self.dense.cfg.hstu.max_seq_len
        layout = None
        if ours and min(candidates, default=0) >= 1:
            host = timestamps.cpu().numpy() if host_timestamps is None else host_timestamps
            layout = plan(self.dense, caches, bounds, candidates, host, now, self.rows_ladder, self.keys_ladder)
            self.stats.graph_misses += layout is None
        if layout is None:  # no rung holds it, or a step score refuses (in its own words) or another impl
            return self.dense.score(
                caches, tokens, offsets, num_candidates, timestamps, now, impl, reuse_checked=reuse_checked
            )
        step = self._step(layout.shape, tokens)
        step.upload(layout.packed)
        self._fill(step, layout, caches, tokens, bounds)
        out = self._replay(step)[0]
        self.stats.padded_tokens += layout.shape.rows - bounds[-1]
        scores = out[step.fields["candidate_rows"][: layout.candidates]]
        return scores, self._grown(step, layout, caches, bounds, candidates)

    @staticmethod
    def _grown(
        step: _Step, layout: Layout, caches: list[UserKV], bounds: list[int], candidates: list[int]
    ) -> list[UserKV]:
        """Each user's grown entry, copied out of the step's key buffers: its cached rows (put there by _fill)
        and its new history events' K/V (written at their slots by the step) are already one contiguous run of
        rows there, the candidates' rows after it, left out; its stamps from the layout's (host, restamped). A
        copy: the next step reuses the buffers."""
        stamps = layout.packed[layout.shape.spans["stamps"][0] :]  # the last field
        out = []
        for b, (cache, start) in enumerate(zip(caches, layout.kv_starts, strict=True)):
            end = start + cache.length + bounds[b + 1] - bounds[b] - candidates[b]
            kept = torch.from_numpy(stamps[start:end].copy())
            out.append(UserKV(step.rows[start:end].clone(), kept, cache.profile, cache.layout))
        return out

    @staticmethod
    def _fill(step: _Step, layout: Layout, caches: list[UserKV], tokens: torch.Tensor, bounds: list[int]) -> None:
        """The users' cached K/V and new tokens into the step's buffers, one multi-tensor copy (padding rows keep
        what they held: finite values from earlier steps or zeros, which only pad users read; the stamps came
        with the layout)."""
        dst, src = [step.tokens[: bounds[-1]]], [tokens]
        for cache, start in zip(caches, layout.kv_starts, strict=True):
            dst.append(step.rows[start : start + cache.length])
            src.append(cache.rows)
        torch._foreach_copy_(dst, src)
