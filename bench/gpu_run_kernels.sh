#!/usr/bin/env bash
# One device call, start to end (< 8 minutes): the kernels' GPU correctness check (GPU-only variant:
# tanh.approx SiLU and the PTX bias gather; full and cached-keys kernels; time_buckets 32 and 64),
# the TensorRT plugin kernel's check when nvcc is present, then the benchmark table. Each step has
# its own time budget and hard timeout, and writes its JSON as it goes, so a slow step cannot take
# the others' results with it. Needs python with torch (CUDA) and triton; run from the repo root:
#
#     OUT=/some/dir bash bench/gpu_run_kernels.sh     # $OUT defaults to bench/results
#     DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_kernels.sh   # on a CPU: the same flow, Triton interpreter
#
# Knobs (environment): EXPLORE=old,variants,configs first times kernel variants side by side
# (bench/kernels_explore.py, each checked vs float64) within EXPLORE_BUDGET s (default 130), EXPLORE_ARGS
# passed on (e.g. --head-dims 128,64);
# CHECK_BUDGET (default 130) and BENCH_BUDGET (default 140) bound the check and the table;
# CHECK_ARGS (e.g. --skip-capture) go to the check;
# BENCH_SEQS=512,2048,8192 limits the table's sequence lengths.
#
# Exit status: that of the correctness check: 0 passed, 1 failed (or timed out: 124), 2 every check run passed
# but some were cut by CHECK_BUDGET (not run).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
started=$(date +%s)
marker=$(mktemp)  # the summary prints only result files written by this run
trap 'rm -f "$marker"' EXIT
step() { echo; echo "== $1 ($(( $(date +%s) - started )) s in)"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

DRY=${DRY_RUN:+--dry-run}
if [ -n "${EXPLORE:-}" ]; then
    step "kernel variants (bench/kernels_explore.py --sections $EXPLORE)"
    eb=${EXPLORE_BUDGET:-130}
    timeout $((eb + 60)) "$PY" bench/kernels_explore.py --out-dir "$OUT" --sections "$EXPLORE" --budget-s "$eb" ${EXPLORE_ARGS:-} $DRY \
        || echo "kernels_explore.py: exit $? (partial JSON kept)"
fi

step "kernel correctness (bench/gpu_kernels_check.py)"
cb=${CHECK_BUDGET:-130}
timeout $((cb + 90)) "$PY" bench/gpu_kernels_check.py --out-dir "$OUT" --budget-s "$cb" ${CHECK_ARGS:-} $DRY
check_rc=$?
[ $check_rc -eq 124 ] && echo "gpu_kernels_check: TIMED OUT after $((cb + 90)) s (partial JSON kept)"
[ $check_rc -eq 2 ] && echo "gpu_kernels_check: INCOMPLETE: every check run passed, some were cut by CHECK_BUDGET"

step "TensorRT plugin kernel (plugins/check_kernel.py)"
if [ -n "$DRY" ]; then
    echo "skipped: dry run (no GPU)"
elif command -v nvcc >/dev/null; then
    timeout 40 "$PY" plugins/check_kernel.py --arch sm_90 --out "$OUT/plugin-kernel-check.json" || echo "plugin kernel check: FAILED or timed out"
else
    echo "skipped: nvcc not found on PATH (the plugin kernel's gap/bucket code is also checked on CPU: tests/kernels/test_plugin_time_bucket.py)"
fi

step "benchmark (bench/kernels.py)"
bb=${BENCH_BUDGET:-140}
timeout $((bb + 50)) "$PY" bench/kernels.py --out-dir "$OUT" --budget-s "$bb" ${BENCH_SEQS:+--seqs "$BENCH_SEQS"} $DRY \
    || echo "bench/kernels.py: exit $? (partial JSON kept)"

step "summary"
for f in $(find "$OUT" -maxdepth 1 -name 'kernels-explore*.json' -newer "$marker"); do
    "$PY" bench/kernels_explore.py --print "$f"
done
for f in $(find "$OUT" -maxdepth 1 -name 'kernels-*-check.json' -newer "$marker"); do
    "$PY" bench/gpu_kernels_check.py --print "$f"
done
for f in $(find "$OUT" -maxdepth 1 -name 'kernels-*.json' ! -name '*-check.json' ! -name 'kernels-explore*' -newer "$marker"); do
    "$PY" bench/kernels.py --print "$f"
done
echo "total $(( $(date +%s) - started )) s; results in $OUT"
exit $check_rc
