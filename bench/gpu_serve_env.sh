# Sourced by the device scripts that start tritonserver (bench/gpu_run_serve.sh, bench/gpu_run_history_served.sh),
# from the repository root, after they set started (the start, date +%s), BUDGET (seconds), PY (the Python) and
# LOG (their log file); DRY_RUN set: nothing is written outside $OUT and /tmp.
#  0. defines elapsed and left (seconds since the start, seconds of BUDGET left), stamp (prefixes each line with
#     the time) and say (logs one line);
#  1. the environment (GPU, Python, torch, libpython) into the log;
#  2. the carried wheels (.whl: pydantic, doit, tritonclient, nvidia-pytriton, ...) into /tmp/site, found by this
#     process through PYTHONPATH and by the python backend's stub through a .pth file (the stub runs an isolated
#     interpreter that ignores PYTHONPATH); GRC_TRITON_HOME=/tmp/site finds pytriton's tritonserver;
#  3. grc, its dependencies and tritonserver importable and found, or the calling script exits 1.
elapsed() { echo $(( $(date +%s) - started )); }
left() { echo $(( BUDGET - $(elapsed) )); }
stamp() { while IFS= read -r line; do printf '[%s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$(elapsed)" "$line"; done; }
say() { echo "== $*" | stamp | tee -a "$LOG"; }

say "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
  "$PY" - <<'EOF'
import sys, sysconfig, torch
print("python", sys.version.split()[0], sys.executable, "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
# the python backend's stub loads this interpreter's libpython (grc.serving.triton.server): is there one?
print("libpython:", sysconfig.get_config_var("Py_ENABLE_SHARED"), sysconfig.get_config_var("LIBDIR"),
      sysconfig.get_config_var("INSTSONAME"))
EOF
} 2>&1 | stamp | tee -a "$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
  say "wheels: $(ls .whl | wc -l) from .whl into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | stamp | tee -a "$LOG" || { say "FAILED: installing the wheels"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  [ -d /tmp/site/pytriton ] && export GRC_TRITON_HOME=/tmp/site
fi
# The stub's interpreter ignores PYTHONPATH: without grc and its dependencies importable as installed, hand it
# this checkout and /tmp/site through a .pth in the interpreter's own site-packages (a bare machine per call).
# (checked from / : python -c puts its working directory on sys.path, the stub's is a temporary folder)
if ! (cd / && env -u PYTHONPATH "$PY" -c "import grc, pydantic, yaml, doit, tritonclient" 2>/dev/null); then
  pth="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/grc-serve-bench.pth"
  if [ -n "${DRY_RUN:-}" ]; then
    say "dry run: would write $pth ($PWD, /tmp/site)"
  else
    printf '%s\n%s\n' "$PWD" /tmp/site >"$pth" && say "wrote $pth: the python backend's stub imports grc from $PWD" \
      || say "could not write $pth: the python backend's stub will not find grc"
  fi
fi
"$PY" -c "import grc, pydantic, doit, tritonclient.grpc; from grc.serving.triton.server import find_tritonserver; \
print('tritonserver:', find_tritonserver().origin)" 2>&1 | stamp | tee -a "$LOG" || { say "FAILED: imports"; exit 1; }
