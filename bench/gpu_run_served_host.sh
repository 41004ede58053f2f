#!/usr/bin/env bash
# One device call (~3 minutes): bench/served_host_profile.py on the GPU, the fused Ranker's host time per execute by
# phase, cached vs uncached, with cProfile's top functions and the torch ops (launches) per execute (issue 18's served
# session, where the cached path's layout and dense phases cost ~0.7 ms per execute more on the H200 than on a CPU)
#     -> $OUT/served-host-profile-h200.json / .log
#     OUT=/some/dir bash bench/gpu_run_served_host.sh          (LIMIT_S, default 300; ARGS: more options)
# pydantic, doit & co. from .whl where the device's Python lacks them (bench/gpu_python.sh).
set -u
cd "$(dirname "$0")/.."
source bench/gpu_python.sh  # $py, PYTHONPATH, CXX, step, gpu_environment, gpu_call
gpu_call
step "bench/served_host_profile.py --device cuda"
# the served session's shape (history 1,000 + 10 a visit, 256 candidates, ~6 users an execute) on mtgr-tiny widened
# shellcheck disable=SC2086  # ARGS: options, split on purpose
timeout "${LIMIT_S:-300}" "$py" bench/served_host_profile.py --device cuda --base 1000 --candidates 256 \
    --max-seq-len 1536 --users 60 --budget-mb 2048 ${ARGS:-} --out "$OUT/served-host-profile-h200.json" 2>&1 \
    | grep -v '^USDT:' > "$OUT/served-host-profile-h200.log"
status=${PIPESTATUS[0]}
sed -n '/^store /,$p' "$OUT/served-host-profile-h200.log" | head -60
tail -5 "$OUT/served-host-profile-h200.log"
step "done"
exit "$status"
