# Sourced by the bench/gpu_run_*.sh scripts, from the repository root: sets $py (the Python to run) and puts
# the checkout on PYTHONPATH, with what grc imports beyond torch + triton (pydantic, PyYAML) unpacked from
# ./.whl when this Python lacks it (bench/gpu_wheels.sh fills .whl where PyPI is reachable). The wheels are
# unpacked into a temporary folder, not installed: the machine's Python stays as it was.
# The lent H200 image sets CXX=/opt/gcc/bin/g++, whose AOTInductor packages crash when loaded;
# /usr/bin/g++ (the same GCC) builds packages that load (bench/results/aoti-probe-h200.json).
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$py" -c "import pydantic, yaml" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "$(basename "$0"): pydantic or PyYAML is missing and ./.whl holds no wheels: run bench/gpu_wheels.sh" \
      "where PyPI is reachable and bring .whl along" >&2
    exit 2
  fi
  deps="$(mktemp -d)/site"
  for wheel in .whl/*.whl; do "$py" -m zipfile -e "$wheel" "$deps"; done
  export PYTHONPATH="$PYTHONPATH:$deps"
fi

# the call's steps, timed from here, and what the machine is (every bench/gpu_run_*.sh that sources this prints them)
started=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - started )) s in)"; }
gpu_environment() {
  step "environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
}
# A device call's start, for the scripts that write into $OUT: OUT set (else the call stops, saying so) and made,
# Python unbuffered (each step's lines reach the log as they happen), the machine printed.
gpu_call() {
  : "${OUT:?set OUT to the folder the results go to}"
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1
  gpu_environment
}
