#!/usr/bin/env bash
# One device call (< 10 minutes): engine.aoti.attention on an sm90 GPU (issue 21). Steps, each bounded:
#   1. the GPU tests of the package's attention kernel (TESTS, default tests/aoti/test_aoti_attention_kernel.py:
#      packages with the Gluon kernel and with the Triton one, float64 parity, CUDA-graph replay; the refusal),
#      log in $OUT/gpu-test-aoti-attention.log (TEST_FILTER: a pytest -k expression)            TEST_BUDGET=200
#   2. bench/e2e.py on SPEC (default mtgr-small) for MODES (default: the package as built by default, attention
#      auto: the Gluon kernel as an opaque op, beside the package with the Triton kernel compiled in), one
#      process, same inputs, per-op profile; $OUT/e2e-SPEC.json / .log                       DEADLINE=380
#     OUT=/some/dir SPEC=mtgr-small bash bench/gpu_run_aoti_attention.sh [more bench/e2e.py flags]
# Exit status: the tests' (0 when skipped), else the bench's.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
source bench/gpu_python.sh  # $py, PYTHONPATH, CXX, step, gpu_environment
gpu_environment

status=0
tb=${TEST_BUDGET:-200}
if [ "$tb" -gt 0 ]; then
    step "tests (tests/aoti/test_aoti_attention_kernel.py)"
    # shellcheck disable=SC2086  # TESTS is a list of paths
    timeout "$tb" "$py" -m pytest -q -p no:cacheprovider ${TESTS:-tests/aoti/test_aoti_attention_kernel.py} -rA \
        ${TEST_FILTER:+-k "$TEST_FILTER"} 2>&1 \
        | grep -v "leaked\|nanobind\|refleaks\|^ - " > "$OUT/gpu-test-aoti-attention.log"
    status=${PIPESTATUS[0]}
    tail -15 "$OUT/gpu-test-aoti-attention.log"
fi

step "bench/e2e.py ${SPEC:-mtgr-small}: ${MODES:-aoti_bf16,aoti_bf16_triton_attention}"
DEADLINE="${DEADLINE:-380}" OUT="$OUT" bash bench/gpu_run_e2e.sh "${SPEC:-mtgr-small}" \
    --modes "${MODES:-aoti_bf16,aoti_bf16_triton_attention}" "$@"
bench=$?
step "done"
[ "$status" -ne 0 ] && exit "$status"
exit "$bench"
