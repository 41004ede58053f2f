"""``Ranker``: the whole request path of one backend in one process, all requests of a batch in ONE pass.

    check (validate.RequestParser, on the host)
      -> one host->device copy of ids, timestamps, layout (layout.py)
      -> embedding lookups (tables.py) -> token projector -> dense (dense.py) on the device
      -> one device->host copy of the candidates' scores -> ranking and top k (postprocess.rank_requests)

The outputs per request are exactly the ensemble's postprocess outputs (names, dtypes, shapes).
``from_model_dir`` reads a fused model's version folder and its config.pbtxt parameters, so a
benchmark calling it in-process runs what the server runs. Not thread-safe: one Ranker per
instance (Triton runs one execute() at a time per instance).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grc.serving.common import request as rq
from grc.serving.common.history_step import USER_ID, user_ids
from grc.serving.common.validate import RequestError, RequestParser
from grc.serving.ranker import buckets as bk
from grc.serving.ranker import dense as dn
from grc.serving.ranker import history as hist
from grc.serving.ranker import layout as lay
from grc.serving.ranker.phases import PhaseClock
from grc.serving.ranker.tables import open_lookup
from grc.serving.triton.models.postprocess import rank_requests
from grc.spec.schema import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Ranker:
    def __init__(
        self,
        cfg: ModelConfig,
        projector: Any,
        tables: Any,
        dense: dn.Runner,
        dense_dtype: torch.dtype,
        device: torch.device,
        weights: np.ndarray,
        top_k: int,
        truncate: bool,
        stats: dn.GraphStats,
        history: hist.History | None = None,
    ):
        self.cfg, self.projector, self.tables, self.dense = cfg, projector, tables, dense
        self.dense_dtype, self.device, self.weights, self.top_k = dense_dtype, device, weights, top_k
        self.truncate, self.graph_stats, self.history = truncate, stats, history
        self.parse = RequestParser(cfg, truncate)
        self.requests = 0
        self.users = 0
        self.tokens = 0
        self.rank_us = 0  # wall time inside rank(): host work, copies, and waiting for the device
        self.dense_device_us = 0  # device time of the dense step (CUDA events; padding and graph replay included;
        # for users with an id the cached step, its copies of the cached K/V into the graph's buffers included)
        self.clock = PhaseClock()  # host seconds by phase (phases.py): rank() laps layout .. rank

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_model_dir(
        cls, model_dir: Path, device: str, params: dict[str, str], log: Callable[[str], None] = print
    ) -> Ranker:
        """A fused model's version folder (weights/, packages) and its config.pbtxt parameters."""
        from grc.weights import load_model

        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(cuda_missing(f"device {device}"))
        cfg = ModelConfig.model_validate_json(params["grc_model"])
        backend = params["backend"]
        if backend not in dn.BACKENDS:
            raise ValueError(f"backend: the fused model runs {', '.join(dn.BACKENDS)} (got {backend!r})")
        weights_dir = model_dir / "weights"
        model = load_model(cfg, weights_dir)
        projector = model.projector.to(dev)
        dtype = DTYPES[params.get("dtype", "float32")] if dev.type == "cuda" else torch.float32
        if backend == "aotinductor":
            package = model_dir / json.loads(params["packages"])["gpu" if dev.type == "cuda" else "cpu"]
            meta = json.loads((package.parent / "metadata.json").read_text())
            dtype = DTYPES[meta["dtype"]]
            fn = dn.aotinductor(package, dev)
            # packages built before engine.aoti.attention (session 18) compiled the Triton kernel in
            log(f"attention (the package): {meta.get('attention', 'the Triton kernel, compiled in')}")
        if dev.type == "cuda" and (backend != "aotinductor" or hist.configured(params)):
            from kernels.hstu_hopper import describe

            h = cfg.hstu
            log(f"attention (the eager ops, the cached step): {describe(h.head_qk, h.head_v, dtype, dev)}")
        history = None
        if backend != "aotinductor" or hist.configured(params):  # the cache's step needs GRDense on the device
            dense = model.dense.to(device=dev, dtype=dtype)  # aotinductor: in the package's own dtype
            if backend != "aotinductor":
                fn = dn.pytorch(dense) if backend == "pytorch" else dn.pytorch_kernels(dense)
            history = hist.History.from_params(params, cfg, dense, dtype, backend, weights_dir)
        if history is not None:
            budget = history.caches.cache.budget / (1 << 20)
            log(f"history cache: {budget:g} MiB on {dev}; {history.note}")
        stats = dn.GraphStats()
        graphs = dev.type == "cuda" and params.get("cuda_graphs", "true") == "true" and backend in dn.GRAPHED
        if graphs:
            plan = [bk.Bucket(tokens=t, users=u) for u, t in json.loads(params["buckets"])]
            fn = dn.Bucketed(fn, plan, cfg.hstu.max_seq_len, cfg.d_model, dtype, dev, True, stats)
            log(
                f"{backend}: {len(plan)} CUDA graphs captured (buckets users x tokens: "
                f"{', '.join(f'{b.users}x{b.tokens}' for b in sorted(plan))})"
            )
            if history is not None:  # the cached step in graphs too, one per padded shape as it first comes
                top = -(-max(b.tokens for b in plan) // cfg.hstu.max_seq_len)
                store = params.get("history_store", "auto")
                cached_graphs = history.caches.use_store(history.dense, store, stats, top, log, graphs=True)
                assert cached_graphs is not None  # with graphs every store has a graphed step
                warm_up(cached_graphs, torch.empty(0, device=dev, dtype=dtype), log)
        elif history is not None:  # eager: an arena if the spec asks for one, else GRDense.score on entries' tensors
            store = params.get("history_store", "auto")
            history.caches.use_store(history.dense, store, stats, EAGER_STEP_USERS, log, graphs=False)
        tables = open_lookup(
            cfg,
            weights_dir,
            dev,
            params.get("tables", "auto"),
            int(params.get("tables_device_budget_mb", "16384")),
            log,
        )
        if dev.type == "cuda":
            warm_lookups(tables, cfg, projector.history.weight.dtype, dev, log)
        rank_w = np.asarray(json.loads(params["rank_weights"]), dtype=np.float32)
        return cls(
            cfg,
            projector,
            tables,
            fn,
            dtype,
            dev,
            rank_w,
            int(params["top_k"]),
            params.get("truncate_history", "true") == "true",
            stats,
            history,
        )

    # ------------------------------------------------------------------ serving

    def check(self, raw: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """One request checked (raises validate.RequestError naming the problem). With the history
        cache, its optional ``user_id`` is kept in the checked request as ids [b]."""
        users = self._user_id(raw)
        return self._keyed(self.parse(raw), users)

    def check_all(self, raws: Sequence[Mapping[str, np.ndarray | None]]) -> list[dict[str, np.ndarray] | RequestError]:
        """``check`` for every request of an execute at once (validate.RequestParser.check_all): per request
        what ``check`` returns, or the RequestError it raises."""
        results: dict[int, dict[str, np.ndarray] | RequestError] = {}
        users: dict[int, np.ndarray | None] = {}  # the user_id input of the requests the parser sees
        for i, raw in enumerate(raws):
            try:
                users[i] = self._user_id(raw)
            except RequestError as exc:
                results[i] = exc
        for (i, ids), checked in zip(users.items(), self.parse.check_all([raws[i] for i in users]), strict=True):
            try:
                results[i] = checked if isinstance(checked, RequestError) else self._keyed(checked, ids)
            except RequestError as exc:
                results[i] = exc
        return [results[i] for i in range(len(raws))]

    def _user_id(self, raw: Mapping[str, np.ndarray | None]) -> np.ndarray | None:
        """The request's optional ``user_id`` input (the parser reads the model's inputs alone: it stays in)."""
        users = raw.get(USER_ID)
        if users is not None and self.history is None:
            raise RequestError(f"{USER_ID}: this model keeps no history cache (bundles.triton.history_cache)")
        return users

    @staticmethod
    def _keyed(checked: dict[str, np.ndarray], users: np.ndarray | None) -> dict[str, np.ndarray]:
        ids = user_ids(users, checked[rq.REQUEST_TIME].shape[0])
        return checked if ids is None else {**checked, USER_ID: ids}

    def rank(self, checked: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Checked requests -> per request the ensemble's outputs: those without user ids in one pipeline
        pass, those with ids in one cached score step (history.py)."""
        self.clock.start()
        keyed = [i for i, r in enumerate(checked) if USER_ID in r]
        if not keyed:
            return self._rank_whole(checked)
        outs: list[dict[str, np.ndarray]] = [{}] * len(checked)
        plain = [i for i in range(len(checked)) if USER_ID not in checked[i]]
        for group, run in ((plain, self._rank_whole), (keyed, self._rank_cached)):
            if group:
                for i, out in zip(group, run([checked[i] for i in group]), strict=True):
                    outs[i] = out
        return outs

    def _rank_cached(self, checked: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Users with ids: each looked up in the store, only its part the cache does not hold looked up
        and projected (one layout, one copy, as for the whole path), then one cached score step."""
        assert self.history is not None
        started = time.perf_counter()
        cfg, caches = self.cfg, self.history.caches
        visits = [caches.visit(r, u, user) for r in checked for u, user in enumerate(r[USER_ID].tolist())]
        # the parts the cache does not hold, laid out at once: a hit's new events and candidates, a miss's whole
        # request (its profile tokens too; a hit's are rows of its entry)
        skips = np.array([v.reused for v in visits], np.int64)
        new_events = np.concatenate([v.events[v.reused :] for v in visits])  # the visits' own copies, as columns
        layout = lay.build(checked, cfg, skips, np.array([v.held is None for v in visits]), new_events)
        start, n = layout.fields["offsets"]
        bounds = layout.packed[start : start + n].tolist()
        start, n = layout.fields["timestamps"]
        host_stamps = layout.packed[start : start + n]
        start, n = layout.fields["num_candidates"]
        candidates = layout.packed[start : start + n].tolist()
        # with the arena, the step placed and planned now, from host values only (before the lookups' and the
        # projector's work: on a CPU instance the host work right after a compute runs with cold caches)
        prepared = caches.prepare(visits, bounds, candidates, host_stamps)
        events = self._events()
        self.clock.lap("layout")
        with torch.no_grad():
            try:
                feeds = lay.on_device(layout, self.device, cfg.cross_features)
                self.clock.lap("upload")
                # projected straight into the arena step's token buffer where it keeps the projector's dtype; where
                # it keeps the dense dtype (a GPU's bfloat16), cast into it: one launch, where a cast and the step's
                # copy of the cast tokens were two
                into = caches.token_buffer(prepared, self.projector.history.weight.dtype)
                tokens = self._tokens(feeds, layout.tokens, into)
                cast_into = None if into is not None else caches.token_buffer(prepared, self.dense_dtype)
                tokens = tokens.to(self.dense_dtype) if cast_into is None else cast_into.copy_(tokens)
            except BaseException:
                caches.abandon(visits, prepared)
                raise
            self.clock.lap("embed")
            if events:
                events[0].record()
            scores = caches.score(
                self.history.dense, visits, tokens, feeds["timestamps"], bounds, candidates, host_stamps, prepared,
                trimmed=True,
            )  # fmt: skip
            if events:
                events[1].record()
            self.clock.lap("dense")
            picked = host_float32(scores)
            self.clock.lap("fetch")
        self._count_device(events)
        return self._outputs(checked, layout, picked, started)

    def _rank_whole(self, checked: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        started = time.perf_counter()
        # with CUDA graphs the batch's bucket is chosen as it is laid out, and its dense inputs padded on the host
        graphed = self.dense if isinstance(self.dense, dn.Bucketed) else None
        layout = lay.build(checked, self.cfg, bucket=graphed.choose if graphed is not None else None)
        events = self._events()
        self.clock.lap("layout")
        with torch.no_grad():
            feeds = lay.on_device(layout, self.device, self.cfg.cross_features)
            self.clock.lap("upload")
            bucket = layout.bucket  # chosen only with graphs (graphed.choose)
            rows = graphed.rows[: layout.tokens] if graphed is not None and bucket is not None else None
            # projected straight into the graphs' token rows where they keep the projector's dtype (float32)
            into = rows if rows is not None and rows.dtype == self.projector.history.weight.dtype else None
            tokens = self._tokens(feeds, layout.tokens, into)
            if bucket is None:
                tokens = tokens.to(self.dense_dtype)
            self.clock.lap("embed")
            if events:
                events[0].record()
            if graphed is not None and bucket is not None:  # the tokens cast as they are copied into place
                scores = graphed.run_padded(bucket, feeds["padded"], tokens)
            else:
                scores = self.dense(tokens, feeds["offsets"], feeds["num_candidates"], feeds["timestamps"])
            if events:
                events[1].record()
            self.clock.lap("dense")
            picked = host_float32(scores.index_select(0, feeds["candidate_dst"]))  # waits for the device
            self.clock.lap("fetch")
        self._count_device(events)
        return self._outputs(checked, layout, picked, started)

    def _events(self) -> list[torch.cuda.Event]:
        """Two CUDA events around the dense step (its device time), or none on a CPU."""
        return [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.device.type == "cuda" else []

    def _count_device(self, events: list[torch.cuda.Event]) -> None:
        """The dense step's device time, once the step is done (the scores were fetched)."""
        if events:
            self.dense_device_us += int(events[0].elapsed_time(events[1]) * 1000)

    def _outputs(
        self, checked: list[dict[str, np.ndarray]], layout: lay.Layout, picked: np.ndarray, started: float
    ) -> list[dict[str, np.ndarray]]:
        """The candidates' scores [rows, tasks], request after request and user after user -> each
        request's ranked outputs; the batch counted (``started``: when rank() began)."""
        self.requests += len(checked)
        self.users += layout.users
        self.tokens += layout.tokens
        first = rq.candidate_input(self.cfg.candidate[0])
        outs = rank_requests(picked, [r[first] for r in checked], self.weights, self.top_k)
        self.clock.lap("rank")
        self.rank_us += int((time.perf_counter() - started) * 1e6)
        return outs

    def _tokens(self, feeds: dict[str, torch.Tensor], total: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Lookups and the token projector, scattered into the jagged [T, D] batch (``into``: those rows, else new)."""
        cfg, proj = self.cfg, self.projector
        dtype = proj.history.weight.dtype
        tokens = torch.empty(total, cfg.d_model, dtype=dtype, device=self.device) if into is None else into

        concat = getattr(self.tables, "lookup_concat", None)  # DeviceTables: a kind's lookups in one kernel

        def rows(kind: str, names: list[str], extra: torch.Tensor | None = None) -> torch.Tensor:
            """The kind's tables' rows side by side (then ``extra``: the cross features) in the projector's dtype: one
            launch where the tables allow (DeviceTables.lookup_concat); else each table as stored, concatenated, then
            ONE cast (torch.cat promotes mixed dtypes). Both give the same bits: a cast to float32 is exact. Each
            table's own lookup and cast were a launch each on a GPU, and the concatenation another."""
            ids = [feeds[f"{kind}:{t}"] for t in names]
            joined = None if concat is None else concat(names, ids, extra, dtype)
            if joined is not None:
                return joined
            parts = [self.tables.lookup(t, i, None) for t, i in zip(names, ids, strict=True)]
            parts += [] if extra is None else [extra]
            return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)).to(dtype)

        # every kind's projection written into one buffer, back to back in the layout's embed_dst order, then ONE
        # index_copy_ puts each row in place (a scatter per kind was a launch each on a GPU). addmm into a slice is
        # what nn.Linear runs on 2-D input (bias + x @ W.T): the same bits.
        staged = torch.empty(total, cfg.d_model, dtype=dtype, device=self.device)
        at = 0
        for kind, names, extra in token_kinds(cfg):  # warm_lookups compiles the same calls at load
            joined = rows(kind, names, feeds["cross"] if extra else None)
            linear = proj.profile[names[0]] if kind == "profile" else getattr(proj, kind)
            torch.addmm(linear.bias, joined, linear.weight.t(), out=staged[at : at + joined.shape[0]])
            at += joined.shape[0]
        return tokens.index_copy_(0, feeds["embed_dst"], staged)

    def stats(self) -> dict[str, float]:
        s = self.graph_stats
        return {
            "graph_hits": s.graph_hits,
            "graph_misses": s.graph_misses,
            "padded_tokens": s.padded_tokens,
            "graph_captures": s.captures,
            **{f"graph_{name}": getattr(s, name) for name in dn.CAPTURE_FIGURES},
            "requests": self.requests,
            "users": self.users,
            "tokens": self.tokens,
            "rank_us": self.rank_us,
            "dense_device_us": self.dense_device_us,
        }


EAGER_STEP_USERS = 8  # an eager instance's arena keeps this many users' rows of headroom for one step


def warm_up(graphs: Any, like: torch.Tensor, log: Callable[[str], None]) -> None:
    """``ScoreGraphs.warm_up`` at load, said: no served request waits for an autotuning or the first compile."""
    started = time.perf_counter()
    tuned = graphs.warm_up(like)
    log(
        f"history cache: the cached attention kernel autotuned for {len(tuned)} keys and one small step run "
        f"(fused GEMMs, heads kernel compiled) in {time.perf_counter() - started:.1f} s"
    )


def host_float32(scores: torch.Tensor) -> np.ndarray:
    """Scores on the host as float32: fetched in their own dtype, then widened on the host (exact), where widening on
    the GPU first was one more launch per batch."""
    return scores.cpu().float().numpy()


def token_kinds(cfg: ModelConfig) -> list[tuple[str, list[str], int]]:
    """The lookups ``Ranker._tokens`` makes per batch: (kind, its tables at once, extra columns): each profile table
    alone (a projector each), the history tables together, the candidate tables with the cross features."""
    return [
        *(("profile", [t], 0) for t in cfg.profile),
        ("history", list(cfg.history), 0),
        ("candidate", list(cfg.candidate), cfg.cross_features),
    ]


def warm_lookups(
    tables: Any, cfg: ModelConfig, dtype: torch.dtype, dev: torch.device, log: Callable[[str], None]
) -> None:
    """Each kind's one-kernel lookup (DeviceTables.lookup_concat) run once at load, so its Triton compile happens here
    and not on a served request's path (nothing in it is specialised per request: kernels/gather.py); said."""
    concat = getattr(tables, "lookup_concat", None)
    if concat is None:
        return
    started, fused = time.perf_counter(), []
    for kind, names, extra in token_kinds(cfg):
        ids = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in names]
        cross = torch.zeros(1, extra, device=dev) if extra else None
        if concat(names, ids, cross, dtype) is not None:
            fused.append(kind)
    torch.cuda.synchronize(dev)
    kinds = sorted(set(fused))
    log(f"embedding lookups: one gather kernel per kind ({', '.join(kinds) or 'none: quantized or too many tables'}; "
        f"the rest a lookup per table), compiled at load in {time.perf_counter() - started:.1f} s")  # fmt: skip


def cuda_missing(what: str) -> str:
    """Why a GPU model cannot run in this interpreter (no silent CPU fallback)."""
    import sys

    return (
        f"{what} needs a CUDA GPU (torch.cuda.is_available() is False): torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}) in {sys.executable}; run it on a "
        f"host with an NVIDIA GPU and a CUDA build of torch, or set bundles.triton.instance_kind: KIND_CPU"
    )
