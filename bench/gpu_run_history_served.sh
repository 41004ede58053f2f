#!/usr/bin/env bash
# One device call, start to end (under 8 minutes): the user-history cache SERVED by a GPU spec's fused Triton bundle
# (bench/history_cache_served.py): the spec's backend as one fused model per store (instance_count stores behind
# the router), 1 user x history {1000, max_seq_len - max_candidates - profile} x max_candidates candidates,
# uncached (no user_id: the backend's dense step, CUDA graphs) vs cached hits (the cached K/V,
# the score step replayed from CUDA graphs: grc/serving/common/score_graphs.py),
# with hits counted from the metrics endpoint and both answers checked against the float64 PyTorch model.
#   OUT=/some/folder bash bench/gpu_run_history_served.sh [SPEC]      # SPEC default mtgr-small-gpu
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_history_served.sh tests/specs/mtgr-tiny-fused-cpu.yaml   # on a CPU
# SPEC is a name under specs/ or a path. From the repository root of a checkout (or a copy of one). Writes
# $OUT/history-cache-served-<gpu>.json (h200 on the H200; rewritten after every shape) through bench/_common's
# write_result, and logs with timestamps to $OUT/history-served-run.log.
#  1. bench/gpu_serve_env.sh: the environment, the carried wheels (.whl) into /tmp/site, the stub's .pth;
#  2. bench/history_cache_served.py (its own build of the bundle, tables cut to 10,000 rows; --deadline from
#     BUDGET); if the build fails (say the CUDA AOTInductor package), once more with backend pytorch_kernels,
#     said in the log and in the result's base_spec (the cached path is the same graphed score step either way).
# TRACE=1: the fused model's execute() profiled inside the server (grc/serving/triton/models/trace.py: cProfile
# windows, torch.profiler with the CUDA runtime calls), files under $OUT/trace; TRACE=captures: only the cached
# step's captures one by one (shape, seconds, compiles, allocations), no profiles (they slow what they cover).
# BUDGET (default 460 s; 570 when BENCH_FLAGS asks for --session-users) bounds the whole call: the bench is killed
# at BUDGET - 10 s, and starts no new shape past BUDGET - 90 s. The server's start includes the AOTInductor build
# (146-213 s for mtgr-base on fresh H200s) and the cached step's warm-up (ScoreGraphs.warm_up: ~70 s,
# bench/results/history-cache-served-h200-s9-warm-up.log): at BUDGET 460 session 12's session workload was skipped.
set -u -o pipefail
cd "$(dirname "$0")/.."
# The lent H200 image sets CXX=/opt/gcc/bin/g++, whose AOTInductor packages crash when loaded;
# /usr/bin/g++ (the same GCC) builds packages that load (bench/results/aoti-probe-h200.json).
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
started=$(date +%s)
case " ${BENCH_FLAGS:-} " in
  *" --session-users "*) BUDGET=${BUDGET:-570} ;;
  *) BUDGET=${BUDGET:-460} ;;
esac
REQUESTS=${REQUESTS:-10}
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GRC_CACHE_DIR="${GRC_CACHE_DIR:-/tmp/grc-history-served-cache}"
LOG="$OUT/history-served-run.log"
case "${TRACE:-0}" in
  1) export GRC_TRACE_DIR="$OUT/trace" ;;
  captures) export GRC_TRACE_DIR="$OUT/trace" GRC_TRACE_PROFILE=0 ;;
esac

# shellcheck source=bench/gpu_serve_env.sh
. bench/gpu_serve_env.sh

spec="${1:-mtgr-small-gpu}"
file="$spec"; [ -f "$file" ] || file="specs/$spec.yaml"
[ -f "$file" ] || { say "no spec $spec (tried $spec, specs/$spec.yaml)"; exit 2; }
slug="$("$PY" -c 'import sys; sys.path.insert(0, "bench"); from serve import device_slug; print(device_slug())')"
result="$OUT/history-cache-served-$slug.json"

# BENCH_FLAGS: more of the bench's own options, e.g. "--session-users 1000 --session-s 60" (the served session
# workload after the shapes: bench/history_cache_served_session.py)
read -r -a more <<< "${BENCH_FLAGS:-}"
run_bench() {  # $1: the spec file; the bench's exit status (2: the build failed, 124: killed at the budget)
  say "bench/history_cache_served.py --spec $1 ($(left) s left; no new shape after $(( BUDGET - 90 )) s)"
  timeout $(( $(left) - 10 )) "$PY" bench/history_cache_served.py --spec "$1" --requests "$REQUESTS" \
    --out "$result" --deadline $(( BUDGET - 90 - $(elapsed) )) --startup-timeout 240 "${more[@]}" 2>&1 | stamp |
    tee -a "$LOG"
}

run_bench "$file"
rc=$?
if [ $rc -eq 2 ] && [ "$(left)" -gt 150 ]; then
  fallback="/tmp/$(basename "$file" .yaml)-kernels.yaml"
  printf 'extends: %s\nbundles: {triton: {backend: pytorch_kernels, extra_backends: []}}\n' "$(realpath "$file")" \
    >"$fallback"
  say "the build of $file FAILED (log above); once more with backend pytorch_kernels ($fallback)"
  run_bench "$fallback"
  rc=$?
fi
case $rc in
  0) say "clean: every timed cached request a hit, cached and uncached within tolerance of float64" ;;
  124) say "TIMED OUT at the budget ($BUDGET s): $result keeps the shapes done" ;;
  *) say "exit $rc (NOT CLEAN lines or a failure above)" ;;
esac
say "done in $(elapsed) s; files: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
