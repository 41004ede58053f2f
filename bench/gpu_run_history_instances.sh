#!/usr/bin/env bash
# One device call: the served session workload of the user-history cache (bench/history_cache_served.py, through
# bench/gpu_run_history_served.sh) at 1 and 4 fused-model instances (INSTANCES) on one GPU (one store each, users
# routed to theirs by id): does the cache's device saving show once more host works per GPU? Session 14 found one
# instance host-bound in both modes (~7 ms of host per execute of ~6 users against 1.9 ms of device work at
# history 1,000).
#   OUT=/some/folder bash bench/gpu_run_history_instances.sh [SPEC]          # SPEC default mtgr-base-gpu
#   DRY_RUN=1 INSTANCES="1 2" OUT=/tmp/x bash bench/gpu_run_history_instances.sh tests/specs/mtgr-tiny-fused-cpu.yaml
# Each count its own server (the bundle built by the first, restored from the build cache after), the same
# clients (CLIENTS, default 32) and users (USERS, default 1,000 x 5 visits), and the same total cache budget split
# between the stores (TOTAL_MB, default 24,576: every user's entries fit at every count: no count evicts more).
# Results: $OUT/instances-<n>/history-cache-served-<gpu>.json (+ its log, and each capture under trace/).
# FIRST_BUDGET (default 370 s: the AOTInductor build, 146-213 s on fresh H200s, a server's start, ~40-90 s, the two
# timed modes and the float64 checks) and NEXT_BUDGET (default 150 s) bound each run: two counts fit one 600 s call
# (the bench skips a session that would end past its budget: history_cache_served.py's --deadline). WARM=1: each
# session after a warm pass of both modes (--session-warm: a server in steady state; session 24's 0.94x at one instance
# was measured so); give one count the call then (INSTANCES=4 WARM=1).
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
spec="${1:-mtgr-base-gpu}"
budget="${FIRST_BUDGET:-370}"
rc=0
for n in ${INSTANCES:-1 4}; do
  flags="--budget-mb $(( ${TOTAL_MB:-24576} / n )) --skip-shapes --session-users ${USERS:-1000} --session-s 15"
  flags+=" --session-concurrency ${CLIENTS:-32} --instances $n${WARM:+ --session-warm}"
  TRACE=captures BUDGET="$budget" REQUESTS=10 BENCH_FLAGS="$flags" OUT="$OUT/instances-$n" \
    bash bench/gpu_run_history_served.sh "$spec" || rc=$?
  budget="${NEXT_BUDGET:-150}"
done
exit $rc
