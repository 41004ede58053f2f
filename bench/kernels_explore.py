"""Side-by-side timing of HSTU attention kernel variants on one CUDA GPU, each checked for exactness.

Sections (most important first; a time budget stops starting new rows, the rest listed as skipped):
- code: the same question at one table size (P 64 / NB 24): today's kernel with either time-bucket
  path vs the one at 4d75a2c, at the old and the new config.
- tables: is the H200 slowdown vs the last measured kernel the code or the bias-table size? The
  kernel at 4d75a2c (before the exactness work; ./_old_hstu_attention.py, uncommitted, time buckets capped
  at 31 as it requires) and today's, one fixed config, at P 64 / NB 24 and P 512 / NB 32.
- cached: one user's queries against a cached history, key range split into parts vs not.
- configs: block shapes / warps / stages at mtgr-base's and mtgr-small's tables.
Every variant runs once on fresh random inputs into a NaN-poisoned output and is compared with the
float64 reference (bound 1e-2 for bf16, as bench/gpu_kernels_check.py). Prints a table last.

    python bench/kernels_explore.py [--out-dir DIR] [--budget-s S]
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.kernels as bench
from bench._common import RESULTS, write_result
from kernels import reference
from kernels.hstu_attention import hstu_attention_cached_triton

BOUND = 1e-2  # bf16 vs float64 (bench/gpu_kernels_check.py BOUNDS)
BASE_CFG = (64, 64, 4, 2)  # what the autotuner picked everywhere in kernels-h200.json
Launcher = Callable[..., torch.Tensor]


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
    ref = reference.hstu_attention_cached(*[x.double() if torch.is_tensor(x) and x.is_floating_point() else x
                                            for x in args])  # fmt: skip
    return bench.rel_err(out, ref)


def row(section: str, variant: str, launch: Launcher, big: tuple, small: tuple, heads: int, d: int,
        tables: tuple[int, int], peak: float, **kw: Any) -> dict[str, Any]:  # fmt: skip
    lengths, ncands, queries = big
    args = case(lengths, ncands, queries, heads, d, tables, seed=1)
    flops = 4 * d * heads * bench.unmasked_pairs(lengths, ncands, True, queries=queries)
    err = check(launch, small, heads, d, tables, **kw)
    ms = bench.median_ms(functools.partial(launch, *args, **kw))
    return {"section": section, "variant": variant, "seq": lengths[0], "users": len(lengths),
            "queries": queries[0] if queries else None, "heads": heads, "d": d, "P": tables[0], "NB": tables[1],
            "ms": ms, "tflops": flops / ms * 1e-9, "pct_of_peak": 100 * flops / ms * 1e-9 / peak,
            "rel_err_f64": err, "ok": err <= BOUND, "options": {k: str(v) for k, v in kw.items()}}  # fmt: skip


def plan(peak: float) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    new, old = hstu_attention_cached_triton, old_launcher()
    full = lambda seq, cands=0: ([seq] * (65536 // seq), [cands] * (65536 // seq), None)  # noqa: E731
    small_full = ([700, 300, 1200], [100, 0, 300], None)
    items: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for seq in (8192, 512):
        for tables in ((64, 24), (512, 32)):
            for name, launch in (("today's kernel", new), ("kernel at 4d75a2c", old)):
                if launch is not None:
                    items.append(
                        (
                            f"tables {name} {tables} seq {seq}",
                            functools.partial(
                                row,
                                "tables",
                                name,
                                launch,
                                full(seq),
                                small_full,
                                8,
                                128,
                                tables,
                                peak,
                                config=BASE_CFG,
                            ),
                        )
                    )
    # the code difference alone (P 64 / NB 24, seq 8192): time bucket by bfind or float exponent, two configs
    for name, launch, kw in (
        ("today, bfind bucket", new, {"ptx": 3}),
        ("today, float-exponent bucket", new, {"ptx": 1}),
        ("kernel at 4d75a2c", old, {}),
        ("today, bfind bucket", new, {"config": (64, 32, 4, 3)}),
        ("kernel at 4d75a2c", old, {"config": (64, 32, 4, 3)}),
    ):
        if launch is not None:
            kw = {"config": BASE_CFG, **kw}
            items.append(
                (
                    f"code {name} {kw}",
                    functools.partial(
                        row,
                        "code",
                        f"{name} bm{kw['config'][0]} bn{kw['config'][1]}",
                        launch,
                        full(8192),
                        small_full,
                        8,
                        128,
                        (64, 24),
                        peak,
                        **kw,
                    ),
                )
            )
    for d in (128, 64):
        tables = bench.TABLES[d]
        for cached, n in ((1000, 256), (4096, 256), (1000, 512), (4096, 512)):
            big = ([cached + n], [n], [n])
            small = ([cached + n], [n], [n])
            for splits in (1, None, 4, 16):
                name = f"splits {'auto' if splits is None else splits}"
                items.append(
                    (
                        f"cached {name} {cached}+{n} d{d}",
                        functools.partial(
                            row, "cached", name, new, big, small, 8, d, tables, peak, config=BASE_CFG, splits=splits
                        ),
                    )
                )
            items.append(
                (
                    f"cached full-seq {cached}+{n} d{d}",
                    functools.partial(
                        row,
                        "cached",
                        "full sequence",
                        new,
                        ([cached + n], [n], None),
                        ([cached + n], [n], None),
                        8,
                        d,
                        tables,
                        peak,
                        config=BASE_CFG,
                    ),
                )
            )
    configs = {
        128: [
            (64, 64, 4, 3),
            (64, 64, 4, 4),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (64, 32, 4, 3),
            (128, 32, 8, 3),
            (64, 128, 4, 2),
            (128, 128, 8, 2),
        ],
        64: [(64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2)],
    }
    for d, cfgs in configs.items():
        for cfg in [BASE_CFG, *cfgs]:
            for seq in (8192, 2048):
                items.append(
                    (
                        f"configs {cfg} d{d} seq {seq}",
                        functools.partial(
                            row,
                            "configs",
                            f"bm{cfg[0]} bn{cfg[1]} w{cfg[2]} s{cfg[3]}",
                            new,
                            full(seq),
                            small_full,
                            8,
                            d,
                            bench.TABLES[d],
                            peak,
                            config=cfg,
                        ),
                    )
                )
    return items


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nsection | variant                    |  seq users  q   d  P/NB    |    ms   TF/s  %peak | rel err")
    for r in rows:
        if "ms" not in r:
            print(f"  {r['item']}: {r.get('error') or r.get('skipped')}")
            continue
        print(f"{r['section']:7} | {r['variant']:26} | {r['seq']:5} {r['users']:3} {r['queries'] or '-':>4} {r['d']:3} "
              f"{r['P']}/{r['NB']:<4} | {r['ms']:7.3f} {r['tflops']:6.1f} {r['pct_of_peak']:5.1f}% | "
              f"{r['rel_err_f64']:.1e} {'ok' if r['ok'] else 'FAIL'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("--sections", default="tables,code,cached,configs", help="comma-separated, in plan order")
    opts = parser.parse_args()
    deadline = time.monotonic() + opts.budget_s
    peak = bench.matmul_peak_tflops()
    result: dict[str, Any] = {"matmul_peak_tflops": peak, "bound": BOUND, "rows": []}
    sections = opts.sections.split(",")
    tag = "" if opts.sections == parser.get_default("sections") else "-" + "-".join(sections)
    out = opts.out_dir / f"kernels-explore{tag}-{bench.gpu_tag()}.json"
    for name, make in plan(peak):
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
