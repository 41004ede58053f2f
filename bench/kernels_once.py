"""One HSTU attention launch at a benchmark shape, after one warm-up launch: the program a profiler wraps.

    ncu --clock-control none -k regex:_hstu_hopper_kernel --launch-skip 1 -c 1 --section WarpStateStats \\
        python bench/kernels_once.py --kernel hopper --head-dim 128 --seq 8192

Inputs as bench/kernels.py makes them (64k tokens, bf16, causal, its tables and head counts, no candidates).
--kernel triton launches the Triton kernel in one fixed config (--config, default the first listed for the head dim),
so that the profiled launch is not an autotuning trial. Prints the launch's time (CUDA events) and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.kernels as bench
from kernels.hstu_attention import CONFIGS, hstu_attention_cached_triton
from kernels.hstu_hopper import HOPPER_CONFIGS, hstu_attention_hopper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("hopper", "triton"), default="hopper")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--config", help="comma-separated config tuple (default: the first listed)")
    opts = parser.parse_args()
    d, seq = opts.head_dim, opts.seq
    users = bench.TOTAL_TOKENS // seq
    q, k, v, off, ts, nc, pos_w, ts_w, alpha, norm, causal = bench.make_case(
        [seq] * users, [0] * users, bench.HEADS_AT[d][-1], d, torch.bfloat16, seed=1, tables=bench.TABLES[d]
    )
    listed = HOPPER_CONFIGS if opts.kernel == "hopper" else CONFIGS
    config = tuple(int(x) for x in opts.config.split(",")) if opts.config else listed[d][0]
    launch = hstu_attention_hopper if opts.kernel == "hopper" else hstu_attention_cached_triton
    for _ in range(2):  # warm-up (compiles), then the launch to profile
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(q, k, v, off, off, ts, nc, pos_w, ts_w, alpha, norm, causal, config=config)
        end.record()
        torch.cuda.synchronize()
    print(f"{opts.kernel} {config} d {d} seq {seq}: {start.elapsed_time(end):.3f} ms")


if __name__ == "__main__":
    main()
