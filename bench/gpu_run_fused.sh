#!/usr/bin/env bash
# One device call, start to end (< 9 minutes): the fused Triton serving path on the GPU (issue 16),
# bench/fused_gpu_check.py. Installs what grc imports beyond torch + triton from ./.whl (pydantic, doit,
# tritonclient, nvidia-pytriton: tritonserver comes from that wheel) into /tmp/site, then runs the check.
#
#     OUT=/some/dir bash bench/gpu_run_fused.sh
#     DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_fused.sh     # on a CPU: Triton interpreter, KIND_CPU serving
#
# Exit status: the check's (1: a section failed, 2: no GPU).
set -u
cd "$(dirname "$0")/.."
# The lent H200 image sets CXX=/opt/gcc/bin/g++, whose AOTInductor packages crash when loaded;
# /usr/bin/g++ (the same GCC) builds packages that load (bench/results/aoti-probe-h200.json).
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
echo "== environment ($(date -u +%T))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
if [ -z "${DRY_RUN:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  export GRC_TRITON_HOME=/tmp/site   # tritonserver from the nvidia-pytriton wheel
fi
export GRC_CACHE_DIR="${GRC_CACHE_DIR:-/tmp/grc-cache}"
"$PY" -c "import torch, triton, pydantic, doit, tritonclient; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  || { echo "missing a dependency: bring the wheels in .whl (pydantic, doit, tritonclient, nvidia-pytriton)"; exit 2; }
echo "== fused GPU check ($(( $(date +%s) - started )) s in)"
budget="${BUDGET_S:-420}"
timeout $(( budget + 80 )) "$PY" bench/fused_gpu_check.py --out-dir "$OUT" --budget-s "$budget" ${DRY_RUN:+--dry-run}
rc=$?
[ $rc -eq 124 ] && echo "fused_gpu_check: TIMED OUT after $(( budget + 80 )) s (partial JSON kept in $OUT)"
echo "total $(( $(date +%s) - started )) s; results in $OUT"
exit $rc
