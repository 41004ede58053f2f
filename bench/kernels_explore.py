"""Side-by-side timing of HSTU attention kernel variants on one CUDA GPU, each checked for exactness.

Sections (in this order; a time budget stops starting new rows, the rest listed as skipped):
- variants: today's kernel at mtgr-base's tables (d 128, P 512 / NB 32), one config, seq 8192 and
  2048: time / far tables read by warp shuffles or gathered from L1, and ablations (bias or
  activation dropped: WRONG results, marked so, timing only).
- configs: every block shape the autotuner may pick, per head dim (128, 64, 256), seq 8192 and 2048.
- old: the kernel at 4d75a2c (before the exactness work; ./_old_hstu_attention.py, uncommitted, time
  buckets capped at 31 as it requires) vs today's, one config, P 64 / NB 24, seq 8192.
- cached: one user's queries against a cached history, key range split into 1, key_splits' choice, 8 or 32 parts.
- hopper: the Gluon sm90 kernel (kernels/hstu_hopper.py) in each of its configs beside the Triton kernel
  (autotuned), per head dim, seq 8192 / 2048 / 512 (2048 also with seq/4 candidates), and one user's 256
  queries against 4,096 cached keys (CUDA graph replay).
- oneuser: the Gluon kernel where one user's program chain is the call (256 queries against 4,096 cached keys;
  1 user x 1,515 tokens with 256 candidates, the package's latency call): the timestamp check's scan step
  (ts_scan 256 / 1024 / 2048) and the int64 path without the check.
Every variant runs once on fresh random inputs into a NaN-poisoned output and is compared with the
float64 reference (bound 1e-2 for bf16, as bench/gpu_kernels_check.py; ablations are expected to
fail it). Prints a table last.

    python bench/kernels_explore.py [--out-dir DIR] [--budget-s S] [--sections configs] [--head-dims 128,64]
    python bench/kernels_explore.py --dry-run   # CPU: tiny shapes through the Triton interpreter
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before triton/kernels are imported: the interpreter flag is read at import
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.kernels as bench
from bench._common import RESULTS, write_result
from kernels import reference
from kernels.hstu_attention import CONFIGS, PTX_CVT, PTX_GATHER, PTX_SHFL, hstu_attention_cached_triton

BOUND = 1e-2  # bf16 vs float64 (bench/gpu_kernels_check.py BOUNDS)
BASE_CFG = (16, 16, 1, 1) if bench.DRY else (64, 64, 4, 2)  # the variants' config (interpreter: its only one)
# Timed beside the autotuner's (kernels.CONFIGS); a fifth element caps registers per thread.
EXTRA_CONFIGS: dict[int, list[tuple[int, ...]]] = {128: [(64, 64, 4, 3)], 64: [], 256: []}
CACHED_SPLITS = (1, None, 8, 32)  # the cached section's key splits (None: key_splits' choice)
HOPPER_CACHED_SPLITS = (4, 11, 16)  # the hopper section's one-user rows beside key_splits' choice (8 there)
Launcher = Callable[..., torch.Tensor]
# The Gluon kernel's int32-path check at one user (hopper_items): its scan step, or no check (the int64 path)
ONE_USER_SCANS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default", {}),
    ("ts_scan 1024", {"ts_scan": 1024}),
    ("ts_scan 2048", {"ts_scan": 2048}),
    ("int64 gaps, no check", {"allow_ts_fast": False}),
)
# ... and at the latency call, key splits below key_splits' choice (5 at 2 heads of d 256: 48 windows): fewer parts,
# longer chains, no parts to add (finish_parts: ~4 us a layer there, e2e-notes.md session 22)
ONE_USER_SPLITS: tuple[tuple[str, dict[str, Any]], ...] = tuple((f"splits {n}", {"splits": n}) for n in (1, 2, 3))
HIT_SPLITS: tuple[tuple[str, dict[str, Any]], ...] = tuple((f"splits {n}", {"splits": n}) for n in (2, 8))


def old_launcher() -> Launcher | None:
    try:
        # not committed, outside the source digest: git show 4d75a2c:kernels/hstu_attention.py
        import _old_hstu_attention as old
    except ImportError:
        return None

    def launch(q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w, alpha, norm, causal, **kw):  # type: ignore[no-untyped-def]
        assert q_off is kv_off, "the old kernel has no cached-keys entry point"
        return old.hstu_attention_triton(q, k, v, kv_off, ts, nc, pos_w, ts_w[:, :31], alpha, norm, causal, **kw)

    return launch


def case(lengths: list[int], ncands: list[int], queries: list[int] | None, heads: int, d: int,
         tables: tuple[int, int], seed: int) -> tuple:  # fmt: skip
    """Arguments of hstu_attention_cached_triton: queries = each user's last queries[b] tokens."""
    q, k, v, kv_off, ts, nc, pos_w, ts_w, alpha, norm, causal = bench.make_case(
        lengths, ncands, heads, d, torch.bfloat16, seed=seed, tables=tables
    )
    if queries is None:
        return q, k, v, kv_off, kv_off, ts, nc, pos_w, ts_w, alpha, norm, causal
    keep = torch.cat([torch.arange(int(kv_off[b + 1]) - n, int(kv_off[b + 1])) for b, n in enumerate(queries)])
    q_off = torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int64, device=q.device)
    return q[keep.to(q.device)], k, v, q_off, kv_off, ts, nc, pos_w, ts_w, alpha, norm, causal


def check(launch: Launcher, small: tuple[list[int], list[int], list[int] | None], heads: int, d: int,
          tables: tuple[int, int], **kw: Any) -> float:  # fmt: skip
    """rel. error vs float64 on fresh inputs (NaN-poisoned output; inf = NaN left)."""
    args = case(*small, heads, d, tables, seed=random.getrandbits(31))
    out = torch.full((args[0].shape[0], heads, d), float("nan"), dtype=torch.bfloat16, device=bench.DEVICE)
    out = launch(*args, out=out, **kw)
    upcast: list[Any] = [x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in args]
    ref = reference.hstu_attention_cached(*upcast)
    return bench.rel_err(out, ref)


def row(section: str, variant: str, launch: Launcher, big: tuple, small: tuple, heads: int, d: int,
        tables: tuple[int, int], peak: float, graphed: bool = False, **kw: Any) -> dict[str, Any]:  # fmt: skip
    lengths, ncands, queries = big
    args = case(lengths, ncands, queries, heads, d, tables, seed=1)
    flops = 4 * d * heads * bench.unmasked_pairs(lengths, ncands, True, queries=queries)
    err = check(launch, small, heads, d, tables, **kw)
    call = functools.partial(launch, *args, **kw)
    if graphed and not bench.DRY:
        call()  # autotunes and compiles outside the capture
        ms = bench.graph_ms(call)
    else:
        ms = bench.median_ms(call)
    return {"section": section, "variant": variant, "seq": lengths[0], "users": len(lengths),
            "queries": queries[0] if queries else None, "heads": heads, "d": d, "P": tables[0], "NB": tables[1],
            "ms": ms, "tflops": flops / ms * 1e-9, "pct_of_peak": 100 * flops / ms * 1e-9 / peak,
            "rel_err_f64": err, "ok": err <= BOUND, "options": {k: str(v) for k, v in kw.items()},
            "timing": "cuda graph replay" if graphed and not bench.DRY else "eager calls"}  # fmt: skip


def config_name(cfg: tuple[int, ...]) -> str:
    return f"bm{cfg[0]} bn{cfg[1]} w{cfg[2]} s{cfg[3]}" + (f" r{cfg[4]}" if len(cfg) > 4 else "")


def hopper_name(cfg: tuple[int, ...]) -> str:
    """(BLOCK_M, BLOCK_N, warps, K stages, V stages, Q in registers[, registers]) of kernels.hstu_hopper."""
    cap = f" r{cfg[6]}" if len(cfg) > 6 else ""
    return f"bm{cfg[0]} bn{cfg[1]} w{cfg[2]} k{cfg[3]} v{cfg[4]} q-{'reg' if cfg[5] else 'smem'}{cap}"


def plan(peak: float, head_dims: tuple[int, ...]) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    new, old = hstu_attention_cached_triton, old_launcher()
    tokens = bench.TOTAL_TOKENS
    full = lambda seq, cands=0: ([seq] * (tokens // seq), [cands] * (tokens // seq), None)  # noqa: E731
    small_full = ([70, 30, 120], [10, 0, 30], None) if bench.DRY else ([700, 300, 1200], [100, 0, 300], None)
    long_seqs = bench.SEQS[-1:] + bench.SEQS[-3:-2]  # 8192 and 2048 (interpreter: its last)
    heads = bench.HEADS[-1]
    items: list[tuple[str, Callable[[], dict[str, Any]]]] = []

    def add(section: str, variant: str, launch: Launcher | None, seq: int, d: int, tables: tuple[int, int],
            **kw: Any) -> None:  # fmt: skip
        if launch is not None:
            job = functools.partial(row, section, variant, launch, full(seq), small_full, heads, d, tables, peak, **kw)
            items.append((f"{section} {variant} d{d} seq {seq}", job))

    cvt, shfl = PTX_GATHER | PTX_CVT, PTX_SHFL
    for name, kw, seqs in (
        ("shuffled tables (default)", {"ptx": cvt | shfl}, long_seqs),
        ("gathered tables", {"ptx": cvt}, long_seqs),
        ("ABLATED: no bias (wrong result)", {"ablate": 1}, long_seqs[:1]),
        ("ABLATED: no SiLU (wrong result)", {"ablate": 4}, long_seqs[:1]),
    ):
        for seq in seqs:
            add("variants", name, new, seq, 128, bench.TABLES[128], config=BASE_CFG, **kw)
    for d in head_dims:
        for cfg in [*CONFIGS[d], *EXTRA_CONFIGS[d]] if not bench.DRY else [BASE_CFG]:
            for seq in long_seqs:
                add("configs", config_name(cfg), new, seq, d, bench.TABLES[d], config=cfg)
    add("old", "kernel at 4d75a2c", old, long_seqs[0], 128, (64, 24), config=BASE_CFG)
    add("old", "today's kernel", new, long_seqs[0], 128, (64, 24), config=BASE_CFG)
    for d in head_dims:  # one user's queries against its cached keys: how many parts to split the keys into
        for cached, n in bench.CACHED:
            big = small = ([cached + n], [n], [n])
            for splits in CACHED_SPLITS:
                name = f"splits {'auto' if splits is None else splits}"
                job = functools.partial(
                    row,
                    "cached",
                    name,
                    new,
                    big,
                    small,
                    bench.HEADS_AT[d][-1],
                    d,
                    bench.TABLES[d],
                    peak,
                    graphed=True,
                    splits=splits,
                )
                items.append((f"cached {name} d{d} {cached}+{n}", job))
    if not bench.DRY:  # Gluon has no interpreter
        items += hopper_items(peak, head_dims, small_full)
    return items


def hopper_items(peak: float, head_dims: tuple[int, ...], small_full: tuple) -> list[tuple[str, Any]]:
    from kernels.hstu_hopper import HOPPER_CONFIGS, hstu_attention_hopper

    tokens = bench.TOTAL_TOKENS
    items: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for d in head_dims:
        shapes = [(seq, 0) for seq in (8192, 2048, 512)] + [(2048, 512)]
        for seq, cands in shapes:
            big = ([seq] * (tokens // seq), [cands] * (tokens // seq), None)
            heads_d = bench.HEADS_AT[d][-1]
            triton_row: tuple[str, Launcher, dict[str, Any]] = ("triton autotuned", hstu_attention_cached_triton, {})
            variants = [triton_row]
            variants += [(f"hopper {hopper_name(c)}", hstu_attention_hopper, {"config": c}) for c in HOPPER_CONFIGS[d]]
            for name, launch, kw in variants:
                job = functools.partial(row, "hopper", name, launch, big, small_full, heads_d, d, bench.TABLES[d],
                                        peak, **kw)  # fmt: skip
                items.append((f"hopper {name} d{d} seq {seq} cands {cands}", job))
        one = ([4096 + 256], [256], [256])
        launchers: tuple[tuple[str, Launcher], ...] = (
            ("triton cached", hstu_attention_cached_triton),
            ("hopper cached", hstu_attention_hopper),
        )
        for name, launch in launchers:
            job = functools.partial(row, "hopper", name, launch, one, one, bench.HEADS_AT[d][-1], d, bench.TABLES[d],
                                    peak, graphed=True)  # fmt: skip
            items.append((f"hopper {name} d{d} 4096+256", job))
        # the Gluon kernel's key split for one user (key_splits caps it at MAX_SPLITS = 8, measured on the Triton
        # kernel in session 15): 8 x (4 query tiles x 3 heads) = 96 programs at mtgr-base leave 36 of 132 SMs idle
        for splits in HOPPER_CACHED_SPLITS:
            variant = f"hopper cached, splits {splits}"
            job = functools.partial(row, "hopper", variant, hstu_attention_hopper, one, one, bench.HEADS_AT[d][-1], d,
                                    bench.TABLES[d], peak, graphed=True, splits=splits)  # fmt: skip
            items.append((f"hopper hopper cached splits {splits} d{d} 4096+256", job))
        # Section "oneuser" (--sections oneuser runs these alone): one user's call is one program chain long, so
        # its int32-path check (a program's dependent loads over its key range, TS_SCAN timestamps a step) is not
        # hidden by other programs as at 64k tokens (session 17: noise there). At the cached shape and at the
        # package's latency call (1 user x 1,515, 256 candidates: mtgr-small's 3 calls were ~0.10 of its 0.275 ms
        # of device time, session 22), beside the int64 path (no check).
        latency = ([1515], [256], None)
        hit = ([1000 + 256], [256], [256])  # a served hit at history 1,000 (the session's): its split rule too
        for shape_name, shape, heads in (("4096+256", one, bench.HEADS_AT[d][-1]),
                                         ("1000+256", hit, bench.HEADS_AT[d][-1]),
                                         ("1 x 1515", latency, bench.HEADS_AT[d][0])):  # fmt: skip
            # the 4096 shape has its split rows above; key_splits picks 4 parts for the hit (1,256 keys), 5 at 1 x 1,515
            split_rows = {"4096+256": (), "1000+256": HIT_SPLITS}.get(shape_name, ONE_USER_SPLITS)
            for variant, kw in (*ONE_USER_SCANS, *split_rows):
                job = functools.partial(row, "oneuser", f"hopper {variant}", hstu_attention_hopper, shape, shape,
                                        heads, d, bench.TABLES[d], peak, graphed=True, **kw)  # fmt: skip
                items.append((f"oneuser {variant} d{d} {shape_name}", job))
    return items


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nsection  | variant                          |  seq users  q   d  P/NB    |    ms   TF/s  %peak | rel err")
    for r in rows:
        if "ms" not in r:
            print(f"  {r['item']}: {r.get('error') or r.get('skipped')}")
            continue
        print(f"{r['section']:8} | {r['variant']:32} | {r['seq']:5} {r['users']:3} {r['queries'] or '-':>4} {r['d']:3} "
              f"{r['P']}/{r['NB']:<4} | {r['ms']:7.3f} {r['tflops']:6.1f} {r['pct_of_peak']:5.1f}% | "
              f"{r['rel_err_f64']:.1e} {'ok' if r['ok'] else 'FAIL'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("--sections", default="variants,configs,old,cached", help="comma-separated, in plan order")
    parser.add_argument("--head-dims", default=",".join(map(str, bench.TABLES)), help="configs, cached")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--print", type=Path, dest="show", help="only print the table of a result file")
    opts = parser.parse_args()
    if opts.show:
        shown = json.loads(opts.show.read_text())
        print(f"{opts.show.name}: matmul peak {shown['matmul_peak_tflops']:.0f} TFLOP/s")
        print_table(shown["rows"])
        return
    deadline = time.monotonic() + opts.budget_s
    peak = bench.matmul_peak_tflops()
    result: dict[str, Any] = {"matmul_peak_tflops": peak, "bound": BOUND, "rows": []}
    sections = opts.sections.split(",")
    tag = "" if opts.sections == parser.get_default("sections") else "-" + "-".join(sections)
    out = opts.out_dir / f"kernels-explore{tag}-{bench.gpu_tag()}.json"
    for name, make in plan(peak, tuple(int(d) for d in opts.head_dims.split(","))):
        if name.split()[0] not in sections:
            continue
        if time.monotonic() > deadline:
            result["rows"].append({"item": name, "skipped": "time budget spent"})
            continue
        try:
            result["rows"].append(make())
        except Exception as exc:  # an unlaunchable config is a result too
            result["rows"].append({"item": name, "error": repr(exc)[:300]})
        print(result["rows"][-1], flush=True)
        write_result(out, result)
    print(f"matmul peak {peak:.0f} TFLOP/s")
    print_table(result["rows"])
    print(f"wrote {write_result(out, result)}")


if __name__ == "__main__":
    main()
