#!/usr/bin/env bash
# One device call (< 10 minutes), session 21: which change broke the graphed copies step's rows at bf16 head dim 128
# (tests/serving/test_fused_gpu_real.py::...cached_score_graphs...[bfloat16-d128] failed at e08dcd6, passed in
# session 19) and which one made the history step's fused GEMMs slower (0.093 -> 0.138 ms at mtgr-base, 3837 x 256).
# Each suspect is switched off by a module attribute set before pytest / the bench runs (no code edited):
#   tables   kernels.hstu_attention.TABLE_CACHE_SIZE = 0   (the attention's bias tables computed per call again)
#   rows     kernels.fused_linear.SMALL_ROWS = 0           (the fused GEMM tuned as one class for every row count;
#            the class was reverted after this run, 39da556: the switch is a no-op since)
#   scatter  grc.model.hstu.SCATTER_KV = False             (the new K/V rows by index_copy_, not the GEMM's epilogue)
# Steps: the served arena GPU tests and the failing test as landed, the failing test under each switch, then the
# step's profile (mtgr-base, history default) as landed, with `rows` off and with `scatter` off.
#     OUT=/some/dir bash bench/gpu_run_arena_diag.sh      (tritonclient + python-rapidjson wheels in .whl)
set -u
cd "$(dirname "$0")/.."
source bench/gpu_python.sh  # $py, PYTHONPATH, CXX, step, gpu_environment, gpu_call
gpu_call

switched() {  # switched NAME: python -c code that runs the module in argv[1] with the named suspect off
    local set=""
    case "$1" in
        tables) set="import kernels.hstu_attention as m; m.TABLE_CACHE_SIZE = 0";;
        rows) set="import kernels.fused_linear as m; m.SMALL_ROWS = 0";;
        scatter) set="import grc.model.hstu as m; m.SCATTER_KV = False";;
    esac
    echo "import runpy, sys; $set; sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
}

failing="tests/serving/test_fused_gpu_real.py::test_cached_score_graphs_exact_across_shapes_growth_and_eviction"
step "tests as landed"
timeout 170 "$py" -m pytest -q -p no:cacheprovider -rA tests/serving/test_arena_graphs.py -k gpu "$failing" \
    > "$OUT/gpu-test-diag-landed.log" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed|max \|diff\|" "$OUT/gpu-test-diag-landed.log" | cut -c1-400 | tail -12
for name in tables rows scatter; do
    step "the failing test with $name off"
    timeout 70 "$py" -c "$(switched "$name")" pytest -q -p no:cacheprovider -rA "$failing[bfloat16-d128]" \
        > "$OUT/gpu-test-diag-$name-off.log" 2>&1
    grep -E "^(PASSED|FAILED|ERROR)|passed|failed|max \|diff\|" "$OUT/gpu-test-diag-$name-off.log" | cut -c1-400 | tail -6
done
for name in landed rows scatter; do
    step "profile mtgr-base history default, $name"
    args=(--spec mtgr-base --paths arena_score,full_forward --repeat 10)
    json="$OUT/history-cache-profile-h200-diag-$name.json"
    if [ "$name" = landed ]; then
        timeout 60 "$py" bench/history_cache_profile.py "${args[@]}" --out "$json" > "$OUT/profile-$name.log" 2>&1
    else
        timeout 60 "$py" -c "$(switched "$name")" bench.history_cache_profile "${args[@]}" --out "$json" \
            > "$OUT/profile-$name.log" 2>&1
    fi
    grep -E "^  [a-z_]+:|_fused_linear_kernel|_hstu_hopper_kernel" "$OUT/profile-$name.log" | cut -c1-100
done
step "done"
