#!/usr/bin/env bash
# The wheels bench/gpu_run_e2e.sh needs beyond torch + triton, downloaded into ./.whl (git-ignored) on a
# machine that reaches PyPI, for a GPU machine that reaches nothing (carry .whl there). CPython 3.12, x86-64.
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-$(command -v python3 || command -v python)}" -m pip download -q --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic pyyaml
ls .whl
