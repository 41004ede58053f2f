#!/usr/bin/env bash
# One device call, start to end (about 3 minutes): the user-history cache in-process on the GPU through grc's
# Triton kernels (bench/history_cache_device.py): mtgr-small and mtgr-base, bf16 then fp32, full forward vs
# cached score at histories 1000 and max_seq_len - 256 x 256/512 candidates, eager and CUDA graph, with
# exactness vs float64, and a session workload (200 Zipf users x 5 visits, bench/history_cache_session.py).
# Writes $OUT/history-cache-h200.json (rewritten after every shape: a cut run keeps what it measured) and
# $OUT/history-cache-h200.log.
#   OUT=/some/folder bash bench/gpu_run_history.sh
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_history.sh     # on a CPU: tiny shapes, Triton interpreter
# From the repository root of a checkout (or a copy). Needs Python with CUDA torch and triton; pydantic and
# PyYAML come from ./.whl when missing (bench/gpu_wheels.sh fills it where PyPI is reachable), unpacked into
# a temporary folder (the machine's Python stays as it was). Budget: no new shape after BUDGET_S (default
# 95) seconds, the session workload 3 x 10 s after the bf16 shapes, the whole step killed after LIMIT_S
# (default 175).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-$(command -v python3 || command -v python)}"
started=$(date +%s)
stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - started )) s] $*"; }
if ! "$py" -c "import pydantic, yaml" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_run_history.sh: pydantic or PyYAML is missing and ./.whl holds no wheels" >&2
    exit 2
  fi
  deps="$(mktemp -d)/site"
  for wheel in .whl/*.whl; do "$py" -m zipfile -e "$wheel" "$deps"; done
  export PYTHONPATH="$PYTHONPATH:$deps"
fi
stamp "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
"$py" -c "import torch, triton, pydantic, yaml; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())"
if [ -n "${DRY_RUN:-}" ]; then
  export TRITON_INTERPRET=1
  flags=(--dry-run --specs mtgr-small --dtypes bfloat16,float32)
  name=history-cache-dry
else
  flags=()
  name=history-cache-h200
fi
stamp "bench/history_cache_device.py"
limit="${LIMIT_S:-175}"
timeout "$limit" "$py" bench/history_cache_device.py --budget-s "${BUDGET_S:-95}" --out "$OUT/$name.json" "${flags[@]}" \
  2>&1 | tee "$OUT/$name.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "history_cache_device.py: TIMED OUT after $limit s (the JSON holds the shapes done)"
stamp "done (exit $rc); results in $OUT"
exit "$rc"
