#!/usr/bin/env bash
# One device call (< 10 minutes): the history cache's device arena (issue 18, session 19). Steps, each bounded:
#   1. GPU tests: the served arena step on cuda:0 (tests/serving/test_arena_graphs.py: float32 head dim 16, bf16
#      head dim 128; a session of returning users vs the whole graphed path, no capture compiling) and the copies
#      step after its refactor (tests/serving/test_fused_gpu_real.py -k cached_score_graphs), and the ensemble path's
#      cached model on the GPU, arena by default since session 19 (tests/serving/test_history_cached_device.py)
#      -> $OUT/gpu-test-arena.log                                                             TEST_BUDGET=240
#   2. bench/history_cache_profile.py for SPEC (default mtgr-base) at each of HISTORIES (default "1000 default":
#      default = max_seq_len - 256 - profile), 256 candidates: the hit over the arena (arena_score) beside the same
#      with NORM_PROLOGUE["uvqk_step"] flipped (session 20), the copies step (graphs_score) and the eager full
#      forward -> $OUT/history-cache-profile-h200-arena-SPEC-H.json / .log
#                                                                                       LIMIT_S=120 each
#   3. with MIXED="HITS:MISSES" (default none): one served execute's users in one arena step (MIXED_HISTORY events
#      each, default 1000; hits +10 events), fused and unfused GEMMs, beside their uncached forward: the device time
#      per execute behind the served session's users/s (issue 18) -> $OUT/history-cache-profile-h200-mixed-SPEC.json
#                                                                                       MIXED_LIMIT_S=150
#     OUT=/some/dir bash bench/gpu_run_arena.sh              (tritonclient + python-rapidjson wheels in .whl: the
#     HISTORIES=" " OUT=... bash bench/gpu_run_arena.sh     tests import the bundle writers; " ": tests only)
set -u
cd "$(dirname "$0")/.."
source bench/gpu_python.sh  # $py, PYTHONPATH, CXX, step, gpu_environment, gpu_call
gpu_call

status=0
tb=${TEST_BUDGET:-240}
if [ "$tb" -gt 0 ]; then
    step "tests"
    timeout "$tb" "$py" -m pytest -q -p no:cacheprovider -rA tests/serving/test_arena_graphs.py \
        "tests/serving/test_fused_gpu_real.py::test_cached_score_graphs_exact_across_shapes_growth_and_eviction" \
        tests/serving/test_history_cached_device.py \
        > "$OUT/gpu-test-arena.log" 2>&1
    status=$?
    grep -E "PASSED|FAILED|ERROR|passed|failed|seed" "$OUT/gpu-test-arena.log" | tail -20
fi

spec=${SPEC:-mtgr-base}
for h in ${HISTORIES:-1000 default}; do
    step "profile $spec history $h"
    args=(--spec "$spec" --paths arena_score,arena_score_torch_norm,arena_score_flipped_prologue,graphs_score,full_forward --repeat 10)
    [ "$h" != default ] && args+=(--history "$h")
    name="history-cache-profile-h200-arena-$spec-$h"
    timeout "${LIMIT_S:-120}" "$py" bench/history_cache_profile.py "${args[@]}" --out "$OUT/$name.json" 2>&1 \
        | grep -v '^USDT:' > "$OUT/$name.log"
    grep -E "^  [a-z_]+:|max relative" "$OUT/$name.log"
done
if [ -n "${MIXED:-}" ]; then
    step "mixed step $MIXED of $spec"
    name="history-cache-profile-h200-mixed-$spec"
    timeout "${MIXED_LIMIT_S:-150}" "$py" bench/history_cache_profile.py --spec "$spec" --mixed "$MIXED" \
        --mixed-history "${MIXED_HISTORY:-1000}" --paths arena_mixed,arena_mixed_unfused,full_forward_mixed \
        --repeat 10 --out "$OUT/$name.json" 2>&1 | grep -v '^USDT:' > "$OUT/$name.log"
    grep -E "^  [a-z_]+:|max relative" "$OUT/$name.log"
fi
step "done"
exit "$status"
