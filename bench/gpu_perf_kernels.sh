#!/usr/bin/env bash
# One device call (< 5 minutes), issue 17's speed work: kernel variants and every autotuner block
# shape side by side (bench/kernels_explore.py, each variant checked once against float64), a short
# GPU correctness check (bucket edges of the PTX variants, the int64 loop; --skip-capture), then the
# autotuned table at seq 512 / 2048 / 8192. The flow and its budgets: bench/gpu_run_kernels.sh.
# The `old` section needs ./_old_hstu_attention.py (git show 4d75a2c:kernels/hstu_attention.py),
# else it is skipped.
#
#     OUT=/some/dir bash bench/gpu_perf_kernels.sh
#     DRY_RUN=1 OUT=/tmp/x bash bench/gpu_perf_kernels.sh   # on a CPU (Triton interpreter)
set -u
export EXPLORE="${EXPLORE:-variants,configs,old}" EXPLORE_BUDGET="${EXPLORE_BUDGET:-110}"
export CHECK_BUDGET="${CHECK_BUDGET:-40}" CHECK_ARGS="${CHECK_ARGS:---skip-capture}"
export BENCH_BUDGET="${BENCH_BUDGET:-70}"
[ -z "${DRY_RUN:-}" ] && export BENCH_SEQS="${BENCH_SEQS:-512,2048,8192}"  # (a dry run: the interpreter's own)
exec bash "$(dirname "$0")/gpu_run_kernels.sh"
