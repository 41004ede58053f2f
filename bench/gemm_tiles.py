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
from bench.history_cache_device import User, model_in, spec_path
from bench.history_cache_profile import device_profile
from grc.model.kv_cache import KVLayout
from grc.serving.common.arena_graphs import ArenaGraphs
from grc.serving.common.kv_arena import KVArena
from grc.serving.ranker.dense import GraphStats
from grc.spec.loader import load_spec

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
    ap.add_argument("--spec", default="mtgr-base")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--history", type=int, help="history events (default: max_seq_len - 256 - profile tokens)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--autotunes", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape, one tile (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("gemm_tiles.py: torch sees no CUDA device (use --dry-run on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    repo = Path(__file__).resolve().parents[1]
    cfg = load_spec(spec_path(repo, args.spec)).spec.model
    h, dtype = cfg.hstu, getattr(torch, args.dtype)
    candidates = 8 if args.dry_run else args.candidates
    history = 24 if args.dry_run else args.history or h.max_seq_len - 256 - len(cfg.profile)
    repeat = 2 if args.dry_run else args.repeat
    model = model_in(cfg, device, args.dtype)
    user = User(cfg, history, candidates, 0, device, dtype)
    kernel: Any = fused_linear._fused_linear_kernel  # the Autotuner
    landed = list(kernel.configs)
    if hasattr(kernel, "cache_results"):
        kernel.cache_results = False  # each autotune row times its tiles afresh (no pick from the on-disk cache)
    result: dict[str, Any] = {
        "spec": args.spec, "dtype": args.dtype, "history": history, "candidates": candidates, "repeat": repeat,
        "landed_tiles": [c.__str__() for c in landed], "rows": [],
    }  # fmt: skip
    layout = KVLayout(h.num_layers, h.num_heads, h.head_qk, h.head_v)
    with torch.no_grad():
        cache = user.prefill(model, user.n - candidates, "triton")
        reference = None

        def measure(label: str, configs: list[Any]) -> None:
            nonlocal reference
            kernel.configs = configs
            kernel.cache.clear()  # the pick per key forgotten: this row tunes (or takes its one tile) afresh
            arena = KVArena(layout, 2 * h.max_seq_len, ArenaGraphs.scratch_rows(model, 1), dtype, device)
            run = user.in_arena(ArenaGraphs(model, "triton", GraphStats(), 1, arena, graphs=cuda), cache)
            scores = run().float()  # compiles, tunes, captures
            reference = scores if reference is None else reference
            prof = device_profile(run, repeat, cuda)
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
