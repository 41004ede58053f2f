#!/usr/bin/env bash
# One device call (~2 minutes): bench/gemm_tiles.py, the history-cache step's fused GEMMs one tile at a time and the
# autotuner's own picks (issue 18's in-process step; session 22) -> $OUT/gemm-tiles-h200-SPEC.json / .log
#     OUT=/some/dir bash bench/gpu_run_gemm_tiles.sh        (SPEC, default mtgr-base; LIMIT_S, default 240)
# pydantic & co. from .whl where the device's Python lacks them (bench/gpu_python.sh).
set -u
cd "$(dirname "$0")/.."
source bench/gpu_python.sh  # $py, PYTHONPATH, CXX, step, gpu_environment, gpu_call
gpu_call
spec=${SPEC:-mtgr-base}
step "bench/gemm_tiles.py $spec"
timeout "${LIMIT_S:-240}" "$py" bench/gemm_tiles.py --spec "$spec" --out "$OUT/gemm-tiles-h200-$spec.json" 2>&1 \
    | grep -v '^USDT:' > "$OUT/gemm-tiles-h200-$spec.log"
status=${PIPESTATUS[0]}
grep -E "gemm|wrote|Error|error" "$OUT/gemm-tiles-h200-$spec.log" | tail -20
step "done"
exit "$status"
