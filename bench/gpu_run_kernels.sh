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
# Exit status: 1 if the correctness check failed or did not finish, else 0.
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

step "kernel correctness (bench/gpu_kernels_check.py)"
DRY=${DRY_RUN:+--dry-run}
timeout 220 "$PY" bench/gpu_kernels_check.py --out-dir "$OUT" --budget-s 130 $DRY
check_rc=$?
[ $check_rc -eq 124 ] && echo "gpu_kernels_check: TIMED OUT after 220 s (partial JSON kept)"

step "TensorRT plugin kernel (plugins/check_kernel.py)"
if [ -n "$DRY" ]; then
    echo "skipped: dry run (no GPU)"
elif command -v nvcc >/dev/null; then
    timeout 40 "$PY" plugins/check_kernel.py --arch sm_90 --out "$OUT/plugin-kernel-check.json" || echo "plugin kernel check: FAILED or timed out"
else
    echo "skipped: nvcc not found on PATH (the plugin kernel's gap/bucket code is also checked on CPU: tests/kernels/test_plugin_time_bucket.py)"
fi

step "benchmark (bench/kernels.py)"
timeout 190 "$PY" bench/kernels.py --out-dir "$OUT" --budget-s 140 $DRY || echo "bench/kernels.py: exit $? (partial JSON kept)"

step "summary"
for f in $(find "$OUT" -maxdepth 1 -name 'kernels-*-check.json' -newer "$marker"); do
    "$PY" bench/gpu_kernels_check.py --print "$f"
done
for f in $(find "$OUT" -maxdepth 1 -name 'kernels-*.json' ! -name '*-check.json' -newer "$marker"); do
    "$PY" bench/kernels.py --print "$f"
done
echo "total $(( $(date +%s) - started )) s; results in $OUT"
[ $check_rc -eq 0 ]
