#!/usr/bin/env bash
# One device call (< 10 minutes): the Gluon sm90 attention kernel (kernels/hstu_hopper.py) on an H200/H100.
# Steps, each with its own budget and hard timeout, each writing its results as it goes (a budget of 0 skips
# the step):
#   1. its GPU tests (tests/kernels/test_hstu_hopper.py, log in $OUT/gpu-test-hopper.log)        TEST_BUDGET=150
#   2. its correctness on the GPU check's cases (bench/gpu_kernels_check.py --kernel hopper: fresh
#      seeds, NaN-poisoned outputs, float64 reference)                                           CHECK_BUDGET=150
#   3. its configs beside the Triton kernel (bench/kernels_explore.py --sections hopper)         EXPLORE_BUDGET=300
#      over HEAD_DIMS=128,64,256 (SECTIONS=oneuser: the one-user rows alone, the timestamp check's scan step)
#   4. the kernels table as grc runs it (bench/kernels.py: the eager ops pick the kernel)        TABLE_BUDGET=0
#
#     OUT=/some/dir bash bench/gpu_run_hopper.sh
# Exit status: the correctness check's (0 passed), else the tests' (0 when skipped).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
started=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - started )) s in)"; }
status=0

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

tb=${TEST_BUDGET:-150}
if [ "$tb" -gt 0 ]; then
    step "tests (tests/kernels/test_hstu_hopper.py)"
    timeout "$tb" "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_hstu_hopper.py 2>&1 \
        | grep -v "leaked\|nanobind\|refleaks\|^ - " > "$OUT/gpu-test-hopper.log"
    status=${PIPESTATUS[0]}
    tail -15 "$OUT/gpu-test-hopper.log"
fi

cb=${CHECK_BUDGET:-150}
if [ "$cb" -gt 0 ]; then
    step "correctness (bench/gpu_kernels_check.py --kernel hopper)"
    timeout $((cb + 90)) "$PY" bench/gpu_kernels_check.py --kernel hopper --out-dir "$OUT" --budget-s "$cb" | tail -40
    status=${PIPESTATUS[0]}
fi

eb=${EXPLORE_BUDGET:-300}
if [ "$eb" -gt 0 ]; then
    step "configs (bench/kernels_explore.py --sections ${SECTIONS:-hopper} --head-dims ${HEAD_DIMS:-128,64,256})"
    timeout $((eb + 90)) "$PY" bench/kernels_explore.py --sections "${SECTIONS:-hopper}" \
        --head-dims "${HEAD_DIMS:-128,64,256}" \
        --out-dir "$OUT" --budget-s "$eb" | grep -v "^{" || echo "kernels_explore.py: exit $? (partial JSON kept)"
fi

ab=${TABLE_BUDGET:-0}
if [ "$ab" -gt 0 ]; then
    step "table (bench/kernels.py --seqs 512,2048,8192)"
    timeout $((ab + 120)) "$PY" bench/kernels.py --out-dir "$OUT" --budget-s "$ab" --seqs 512,2048,8192 \
        || echo "kernels.py: exit $? (partial JSON kept)"
fi
step "done"
exit "$status"
