#!/usr/bin/env bash
# bench/quant_fp8.py on a GPU machine, start to end, in DEADLINE seconds (default 150, plus ~10 s of start):
# bf16 vs fp8 dense GEMMs (torch._scaled_mm e4m3, row-wise scales, fast accumulation) of mtgr-small then
# mtgr-base (64 users x 1,515 tokens), each spec with half of DEADLINE: three models side by side (bf16;
# "fp8": the package's GEMM set, the output projections; "fp8_all": every GEMM), eager and torch.compile'd,
# CUDA-graphed, same run and inputs; each GEMM alone, the uvqk one taken apart (quantize, row-wise
# fast/slow accumulation, tensor-wise), with the Amdahl bound; ranking figures of every model vs the fp32
# model (verify.ranking's users and gates). Estimated from session 6's run (H200): ~75 s per spec; what
# does not fit its share is skipped with a line saying so, last parts first: compiled_fp8_all, then
# compiled_fp8. Writes $OUT/quant-fp8-h200.json (provenance through bench/_common.write_result; without
# git it records the source digest) and $OUT/quant-fp8-h200.log.
#   OUT=/some/folder bash bench/gpu_run_fp8.sh
#   PACKAGE=1 DEADLINE=400 OUT=... bash bench/gpu_run_fp8.sh   (adds the AOTInductor fp8 package: ~95 s compile)
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_fp8.sh   (a CPU, ~1 min: bench/quant_fp8.py --smoke, hstu-tiny:
#                                                     eager, ranking, compiled bf16 and fp8; no GEMM part)
# From the repository root of a checkout (or a copy). Needs Python with CUDA torch and triton; pydantic and
# PyYAML come from ./.whl when missing (bench/gpu_wheels.sh fills it where PyPI is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
source bench/gpu_python.sh  # sets $py and PYTHONPATH (unpacks ./.whl when needed)
echo "[$(date -u +%H:%M:%S)] gpu_run_fp8.sh: start"
if [ "${DRY_RUN:-0}" = 1 ]; then
  "$py" bench/quant_fp8.py --smoke --out "$OUT/quant-fp8-dry-run.json" 2>&1 | tee "$OUT/quant-fp8-dry-run.log"
else
  "$py" -c "import torch, triton; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  extra=()
  [ "${PACKAGE:-0}" = 1 ] && extra=(--package)
  "$py" bench/quant_fp8.py --specs "${SPECS:-mtgr-small,mtgr-base}" --deadline "${DEADLINE:-150}" ${extra[@]+"${extra[@]}"} \
    --out "$OUT/quant-fp8-h200.json" 2>&1 | tee "$OUT/quant-fp8-h200.log"
fi
echo "[$(date -u +%H:%M:%S)] gpu_run_fp8.sh: done"
