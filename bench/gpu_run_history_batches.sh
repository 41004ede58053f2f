#!/usr/bin/env bash
# One device call (~2-3 minutes on a fresh H200): several users per cached score step (bench/history_cache_batches.py,
# mtgr-base bf16, 1/2/4/8/16 users per step, each a cached history of ~1,000 events + 10 new + 256 candidates):
# the first step's cost per batch size, steady steps, users/s vs the uncached step in a graph, batched vs one-user
# scores; Triton's autotuning printed as it happens -> $OUT/history-cache-batches-h200.json and .log.
#   OUT=/some/folder bash bench/gpu_run_history_batches.sh
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_history_batches.sh     # on a CPU: mtgr-tiny, Triton interpreter
# pydantic and PyYAML come from ./.whl when missing (bench/gpu_python.sh; no pytriton needed: carry the set
# without nvidia_pytriton). LIMIT_S (default 300) kills it; no new batch size after DEADLINE_S (default 220).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
# shellcheck source=bench/gpu_python.sh
. bench/gpu_python.sh
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
flags=(--spec mtgr-base); name=history-cache-batches-h200
if [ -n "${DRY_RUN:-}" ]; then
  export TRITON_INTERPRET=1
  flags=(--spec tests/specs/mtgr-tiny.yaml --users 1,2 --history 60 --candidates 8 --repeat 2 --mixed-steps 4)
  name=history-cache-batches-dry
fi
timeout "${LIMIT_S:-300}" "$py" bench/history_cache_batches.py "${flags[@]}" --deadline-s "${DEADLINE_S:-220}" \
  --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
rc=${PIPESTATUS[0]}
echo "history_cache_batches.py: exit $rc; files: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
