#!/usr/bin/env bash
# One device call, start to end (150 s by default): the user-history cache in-process on the GPU through grc's
# Triton kernels (bench/history_cache_device.py), mtgr-small then mtgr-base, bf16 then fp32, full forward vs
# cached score, eager and CUDA graph, exactness vs float64. What comes in what time on an H200 (lead's estimate
# from session 6's run and the sm_90 compile times measured on the CPU host, bench/results/history-cache-notes.md):
#   +~10 s   environment, imports, CUDA;
#   +~60 s   THE ISSUE'S TARGET SHAPE, first: mtgr-small bf16, history max_seq_len - 256 (1789) x 256
#            candidates, cached score vs full forward (+ prefill, CUDA graphs, +10 events, exactness). Nearly
#            all of it is Triton compiling the attention kernel: its calls share one autotuning key, so 4
#            configs of the head-dim-256 kernel (4-5 s each on the CPU host, ~7-9 s estimated on the H200's)
#            + 1 specialisation; the float64 oracle (PyTorch reference on the GPU) takes well under a second;
#   +~35 s   the served model's scorer (served_check: mtgr-tiny, float32 and bf16);
#   then     further shapes while their estimated cost fits: 1000 x 256 tunes one more key (~45 s), mtgr-base and
#            fp32 tune their own; the session workload (3 x 10 s) after the bf16 shapes.
# Every phase prints a timestamped line as it starts (a cut run shows where it was), TRITON_PRINT_AUTOTUNING=1
# prints each autotuning's key, seconds and pick, and $OUT/history-cache-h200.json is rewritten after every
# phase (a cut run keeps what it measured, the cut row says which phase it did not start). Writes
# $OUT/history-cache-h200.json and $OUT/history-cache-h200.log.
#   OUT=/some/folder bash bench/gpu_run_history.sh
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_history.sh     # on a CPU: tiny shapes, Triton interpreter
# From the repository root of a checkout (or a copy). Needs Python with CUDA torch and triton; pydantic and
# PyYAML come from ./.whl when missing (bench/gpu_wheels.sh fills it where PyPI is reachable), unpacked into
# a temporary folder (the machine's Python stays as it was). Time: LIMIT_S (default 150; dry run 600) kills
# it; nothing starts that its estimate says would end past LIMIT_S - 10 (--deadline-s), no new shape after
# BUDGET_S (default: none), and one shape's phases stop starting after SHAPE_S (default 90) s. A second call on
# the same warm machine reuses Triton's compiled kernels (~/.triton/cache): far less compile time. NAME (default
# history-cache-h200) names the two files; BENCH_FLAGS passes more options to the bench.
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
  name=${NAME:-history-cache-h200}
fi
# BENCH_FLAGS: more of the bench's own options, e.g. "--specs mtgr-base --dtypes bfloat16 --no-served-check"
read -r -a more <<< "${BENCH_FLAGS:-}"
flags+=("${more[@]}")
limit="${LIMIT_S:-$([ -n "${DRY_RUN:-}" ] && echo 600 || echo 150)}"  # the interpreter on a CPU is slow
left=$((limit - $(date +%s) + started))  # the bench's own clock starts now: its limits count from here
export TRITON_PRINT_AUTOTUNING=1 PYTHONUNBUFFERED=1
stamp "bench/history_cache_device.py (killed in $left s, at +$limit s)"
timeout "$left" "$py" bench/history_cache_device.py --budget-s "${BUDGET_S:-$left}" --deadline-s $((left - 10)) \
  --shape-s "${SHAPE_S:-90}" --out "$OUT/$name.json" "${flags[@]}" 2>&1 | tee "$OUT/$name.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "history_cache_device.py: TIMED OUT at +$limit s (the JSON holds the phases done)"
stamp "done (exit $rc); results in $OUT"
exit "$rc"
