#!/usr/bin/env bash
# One device call, start to end: the served benchmark (bench/serve.py) of a GPU spec's fused Triton bundle.
#   OUT=/some/folder bash bench/gpu_run_serve.sh mtgr-small-gpu      # one spec per call (mtgr-base-gpu: another)
#   DRY_RUN=1 OUT=/tmp/x bash bench/gpu_run_serve.sh SPEC           # on a CPU: every step but the GPU checks
#   OUT=/some/folder bash bench/gpu_run_serve.sh                     # the GPU tests (step 4) alone: ~4 minutes
# SPEC is a name under specs/ or a path. From the repository root of a checkout (or a copy of one).
#  1. the carried wheels (.whl: pydantic, doit, tritonclient, nvidia-pytriton, ...) into /tmp/site, found by this
#     process through PYTHONPATH and by the python backend's stub through a .pth file (the stub runs an
#     isolated interpreter that ignores PYTHONPATH); GRC_TRITON_HOME=/tmp/site finds pytriton's tritonserver
#     (bench/gpu_serve_env.sh, shared with bench/gpu_run_history_served.sh);
#  2. `grc build SPEC triton` (only what the bundle needs: weights, export, aoti, triton) into /tmp; if that
#     fails (the CUDA package did not build or load), the same bundle without aotinductor is built and the grc
#     and in_process rows are reported failed with the build's reason while eager and kernels still run;
#  3. bench/serve.py (concurrency 32, 8, 1; MODES, default grc eager in_process; its --deadline from what is
#     left; the in_process Ranker loads while the server does) -> $OUT/serve-<gpu>-<spec>.json, rewritten after
#     every row;
#  4. gpuserve's GPU tests (tests/serving/test_fused_gpu_real.py, when present) with the time left, after the
#     benchmark so that a hanging test cannot cost the figures -> $OUT/gpu-tests.log.
#     GPU_TESTS=0 leaves them out (a call that only measures).
# Everything is logged with timestamps to $OUT/serve-run.log (+ build-<spec>.log). BUDGET (default 530 s) bounds
# the whole call: under 9 minutes with the machine's start-up outside it.
set -u -o pipefail
cd "$(dirname "$0")/.."
# The lent H200 image sets CXX=/opt/gcc/bin/g++, whose AOTInductor packages crash when loaded;
# /usr/bin/g++ (the same GCC) builds packages that load (bench/results/aoti-probe-h200.json).
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
: "${OUT:?set OUT to the folder the results go to}"
# no SPEC: the GPU tests alone (step 4), for a call that only checks
[ $# -ge 1 ] || [ "${GPU_TESTS:-1}" != 0 ] || { echo "usage: OUT=DIR bash bench/gpu_run_serve.sh SPEC [SPEC...]" >&2; exit 2; }
mkdir -p "$OUT"
started=$(date +%s)
BUDGET=${BUDGET:-530}
ROW_SECONDS=${ROW_SECONDS:-6}
# kernels (<model>-pytorch_kernels) is the extra row: measured in run 1, left out by default so that grc, eager and
# in_process fit a call after a ~4-minute build (its model would also lengthen the server's start)
MODES=${MODES:-grc eager in_process}
IN_PROCESS=${IN_PROCESS:-32 8}  # in_process batch sizes (the targets compare at 32; p99/p50 at 8)
CLIENTS=${CLIENTS:-4}  # client processes per served row: one Python gRPC client process is GIL-bound
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GRC_CACHE_DIR="${GRC_CACHE_DIR:-/tmp/grc-serve-cache}"
ARTIFACTS="${ARTIFACTS:-/tmp/grc-serve-artifacts}"
LOG="$OUT/serve-run.log"

# the time helpers (elapsed, left, stamp, say), the environment into the log, the wheels into /tmp/site, the stub's .pth
# shellcheck source=bench/gpu_serve_env.sh
. bench/gpu_serve_env.sh

status=0
count=$#
for spec in "$@"; do
  file="$spec"; [ -f "$file" ] || file="specs/$spec.yaml"
  [ -f "$file" ] || { say "no spec $spec (tried $spec, specs/$spec.yaml)"; status=1; continue; }
  name="$(basename "$file" .yaml)"
  share=$(( $(left) / count )); count=$(( count - 1 ))
  spec_end=$(( $(elapsed) + share ))
  say "$name: build of the triton bundle ($share s for this spec)"
  grc_failed=()
  if ! timeout $(( share - 150 > 60 ? share - 150 : 60 )) "$PY" -m grc.cli build "$file" triton \
      --artifacts "$ARTIFACTS" 2>&1 | stamp | tee "$OUT/build-$name.log" >>"$LOG"; then
    # grc's own words: from the failed stage's line (✗ STAGE failed) to the build's summary, timestamps cut
    reason="$(sed 's/^\[[^]]*\] //' "$OUT/build-$name.log" | awk '/^✗ /{f=1} /^grc build .*FAILED/{f=0} f' \
      | head -n 6 | cut -c 1-300 | tr '\n' ' ')"
    reason="${reason:-no stage failure logged (killed by the time limit?): $(tail -n 1 "$OUT/build-$name.log")}"
    say "$name: build FAILED ($reason); building the bundle without aotinductor (eager and kernels rows)"
    fallback="/tmp/$name-without-aoti.yaml"
    printf 'extends: %s\nbundles: {triton: {backend: pytorch, extra_backends: [pytorch_kernels]}}\n' \
      "$(realpath "$file")" >"$fallback"
    timeout $(( spec_end - $(elapsed) - 90 > 30 ? spec_end - $(elapsed) - 90 : 30 )) "$PY" -m grc.cli build \
      "$fallback" triton --artifacts "$ARTIFACTS" 2>&1 | stamp | tee -a "$OUT/build-$name.log" >>"$LOG" \
      || { say "$name: the bundle without aotinductor did not build either"; status=1; continue; }
    file="$fallback"
    grc_failed=(--grc-failed "grc build of the aotinductor bundle failed: $reason")
    case " $MODES " in *" kernels "*) ;; *) MODES="$MODES kernels" ;; esac  # grc's rows lost: time for kernels
  fi
  deadline=$(( spec_end - $(elapsed) - 25 ))
  say "$name: bench/serve.py (--deadline $deadline s, $ROW_SECONDS s per row)"
  slug="$("$PY" -c 'import sys; sys.path.insert(0, "bench"); from serve import device_slug; print(device_slug())')"
  # shellcheck disable=SC2086  # MODES and IN_PROCESS are word lists
  timeout $(( deadline + 20 )) "$PY" bench/serve.py --specs "$file" --artifacts "$ARTIFACTS" --concurrency 1 8 32 \
    --modes $MODES --in-process-concurrency $IN_PROCESS \
    --row-seconds "$ROW_SECONDS" --client-processes "$CLIENTS" --deadline "$deadline" --out "$OUT/serve-$slug-$name.json" "${grc_failed[@]}" \
    2>&1 | stamp | tee -a "$LOG"
  rc=$?
  if [ $rc -eq 124 ]; then say "$name: bench/serve.py TIMED OUT (its JSON keeps the rows done)"; status=1
  elif [ $rc -ne 0 ]; then say "$name: bench/serve.py exit $rc (failed or wrong rows: NOT CLEAN lines above)"; status=1
  fi
done

tests=tests/serving/test_fused_gpu_real.py
if [ ! -f "$tests" ]; then
  say "GPU tests: skipped ($tests is not in this checkout)"
elif [ -n "${DRY_RUN:-}" ]; then
  say "GPU tests: skipped (dry run: no GPU)"
elif [ "${GPU_TESTS:-1}" = 0 ]; then
  say "GPU tests: skipped (GPU_TESTS=0)"
elif [ "$(left)" -lt 45 ]; then
  say "GPU tests: skipped ($(left) s left of BUDGET $BUDGET s)"
else
  say "GPU tests: $tests ($(( $(left) - 10 )) s at most)"
  timeout $(( $(left) - 10 )) "$PY" -m pytest -q -p no:cacheprovider "$tests" 2>&1 | stamp >"$OUT/gpu-tests.log"
  say "GPU tests: exit $? ($(tail -n 1 "$OUT/gpu-tests.log"))"
fi
say "done in $(elapsed) s; exit $status; files: $(ls "$OUT" | tr '\n' ' ')"
exit $status
