#!/usr/bin/env bash
# One device call (~2 minutes): where the eager history-cache step's host time goes on the GPU
# (bench/history_cache_profile.py: mtgr-small bf16, history max_seq_len - 256 x 256 candidates; full forward,
# cached score, planned score; wall, kernels, syncs, host ops, cProfile) -> $OUT/history-cache-profile-h200.json
# and $OUT/history-cache-profile-h200.log.
#   OUT=/some/folder bash bench/gpu_run_history_profile.sh
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_history_profile.sh     # on a CPU: a tiny shape, Triton interpreter
#   TAG=base1000 PROFILE_ARGS="--spec mtgr-base --history 1000 --paths graphs_score,full_forward" OUT=... bash ...
# pydantic and PyYAML come from ./.whl when missing (the .whls set: no pytriton needed), as gpu_run_history.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$py" -c "import pydantic, yaml" 2>/dev/null; then
  deps="$(mktemp -d)/site"
  for wheel in .whl/*.whl; do "$py" -m zipfile -e "$wheel" "$deps"; done
  export PYTHONPATH="$PYTHONPATH:$deps"
fi
flags=(); name=history-cache-profile-h200
if [ -n "${DRY_RUN:-}" ]; then export TRITON_INTERPRET=1; flags=(--dry-run); name=history-cache-profile-dry; fi
name="$name${TAG:+-$TAG}"
# shellcheck disable=SC2086  # PROFILE_ARGS: more flags, word-split on purpose (e.g. --spec mtgr-base --history 1000)
timeout "${LIMIT_S:-240}" "$py" bench/history_cache_profile.py "${flags[@]}" ${PROFILE_ARGS:-} --out "$OUT/$name.json" 2>&1 \
  | grep -v '^USDT:' | tee "$OUT/$name.log"
