#!/usr/bin/env bash
# The in-process device runs of three issues in ONE device call (one machine start instead of three), each part
# under its own time limit, in issue order; a part cut short keeps what its JSON already holds:
#   1. bench/gpu_run_history.sh  (issue 18: cached score vs full forward in-process)  HISTORY_S (default 130)
#   2. bench/gpu_run_fp8.sh      (issue 19: fp8 vs bf16 dense GEMMs)                   FP8_S (default 125)
#   3. bench/gpu_run_fuse.sh     (issue 21: the fused GPU path and package)            FUSE_S (default 250)
# Files, flat in $OUT (8: the device returns at most 8): history-cache-h200.{json,log}, quant-fp8-h200.{json,log},
# e2e-mtgr-small.{json,log}, fused-gemm-mtgr-small.json, first.log.
#   OUT=/some/folder bash bench/gpu_run_inprocess.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
part() {  # part NAME SECONDS COMMAND...: one script under a hard limit (the script's own budgets sit inside it)
  local name=$1 limit=$2; shift 2
  echo "[$(date -u +%T)] gpu_run_inprocess: $name (at most $limit s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "[$(date -u +%T)] gpu_run_inprocess: $name exit $rc$([ $rc -eq 124 ] && echo ' (time limit)')"
}
hs=${HISTORY_S:-130}; fs=${FP8_S:-125}; us=${FUSE_S:-250}
part history "$hs" env LIMIT_S=$((hs - 5)) BUDGET_S=$((hs / 2)) bash bench/gpu_run_history.sh
part fp8 "$fs" env DEADLINE=$((fs - 25)) bash bench/gpu_run_fp8.sh
part fuse "$us" env DEADLINE=$((us - 80)) bash bench/gpu_run_fuse.sh
echo "[$(date -u +%T)] gpu_run_inprocess: done; files: $(ls "$OUT" | tr '\n' ' ')"
