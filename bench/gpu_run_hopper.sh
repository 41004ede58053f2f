#!/usr/bin/env bash
# One device call (< 10 minutes): the Gluon sm90 attention kernel (kernels/hstu_hopper.py), first its
# correctness on the GPU check's cases (bench/gpu_kernels_check.py --kernel hopper: fresh seeds,
# NaN-poisoned outputs, float64 reference), then its speed beside the Triton kernel
# (bench/kernels_explore.py --sections hopper). Each step has its own budget and hard timeout and writes
# its JSON as it goes. Run from the repo root on a Hopper GPU:
#
#     OUT=/some/dir bash bench/gpu_run_hopper.sh      # HEAD_DIMS=128,64,256 CHECK_BUDGET=150 EXPLORE_BUDGET=300
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
started=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - started )) s in)"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "correctness (bench/gpu_kernels_check.py --kernel hopper)"
cb=${CHECK_BUDGET:-150}
timeout $((cb + 90)) "$PY" bench/gpu_kernels_check.py --kernel hopper --out-dir "$OUT" --budget-s "$cb"
status=$?
echo "check exit $status"

step "speed (bench/kernels_explore.py --sections hopper --head-dims ${HEAD_DIMS:-128,64,256})"
eb=${EXPLORE_BUDGET:-300}
timeout $((eb + 90)) "$PY" bench/kernels_explore.py --sections hopper --head-dims "${HEAD_DIMS:-128,64,256}" \
    --out-dir "$OUT" --budget-s "$eb" || echo "kernels_explore.py: exit $? (partial JSON kept)"
step "done"
exit $status
