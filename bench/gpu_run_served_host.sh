#!/usr/bin/env bash
# One device call (~5-7 minutes: a cold H100 needed more than 280 s for the profile alone, session 25): the GPU
# tests of the fused Ranker's lookups and bucket padding
# (-> $OUT/gpu-test-gather.log), then bench/served_host_profile.py on the GPU: the fused Ranker's host time per
# execute by phase, cached vs uncached, with cProfile's top functions and the torch ops (launches) per execute
# (issue 18's served session, where the cached path's layout and dense phases cost ~0.7 ms per execute more on the
# H200 than on a CPU)
#     -> $OUT/served-host-profile-h200.json / .log
#     OUT=/some/dir bash bench/gpu_run_served_host.sh    (TEST_S, default 200; LIMIT_S, default 420; ARGS: options)
# pydantic, doit & co. from .whl where the device's Python lacks them (bench/gpu_python.sh).
set -u
cd "$(dirname "$0")/.."
source bench/gpu_python.sh  # $py, PYTHONPATH, CXX, step, gpu_environment, gpu_call
gpu_call
# first the GPU tests of the lookups the profile serves through (the one-kernel gathers, 6e29ef8; device and pinned
# tables vs the memory-mapped lookups) and of the bucket graphs' shared input buffers (996907d): a failure stops the
# call before it profiles wrong code
step "tests: the fused Ranker's lookups on the GPU"
timeout "${TEST_S:-200}" "$py" -m pytest -q -p no:cacheprovider -rA tests/serving/test_fused_gpu_real.py \
    -k "gather or tables or padding" > "$OUT/gpu-test-gather.log" 2>&1 || { tail -30 "$OUT/gpu-test-gather.log"; exit 1; }
grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu-test-gather.log" | tail -12
step "bench/served_host_profile.py --device cuda"
# the served session's shape (history 1,000 + 10 a visit, 256 candidates, ~6 users an execute) on mtgr-tiny widened
# shellcheck disable=SC2086  # ARGS: options, split on purpose
timeout "${LIMIT_S:-420}" "$py" bench/served_host_profile.py --device cuda --base 1000 --candidates 256 \
    --max-seq-len 1536 --users 60 --budget-mb 2048 ${ARGS:-} --out "$OUT/served-host-profile-h200.json" 2>&1 \
    | grep -v '^USDT:' > "$OUT/served-host-profile-h200.log"
status=${PIPESTATUS[0]}
grep '^\[ *[0-9.]* s\]' "$OUT/served-host-profile-h200.log"  # its progress: where a cut run stopped
sed -n '/^store /,$p' "$OUT/served-host-profile-h200.log" | head -60
tail -5 "$OUT/served-host-profile-h200.log"
step "done"
exit "$status"
