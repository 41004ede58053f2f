#!/usr/bin/env bash
# bench/e2e.py on a GPU machine, start to end: the PyTorch baselines and grc's paths for one spec, every mode
# in one process on the same inputs, the per-op profile included. Writes $OUT/e2e-<spec>.json (provenance
# through bench/_common.write_result; without git it records the source digest: `python bench/_common.py`
# at a commit prints the digest to match) and $OUT/e2e-<spec>.log.
#   OUT=/some/folder bash bench/gpu_run_e2e.sh [mtgr-small|mtgr-base] [more bench/e2e.py flags]
# From the repository root of a checkout (or a copy of one). Needs Python with CUDA torch and triton; what grc
# imports beyond them (pydantic, PyYAML) comes from ./.whl when missing (bench/gpu_wheels.sh fills it where
# PyPI is reachable). The whole run is bounded by DEADLINE seconds (default 480: under 9 minutes with start-up);
# mtgr-base is a second call. FIRST="script.py args" runs that bench script first (FIRST_TIMEOUT s, default 90).
set -euo pipefail
cd "$(dirname "$0")/.."
spec="${1:-mtgr-small}"
shift || true
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
source bench/gpu_python.sh  # sets $py and PYTHONPATH (unpacks ./.whl when needed)
"$py" -c "import torch, triton, pydantic, yaml; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ -n "${FIRST:-}" ]; then  # another bench script to run first, in this environment (e.g. bench/fused_gemm.py)
  # shellcheck disable=SC2086  # FIRST is a script and its arguments
  timeout "${FIRST_TIMEOUT:-90}" "$py" $FIRST 2>&1 | tee "$OUT/first.log" || echo "FIRST ($FIRST) failed or timed out"
fi
"$py" bench/e2e.py --specs "$spec" --profile --deadline "${DEADLINE:-480}" --out "$OUT/e2e-$spec.json" "$@" \
  2>&1 | tee "$OUT/e2e-$spec.log"
