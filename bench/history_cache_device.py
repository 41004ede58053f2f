"""The user-history cache in-process on a CUDA GPU, through grc's Triton kernels: one user's full
forward vs the cached score step, for each spec and dtype, eager and as CUDA graphs, with exactness.

Per spec (default mtgr-small, mtgr-base) and dtype (default bfloat16, then float32), 1 user x history
{max_seq_len - 256 - profile tokens, 1000} x candidates {256, 512} (a shape past max_seq_len is
recorded as skipped). The issue's target shape (max_seq_len - 256 history x 256 candidates) runs first:
it is also the cheapest to reach, its calls all share one autotuning key of the attention kernel
(SEQ_BUCKET = max_seq_len, key splits), where the 1000-event history tunes two (its prefill's keys
fall in the next smaller bucket). Dense model only, the spec's deterministic init rounded to bfloat16
(so one float64 oracle serves every dtype), random tokens also bf16-representable; impl "triton" (grc's
kernels: hstu_attention for the full forward, hstu_attention_cached for the cached step). Figures per
shape (median of --repeat runs after warm-up, synchronized host clock):

- full_forward_ms: ``GRDense.forward_jagged`` (the model's forward), eager;
- cached_score_ms: ``GRDense.score`` against a cache prefilled with the profile and the history
  (delta 0: only the candidates are new), eager; ``delta10_score_ms``: 10 history events new;
- prefill_ms: the prefill a miss adds (eager);
- graph_uncached_ms / graph_cached_ms: the score step (``run_plan``) captured in a CUDA graph, on an
  empty cache (the whole sequence: what a miss computes) and on the prefilled one. The launch
  overhead of eager PyTorch is the same for both paths, so the graph figures show the device work;
- ``*_first_call_s``: the first call of each path (Triton compiles and autotunes there), and per
  phase its seconds, the kernels Triton compiled and the autotuning keys it tuned
  (bench/history_cache_timeline.py).

Exactness (fresh random inputs each run, from the run's ``seed``): the relative error ||x - ref|| /
||ref|| of the full forward, the cached step and the +10-events step against the float64 model (the
same weights and tokens, PyTorch reference ops on the device: one user's dense [H, L, L] attention,
the cheapest exact path; the kernels take no float64), computed ONCE per spec and shape and reused by
every dtype; the cached step vs the full forward; whether the cached step equals the uncached step bit
for bit, and whether a repeated cached step is bit-identical (determinism). Tolerances: TOLERANCE below.

Time (every phase of a shape prints a timestamped line as it starts, the JSON is rewritten after every
phase): no new shape starts after --budget-s, nor when its estimated cost (bench/history_cache_timeline
.Costs: its new autotuning keys at --tune-key-s each, then as measured) does not fit before
--deadline-s; a shape's phases stop starting after --shape-s (the row says which phase was cut). After
the first shape, on a GPU, the served model's own scorer (``served_check``: a KIND_GPU instance's
CachedScorer on tests/specs/mtgr-tiny.yaml's seeded weights) in float32 and bfloat16; after the first
dtype's shapes, the session workload (bench/history_cache_session.py), each when its time fits.

    python bench/history_cache_device.py --out $OUT/history-cache-h200.json [--specs mtgr-small,mtgr-base]
    TRITON_INTERPRET=1 python bench/history_cache_device.py --dry-run --out /tmp/x.json   # CPU: tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # grc and kernels from a checkout

from bench._common import write_result
from bench.history_cache import dense_model, synced, timed
from bench.history_cache_timeline import Clock, Costs, Cut, ShapeRun
from grc.model.gr import GRDense
from grc.model.kv_cache import UserKV
from grc.serving.common.arena_graphs import ArenaGraphs, ArenaUser
from grc.serving.common.kv_arena import KVArena, Lease
from grc.serving.common.score_graphs import ScoreGraphs
from grc.serving.ranker.dense import GraphStats
from grc.spec.loader import load_spec
from grc.spec.schema import ModelConfig

TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-4}  # rel. error vs float64; bf16: 8 mantissa bits, tanh.approx SiLU
NOW = 1_750_000_000
DRY_SHAPES = ((40, 16), (24, 8))
DELTA = 10  # new history events of the delta step (the session workload: +10 per request)
SERVED_CHECK_S = 35.0  # the served check's cost on the H200 (session 6: 34 s from the process start)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double().to(x.device)
    return float((x - ref).norm() / ref.norm())


def graphed(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``step`` captured in a CUDA graph (after warm-up on a side stream); the returned function
    replays it and returns the graph's output buffer."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def held_user(arena: KVArena, cache: UserKV, rows: int, holder: object) -> ArenaUser:
    """``cache``'s rows copied once into an extent of ``rows`` rows of ``arena`` (room for a visit's new rows), the
    entry held by ``holder`` (standing for the store's): a served hit, as a step meets it."""
    lease = arena.allocate(rows)
    arena.copy_in(lease, cache, None, NOW)
    lease.owner = holder
    return ArenaUser(arena.entry(lease, cache.length, cache.timestamps, cache.profile), lease, True, NOW)


def hand_back(holder: object) -> Callable[[int, UserKV, Lease], None]:
    """A step's ``keep`` in a steady state: every grown entry's lease back to ``holder`` (the entry itself dropped, so
    the next call grows the same cached rows in place again)."""

    def keep(_: int, __: UserKV, held: Lease) -> None:
        held.owner = holder

    return keep


class User:
    """One random user: tokens [n, D] (profile, history, candidates) and timestamps, on the device.
    Drawn from ``seed`` on the host and rounded to bfloat16, so every dtype scores the same values."""

    def __init__(self, cfg: ModelConfig, history: int, candidates: int, seed: int, device: torch.device,
                 dtype: torch.dtype):  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        self.profile = len(cfg.profile)
        self.n = self.profile + history + candidates
        self.candidates = candidates
        self.tokens = torch.randn(self.n, cfg.d_model, generator=gen).to(torch.bfloat16).to(device, dtype)
        gaps = (2.0 ** (torch.rand(history, generator=gen) * 21)).to(torch.int64).sort(descending=True).values
        stamps = torch.cat([torch.full((self.profile,), NOW), NOW - gaps, torch.full((candidates,), NOW)])
        self.stamps, self.host_stamps = stamps.to(device), stamps.numpy()
        self.nc = torch.tensor([candidates], device=device)
        self.nc_host = torch.tensor([candidates])  # the cached step gets host counts, as the served model passes them

    def offsets(self, rows: int) -> torch.Tensor:
        return torch.tensor([0, rows], device=self.tokens.device)

    def full(self, model: GRDense, impl: str) -> torch.Tensor:
        return model.forward_jagged(self.tokens, self.offsets(self.n), self.nc, self.stamps, impl)[-self.candidates :]

    def reference(self, oracle: GRDense) -> torch.Tensor:
        """The candidates' scores of the float64 model (PyTorch reference ops), on the host."""
        tokens = self.tokens.double()
        return oracle.forward_jagged(tokens, self.offsets(self.n), self.nc, self.stamps, "pytorch")[
            -self.candidates :
        ].cpu()

    def prefill(self, model: GRDense, cached: int, impl: str) -> UserKV:
        return model.prefill(self.tokens[:cached], self.stamps[:cached], self.profile, NOW, impl)

    def score(
        self, model: GRDense | ScoreGraphs, cache: UserKV, impl: str, reuse_checked: bool = False
    ) -> torch.Tensor:
        cached = cache.length
        new = self.tokens[cached:]
        offsets = torch.tensor([0, new.shape[0]])
        stamps = self.stamps[cached:]
        args = ([cache], new, offsets, self.nc_host, stamps, [NOW], impl)
        if isinstance(model, ScoreGraphs):  # as the served callers, with the host's stamps (no read back)
            return model.score(*args, reuse_checked=reuse_checked, host_timestamps=self.host_stamps[cached:])[0]
        return model.score(*args, reuse_checked=reuse_checked)[0]

    def in_arena(self, graphs: ArenaGraphs, cache: UserKV) -> Callable[[], torch.Tensor]:
        """The served hit over the device arena (grc/serving/common/arena_graphs.py), in a steady state: ``cache``'s
        rows copied once into an extent of ``graphs.arena`` with room for the new rows; every call grows that entry
        in place (the rows after it rewritten with the same values) and hands the lease back to its holder."""
        cached, holder = cache.length, object()  # holder: stands for the store's entry
        user = held_user(graphs.arena, cache, self.n, holder)
        new, bounds, stamps = self.tokens[cached:], [0, self.n - cached], self.host_stamps[cached:]
        return lambda: graphs.score([user], new, bounds, [self.candidates], stamps, hand_back(holder))

    def planned(self, model: GRDense, cache: UserKV, impl: str) -> Callable[[], torch.Tensor]:
        """The score step's device half (run_plan) for this user on ``cache``, its plan built once."""
        cached = cache.length
        plan = model.plan_score([cache], self.offsets(self.n - cached), self.nc, self.stamps[cached:], [NOW])
        tokens = self.tokens[cached:]
        return lambda: model.run_plan(plan, [cache], tokens, impl)[0]


def attention_keys(cfg: ModelConfig, history: int, candidates: int, device: torch.device) -> set[tuple[bool, int]]:
    """(PARTIAL, SEQ_BUCKET) of every attention call a case makes, as the kernel's launcher computes
    them (key_splits, seq_bucket): with the spec and dtype, the autotuning keys the case tunes."""
    from kernels.hstu_attention import key_splits, seq_bucket

    n = len(cfg.profile) + history + candidates
    cached = n - candidates
    calls = [(cached, cached), (n, n), (candidates, n), (cached - DELTA, cached - DELTA), (candidates + DELTA, n)]
    heads = cfg.hstu.num_heads
    one = torch.empty(1, device=device)  # key_splits reads q's shape (rows, heads, head dim) and device, no data
    dim = cfg.hstu.head_qk
    return {(key_splits(one.expand(q, heads, dim), k) > 1, seq_bucket(k, 1)) for q, k in calls}


def case(model: GRDense, user: User, reference: Callable[[], torch.Tensor], run: ShapeRun,
         args: argparse.Namespace, dtype: str) -> None:  # fmt: skip
    """The phases of one shape, most wanted first, each into ``run.row`` as it ends."""
    device = next(model.parameters()).device
    impl, repeat, row, c = "triton", args.repeat, run.row, user.candidates
    cached_rows = user.n - c
    with torch.no_grad():
        with run.phase("prefill_first", "the prefill's first call: Triton compiles and autotunes here"):
            row["prefill_first_call_s"], cache = synced(lambda: user.prefill(model, cached_rows, impl), device)
            row["cache_mb"] = cache.nbytes / (1 << 20)
        with run.phase("full", "full forward: first call, then timed"):
            row["full_first_call_s"], _ = synced(lambda: user.full(model, impl), device)
            full_s, full = timed(lambda: user.full(model, impl), repeat, device)
            row["full_forward_ms"] = full_s * 1e3
        with run.phase("cached", "cached score: first call, then timed"):
            row["cached_first_call_s"], _ = synced(lambda: user.score(model, cache, impl), device)
            score_s, cached = timed(lambda: user.score(model, cache, impl), repeat, device)
            row.update(cached_score_ms=score_s * 1e3, speedup=full_s / score_s)
        with run.phase("oracle", "float64 model, PyTorch reference ops on the device (once per shape)"):
            ref = reference()
            row.update(
                rel_err_full_vs_fp64=rel_err(full, ref),
                rel_err_cached_vs_fp64=rel_err(cached, ref),
                rel_err_cached_vs_full=rel_err(cached, full),
                max_abs_cached_vs_full=float((cached.double() - full.double()).abs().max()),
                ref_nonzero=bool(ref.abs().max() > 0),
            )
        with run.phase("prefill", "prefill timed"):
            prefill_s, _ = timed(lambda: user.prefill(model, cached_rows, impl).keys[0], repeat, device)
            row["prefill_ms"] = prefill_s * 1e3
        with run.phase("planned", "planned steps: cached == uncached bit for bit, repeat"):
            uncached_step = user.planned(model, model.empty_cache(user.profile, user.tokens), impl)
            cached_step = user.planned(model, cache, impl)
            row["planned_first_call_s"], uncached = synced(uncached_step, device)
            again = cached_step()
            row.update(
                bit_identical_cached_vs_uncached_step=bool(torch.equal(cached, uncached)),
                bit_identical_repeat=bool(torch.equal(cached, again)),
            )
        if device.type == "cuda":
            with run.phase("graphs", "CUDA graphs: capture, replay"):
                try:
                    graph_full_s, _ = timed(graphed(uncached_step), repeat, device)
                    graph_cached_s, _ = timed(graphed(cached_step), repeat, device)
                    row.update(
                        graph_uncached_ms=graph_full_s * 1e3,
                        graph_cached_ms=graph_cached_s * 1e3,
                        graph_speedup=graph_full_s / graph_cached_s,
                    )
                except Exception as err:  # recorded, not hidden: the eager figures stand without it
                    row["graph_error"] = f"{type(err).__name__}: {err}"[:500]
            with run.phase(
                "score_graphs", "the served step in CUDA graphs (ScoreGraphs): hit, miss, host work included"
            ):
                try:
                    graphs = ScoreGraphs(model, impl, GraphStats(), max_users=1)
                    empty = model.empty_cache(user.profile, user.tokens)
                    for name, kv in (("hit", cache), ("miss", empty)):
                        step = functools.partial(user.score, graphs, kv, impl, reuse_checked=True)
                        row[f"score_graphs_{name}_first_call_s"], got = synced(step, device)
                        took, got = timed(step, repeat, device)
                        row[f"score_graphs_{name}_ms"] = took * 1e3
                        row[f"rel_err_graphs_{name}_vs_fp64"] = rel_err(got, ref)
                    row["score_graphs_speedup"] = row["score_graphs_miss_ms"] / row["score_graphs_hit_ms"]
                    if "graph_uncached_ms" in row:
                        hit_ms = row["score_graphs_hit_ms"]
                        row["score_graphs_hit_vs_graph_uncached"] = row["graph_uncached_ms"] / hit_ms
                except Exception as err:  # recorded, not hidden, as the graphs phase does
                    row["score_graphs_error"] = f"{type(err).__name__}: {err}"[:500]
        else:
            row["graph_skipped"] = "no CUDA device (CUDA graphs need one)"
        with run.phase("delta10", f"{DELTA} new history events: prefill short by {DELTA}, score"):
            delta_cache = user.prefill(model, cached_rows - DELTA, impl)
            row["delta10_first_call_s"], _ = synced(lambda: user.score(model, delta_cache, impl), device)
            delta_s, delta_scores = timed(lambda: user.score(model, delta_cache, impl), repeat, device)
            row.update(
                delta10_score_ms=delta_s * 1e3,
                delta10_speedup=full_s / delta_s,
                rel_err_delta10_vs_fp64=rel_err(delta_scores, ref),
            )


def verdict(row: dict[str, Any], dtype: str) -> None:
    """``ok``: every error against float64 that was measured within tolerance, the reference not zero,
    and the repeat bit-identical where it ran; ``checked`` names what that covers (a cut row covers
    less, and says so in ``cut``)."""
    measured = ("full", "cached", "delta10", "graphs_hit", "graphs_miss")
    errors = [k for k in (f"rel_err_{m}_vs_fp64" for m in measured) if k in row]
    row["tolerance"] = TOLERANCE[dtype]
    row["checked"] = errors + [k for k in ("bit_identical_repeat",) if k in row]
    row["ok"] = bool(
        errors
        and all(row[k] < TOLERANCE[dtype] for k in errors)
        and row.get("ref_nonzero", False)
        and row.get("bit_identical_repeat", True)
        and "error" not in row
    )


def served_check(cfg: ModelConfig, weights: Path, dtype: str, seed: int, device: str | None = None) -> dict[str, Any]:
    """The served model's scorer (``CachedScorer`` of grc/serving/triton/models/history_cached.py, as a
    KIND_GPU instance builds it) on the GPU: a user's first visit (a miss, prefilled on the GPU), a
    longer visit (a hit: 10 new events + candidates), the same request without user_id (uncached),
    each vs the float64 PyTorch model; and where the entry lives and how its bytes are counted.
    ``device``: default the GPU (instance_device); "cpu" for a dry run (the kernels under the Triton
    interpreter, in float32: a CPU instance's dtype)."""
    from grc.model.sample import random_batch
    from grc.serving.common import request as rq
    from grc.serving.common.validate import parse
    from grc.serving.triton.check import Reference
    from grc.serving.triton.models.history_cached import CachedScorer, instance_device

    full = rq.user_request(random_batch(cfg, 1, 30, 5, torch.Generator().manual_seed(seed)), 0, cfg)
    history = {rq.history_input(t) for t in cfg.history} | {rq.HISTORY_TIME}
    earlier = {k: a[:, :20] if k in history else a for k, a in full.items()}
    reference = Reference(cfg, weights)
    where = device or instance_device(True, 0)
    scorer = CachedScorer(cfg, weights, 1 << 24, None, where, "digest", dtype, impl="triton")
    user = np.array([3], np.int64)
    out: dict[str, Any] = {"dtype": str(scorer.dtype), "impl": scorer.impl, "tolerance": TOLERANCE[dtype]}
    for name, arrays, ids in (("miss", earlier, user), ("hit", full, user), ("uncached", full, None)):
        got = scorer.score(parse(dict(arrays), cfg, True), ids)
        out[f"rel_err_{name}_vs_fp64"] = rel_err(torch.from_numpy(got), torch.from_numpy(reference.scores(arrays)))
    stats = scorer.cache.stats()
    entry = scorer.cache.lookup((scorer.namespace, 3), lambda _: True)
    out.update(
        hits=stats.hits,
        misses=stats.misses,
        bytes_counted=stats.bytes,
        bytes_held=scorer.cache.stored_bytes(),
        kv_devices=sorted({str(k.device) for k in entry.kv.keys}) if entry else [],
        kv_dtypes=sorted({str(k.dtype) for k in entry.kv.keys}) if entry else [],
    )
    worst = max(out[f"rel_err_{n}_vs_fp64"] for n in ("miss", "hit", "uncached"))
    out["ok"] = bool(
        worst < TOLERANCE[dtype]
        and (stats.hits, stats.misses) == (1, 1)
        and stats.bytes == out["bytes_held"] > 0
        and out["kv_devices"] == [str(scorer.device)]
        and out["kv_dtypes"] == [str(scorer.dtype)]
    )
    return out


def served_checks(repo: Path, device: str | None) -> list[dict[str, Any]]:
    """served_check on tests/specs/mtgr-tiny.yaml's seeded weights, written to a temporary folder."""
    import json
    import tempfile

    from grc.weights import write_init

    spec = load_spec(repo / "tests" / "specs" / "mtgr-tiny.yaml").spec
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp)
        manifest = write_init(spec.model, spec.weights, spec.weights.source, weights)  # type: ignore[arg-type]
        (weights / "manifest.json").write_text(json.dumps(manifest))
        seed = int(torch.randint(0, 1 << 30, ()).item())
        return [served_check(spec.model, weights, dtype, seed, device) for dtype in ("float32", "bfloat16")]


def session_run(repo: Path, args: argparse.Namespace, device: torch.device, dtype: str) -> Any:
    """bench/history_cache_session.py's workload on the served scorer, on the first of --specs
    (dry run: mtgr-tiny, small shapes), --session-users users x 5 visits, each of its three modes
    cut at --session-budget-s seconds."""
    from bench import history_cache_session as hs

    spec = repo / "tests" / "specs" / "mtgr-tiny.yaml" if args.dry_run else spec_path(repo, args.specs.split(",")[0])
    flags = ["--spec", str(spec), "--users", str(args.session_users)]
    if args.dry_run:
        flags += ["--users", "6", "--base", "20", "--delta", "3", "--candidates", "4"]
    workload = hs.parser().parse_args(flags)
    try:
        return {"workload": vars(workload), **hs.session(workload, str(device), dtype, args.session_budget_s)}
    except Exception as err:
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def spec_path(repo: Path, name: str) -> Path:
    """A name under specs/ or a path to a spec file."""
    return Path(name) if name.endswith((".yaml", ".yml")) else repo / "specs" / f"{name}.yaml"


def shapes(cfg: ModelConfig, dry_run: bool) -> list[tuple[int, int]]:
    """The issue's target shape (the longest history beside 256 candidates) first, then the others by
    token count: 1000 x 256, 1000 x 512, longest x 512 (past max_seq_len for mtgr: recorded as skipped)."""
    if dry_run:
        return list(DRY_SHAPES)
    longest = cfg.hstu.max_seq_len - 256 - len(cfg.profile)
    return [(longest, 256), (1000, 256), (1000, 512), (longest, 512)]


def model_in(cfg: ModelConfig, device: torch.device, dtype: str) -> GRDense:
    """The spec's deterministic init rounded to bfloat16, in ``dtype``: every dtype holds the same
    weights, so one float64 oracle serves them all."""
    return dense_model(cfg, device, torch.bfloat16).to(getattr(torch, dtype))


class Bench:
    """One run: the result written after every phase, the clock, the shapes' estimated costs, the
    float64 references computed so far ((spec, history, candidates) -> scores on the host)."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.clock = args, device, Clock()
        self.out = Path(args.out)
        self.costs = Costs(per_key_s=args.tune_key_s, steady_s=args.steady_s)
        self.tuned: set[tuple[Any, ...]] = set()
        self.refs: dict[tuple[str, int, int], torch.Tensor] = {}
        self.seed = int(torch.randint(0, 1 << 30, ()).item())
        self.result: dict[str, Any] = {
            "kernels_on": "the GPU" if device.type == "cuda" else "the CPU, Triton interpreter (dry run: the flow)",
            "impl": "triton",
            "repeat": args.repeat,
            "seed": self.seed,
            "timing": "median of --repeat runs after a warm-up run, torch.cuda.synchronize around each, host clock",
            "weights": "the spec's init rounded to bfloat16 for every dtype (one float64 oracle per shape)",
            "dry_run": args.dry_run,
            "order": "the issue's target shape first, then by tokens; the served check after the first shape",
            "cases": [],
            "skipped": [],
        }

    def save(self) -> None:
        write_result(self.out, self.result)

    def fits(self, what: str, estimate: float) -> bool:
        """Whether ``what`` may start: before --budget-s and, by its estimate, done before --deadline-s;
        else it is skipped, said in the log and in the result."""
        now, args = self.clock.elapsed(), self.args
        why = (
            f"no new work after --budget-s {args.budget_s:.0f} s"
            if now > args.budget_s
            else f"estimated {estimate:.0f} s, {args.deadline_s - now:.0f} s left before --deadline-s"
            if now + estimate > args.deadline_s
            else ""
        )
        if why:
            self.result["skipped"].append(f"{what}: {why} (at +{now:.0f} s)")
            self.clock.say(f"SKIP {what}: {why}")
            self.save()
        return not why

    def served(self, repo: Path) -> None:
        if not self.args.served_check:
            self.result["served_check"] = "skipped: --no-served-check"
            return
        if not self.fits("served check", SERVED_CHECK_S):
            self.result["served_check"] = "skipped: its time did not fit (see skipped)"
            return
        self.clock.say("served check: the served model's scorer (mtgr-tiny), float32 and bfloat16")
        try:  # dry run: on the CPU, float32, the kernels under the interpreter
            self.result["served_check"] = served_checks(repo, None if self.device.type == "cuda" else "cpu")
        except Exception as err:
            self.result["served_check"] = [{"error": f"{type(err).__name__}: {err}"[:500], "ok": False}]
            traceback.print_exc()
        self.save()
        self.clock.say(f"served check: ok {[c.get('ok') for c in self.result['served_check']]}")

    def session(self, repo: Path, dtype: str) -> None:
        args = self.args
        if args.session_users <= 0:
            self.result["session"] = "skipped: --session-users 0"
            return
        if not self.fits("session workload", 3 * args.session_budget_s + args.tune_key_s):
            return
        users = 6 if args.dry_run else args.session_users
        self.clock.say(
            f"session workload: {users} users x 5 visits, {dtype}, 3 modes of at most {args.session_budget_s} s"
        )
        self.result["session"] = session_run(repo, args, self.device, dtype)
        self.save()

    def shape(self, name: str, model: GRDense, dtype: str, history: int, candidates: int) -> None:
        cfg, args = model.cfg, self.args
        label = f"{name} {dtype} {history}x{candidates}"
        row: dict[str, Any] = {"spec": name, "dtype": dtype, "history": history, "candidates": candidates}
        tokens = len(cfg.profile) + history + candidates
        if tokens > cfg.hstu.max_seq_len:
            row["skipped"] = f"{tokens} tokens exceed max_seq_len {cfg.hstu.max_seq_len}"
            self.result["cases"].append(row)
            self.clock.say(f"{label}: {row['skipped']}")
            return
        keys = {(name, dtype, *k) for k in attention_keys(cfg, history, candidates, self.device)}
        new = keys - self.tuned
        if not self.fits(label, self.costs.estimate(name, dtype, len(new))):
            return
        row["target"] = history == cfg.hstu.max_seq_len - 256 - len(cfg.profile) and candidates == 256
        user = User(cfg, history, candidates, self.seed + 1000 * history + candidates, self.device, model_dtype(model))
        self.result["cases"].append(row)
        start = self.clock.elapsed()
        run = ShapeRun(self.clock, label, min(start + args.shape_s, args.deadline_s), row, self.save)
        try:
            case(model, user, lambda: self.reference(name, model, user, history, candidates, row), run, args, dtype)
        except Cut as cut:
            row["cut"] = str(cut)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        verdict(row, dtype)
        row["seconds"] = round(self.clock.elapsed() - start, 3)
        firsts = sum(v for k, v in row.items() if k.endswith("_first_call_s"))
        self.costs.update(name, dtype, row["seconds"], firsts, len(new))
        self.tuned |= keys
        self.save()
        self.clock.say(f"{label}: {summary(row)}")

    def reference(self, name: str, model: GRDense, user: User, history: int, candidates: int,
                  row: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        """The float64 scores of this spec and shape: computed by the first dtype, reused by the others."""
        key = (name, history, candidates)
        row["oracle"] = "reused (computed by an earlier dtype)" if key in self.refs else "computed"
        if key not in self.refs:
            oracle = copy.deepcopy(model).double()  # the same (bf16-valued) weights, in float64
            self.refs[key] = user.reference(oracle)
            del oracle
        return self.refs[key]


def model_dtype(model: GRDense) -> torch.dtype:
    return next(model.parameters()).dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--specs", default="mtgr-small,mtgr-base", help="names under specs/ or spec files (comma-separated)"
    )
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=150.0, help="no new shape starts after this many seconds")
    ap.add_argument("--deadline-s", type=float, default=float("inf"), help="nothing starts that would end past it")
    ap.add_argument("--shape-s", type=float, default=90.0, help="a shape's phases stop starting after this")
    ap.add_argument("--tune-key-s", type=float, default=45.0, help="assumed s per new autotuning key, until measured")
    ap.add_argument("--steady-s", type=float, default=10.0, help="assumed s of a shape once compiled, until measured")
    ap.add_argument("--served-check", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 repeats (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--session-users", type=int, default=200, help="session workload users (0: none)")
    ap.add_argument("--session-budget-s", type=float, default=10.0, help="seconds per session mode, at most")
    ap.add_argument("--out", required=True, help="result file (.json)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("history_cache_device.py: torch sees no CUDA device (use --dry-run on a CPU)")
    if args.dry_run:
        args.repeat = 2
    bench = Bench(args, torch.device("cuda" if cuda else "cpu"))
    bench.clock.say(f"history_cache_device.py: specs {args.specs}, dtypes {args.dtypes}, seed {bench.seed}")
    bench.save()
    repo = Path(__file__).resolve().parents[1]
    dtypes = args.dtypes.split(",")
    for turn, dtype in enumerate(dtypes):
        if turn == 1:  # after the first dtype's shapes: the session workload, then the other dtypes
            bench.session(repo, dtypes[0])
        for name in args.specs.split(","):
            cfg = load_spec(spec_path(repo, name)).spec.model
            bench.clock.say(f"{name} {dtype}: the model (dense part, the spec's init)")
            model = model_in(cfg, bench.device, dtype)
            for history, candidates in shapes(cfg, args.dry_run):
                bench.shape(Path(name).stem, model, dtype, history, candidates)
                if "served_check" not in bench.result:  # once, after the first shape (the target comes first)
                    bench.served(repo)
            del model
            if cuda:
                torch.cuda.empty_cache()
    bench.save()
    bench.clock.say(f"wrote {args.out}")
    for row in bench.result["cases"]:
        print(f"{row['spec']:>10} {row['dtype']:>8} {row['history']:>5}x{row['candidates']:<4} {summary(row)}")


def summary(row: dict[str, Any]) -> str:
    """One line per row, of whatever it holds (a cut row holds the phases before its cut)."""
    if "skipped" in row:
        return str(row["skipped"])
    parts = []
    if "cached_score_ms" in row:
        parts.append(
            f"full {row['full_forward_ms']:.3f} ms, cached {row['cached_score_ms']:.3f} ms ({row['speedup']:.1f}x)"
        )
    if "delta10_speedup" in row:
        parts.append(f"+{DELTA} events {row['delta10_speedup']:.1f}x")
    if "graph_speedup" in row:
        parts.append(
            f"graph {row['graph_uncached_ms']:.3f} -> {row['graph_cached_ms']:.3f} ms ({row['graph_speedup']:.1f}x)"
        )
    elif "graph_error" in row or "graph_skipped" in row:
        parts.append(row.get("graph_error") or row["graph_skipped"])
    if "score_graphs_speedup" in row:
        parts.append(
            f"served graphs: miss {row['score_graphs_miss_ms']:.3f} -> hit {row['score_graphs_hit_ms']:.3f} ms "
            f"({row['score_graphs_speedup']:.1f}x)"
        )
    errors = [f"{k.removeprefix('rel_err_').removesuffix('_vs_fp64')} {row[k]:.1e}" for k in row
              if k.startswith("rel_err_") and k.endswith("_vs_fp64")]  # fmt: skip
    if errors:
        parts.append("rel err vs fp64: " + ", ".join(errors))
    if "bit_identical_repeat" in row:
        parts.append(
            f"bit-identical to the uncached step {row['bit_identical_cached_vs_uncached_step']}, "
            f"repeat {row['bit_identical_repeat']}"
        )
    for extra in ("cut", "error"):
        if extra in row:
            parts.append(f"{extra.upper()}: {row[extra]}")
    parts.append(f"ok {row.get('ok')} ({row.get('seconds', 0):.0f} s)")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
