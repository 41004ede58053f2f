"""The history-cache step's fused GEMMs, one tile at a time: which ``kernels.fused_linear`` tile serves a served
hit's few hundred rows best, and how far apart the autotuner's own picks land.

    python bench/gemm_tiles.py --spec mtgr-base --out $OUT/gemm-tiles-h200.json      # a CUDA GPU
    TRITON_INTERPRET=1 python bench/gemm_tiles.py --dry-run --out /tmp/t.json         # CPU: tiny shape, one tile

Why: the step's GEMMs took 0.088, 0.119 and 0.138 ms of device time per step in three runs of the same code on the
H200 (mtgr-base bf16, 1 user, 3837 cached + 266 new rows; bench/results/history-cache-notes.md, sessions 21-22).
The autotuner times its candidates once per key (N, K, prologue, epilogue, scatter: the rows are not in it) with
``do_bench``, L2 flushed between calls, while the step replays them from a CUDA graph with the weights in L2.

Per row, one ArenaGraphs step built afresh (its graph captured with that tile) and profiled like
bench/history_cache_profile.py's ``arena_score``: ``gemm_ms`` the fused GEMMs' device time per step, ``kernel_ms``
all of the step's. Rows: each tile forced (the autotuner given that one config), then ``autotuned`` --autotunes
times over every tile, the pick forgotten in between (memory and Triton's on-disk cache of picks both skipped), each
with the tiles it picked. Not a test: evidence for fixing the step's tiles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # grc and kernels from a checkout

from bench._common import write_result
from bench.history_cache_profile import arena_hit, case_arguments, device_profile, one_user

# (BLOCK_M, BLOCK_N, warps, stages): kernels.fused_linear's four, then smaller tiles for a few hundred rows (more
# programs on the 132 SMs: a 266-row call gets 3 row blocks of 128 or 5 of 64)
TILES = ((128, 128, 4, 4), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4), (64, 64, 4, 3),
         (64, 32, 4, 4), (64, 128, 8, 3))  # fmt: skip
GEMM = "_fused_linear_kernel"


def name(tile: tuple[int, ...]) -> str:
    return "bm{} bn{} w{} s{}".format(*tile)


def main() -> None:
    import triton

    from kernels import fused_linear

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    case_arguments(ap, "mtgr-base")  # --dry-run: a tiny shape, one tile
    ap.add_argument("--autotunes", type=int, default=3)
    args = ap.parse_args()
    case = one_user(args, "gemm_tiles.py")
    kernel: Any = fused_linear._fused_linear_kernel  # the Autotuner
    landed = list(kernel.configs)
    if hasattr(kernel, "cache_results"):
        kernel.cache_results = False  # each autotune row times its tiles afresh (no pick from the on-disk cache)
    result: dict[str, Any] = {
        "spec": args.spec, "dtype": args.dtype, "history": case.history, "candidates": case.candidates,
        "repeat": case.repeat, "landed_tiles": [str(c) for c in landed], "rows": [],
    }  # fmt: skip
    with torch.no_grad():
        cache = case.user.prefill(case.model, case.user.n - case.candidates, "triton")
        reference = None

        def measure(label: str, configs: list[Any]) -> None:
            nonlocal reference
            kernel.configs = configs
            kernel.cache.clear()  # the pick per key forgotten: this row tunes (or takes its one tile) afresh
            run = arena_hit(case, cache)
            scores = run().float()  # compiles, tunes, captures
            reference = scores if reference is None else reference
            prof = device_profile(run, case.repeat, case.cuda)
            gemm = sum(ms for k, ms in prof["device_kernels"].items() if k.startswith(GEMM))
            picks = sorted({str(c) for c in kernel.cache.values()})
            row = {
                "tiles": label, "gemm_ms": round(gemm, 4), "kernel_ms": prof["kernel_ms"], "picks": picks,
                "max_rel_vs_first": float((scores - reference).abs().max() / reference.abs().max()),
            }  # fmt: skip
            result["rows"].append(row)
            print(f"  {label:28s} gemm {row['gemm_ms']:.4f} ms  step {row['kernel_ms']:.4f} ms  picks {picks}")
            write_result(Path(args.out), result)

        tiles = [fused_linear._configs()[0]] if args.dry_run else [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in TILES
        ]  # fmt: skip
        for tile in tiles:
            measure(name((tile.kwargs["BLOCK_M"], tile.kwargs["BLOCK_N"], tile.num_warps, tile.num_stages)), [tile])
        for i in range(0 if args.dry_run else args.autotunes):
            measure(f"autotuned over all ({i + 1})", tiles)
        kernel.configs = landed
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
