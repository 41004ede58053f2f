#!/usr/bin/env bash
# One device call (~3 minutes on a warm machine; issue 21): the TMA GEMM (kernels/tma_linear.py) checked, then timed.
#   1. its GPU tests (tests/kernels/test_tma_linear.py: every config vs float64 at the HSTU widths, NaN-poisoned
#      outputs; the op under torch.compile equal to the eager call). The call stops here if they fail.
#   2. bench/fused_gemm.py at mtgr-small's throughput shape: the TMA rows (each config, + SiLU) beside cuBLAS alone,
#      cuBLAS + Inductor's SiLU pass (what the TMA kernel is meant to replace) and the pointer-loaded Triton GEMM.
# -> $OUT/gpu-test-tma-gemm.log, $OUT/fused-gemm-tma-SPEC.json / .log (provenance by bench/_common.write_result).
#     OUT=/some/dir bash bench/gpu_run_tma_gemm.sh        (SPEC, default mtgr-small; carry the test wheels in .whl)
# The package with it (the next call, if the kernel wins here): MODES=aoti_bf16,aoti_bf16_fused,aoti_bf16_fused_tma
# through bench/gpu_run_aoti_attention.sh.
set -u
cd "$(dirname "$0")/.."
source bench/gpu_python.sh  # $py, PYTHONPATH, CXX, step, gpu_environment, gpu_call
gpu_call
spec=${SPEC:-mtgr-small}
step "GPU tests: tests/kernels/test_tma_linear.py"
timeout "${TEST_S:-240}" "$py" -m pytest -q -p no:cacheprovider -rA tests/kernels/test_tma_linear.py \
    > "$OUT/gpu-test-tma-gemm.log" 2>&1 || { tail -40 "$OUT/gpu-test-tma-gemm.log"; step "failed: not timed"; exit 1; }
grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$OUT/gpu-test-tma-gemm.log" | tail -14
step "bench/fused_gemm.py $spec"
timeout "${LIMIT_S:-200}" "$py" bench/fused_gemm.py --spec "$spec" --out "$OUT/fused-gemm-tma-$spec.json" 2>&1 \
    | grep -v '^USDT:' > "$OUT/fused-gemm-tma-$spec.log"
status=${PIPESTATUS[0]}
tail -25 "$OUT/fused-gemm-tma-$spec.log"
step "done"
exit "$status"
