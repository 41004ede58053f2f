#!/usr/bin/env bash
# The wheels the device scripts (bench/gpu_run_*.sh) need beyond torch + triton, downloaded into ./.whl (git-ignored) on a
# machine that reaches PyPI, for a GPU machine that reaches nothing (carry .whl there). CPython 3.12, x86-64.
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The nvidia-pytriton wheel (tritonserver, for the served device runs) bundles a python-backend stub per CPython
# 3.8..3.13 and libpython 3.13 for the 3.13 stub; the device's Python is 3.12 and the working tree that travels is
# capped at 64 MiB. `slim` keeps the 3.12 stub only (-16 MB; RECORD loses the removed files' lines), which leaves
# room for the wheels tritonclient's HTTP client imports (gevent, geventhttpclient, greenlet, zope.*, brotli):
#   bash bench/gpu_wheels.sh slim .whl/nvidia_pytriton-*.whl
if [ "${1:-}" = slim ]; then
  shift
  for wheel in "$@"; do
    "${PYTHON:-python3}" - "$wheel" <<'PY'
import os
import re
import sys
import zipfile

path = sys.argv[1]
drop = re.compile(r"python_backend_stubs/3\.(8|9|10|11|13)/|nvidia_pytriton\.libs/libpython3-[0-9a-f]+\.13\.so")
tmp = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if drop.search(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if not drop.search(line.decode()))
        out.writestr(info, data)
os.replace(tmp, path)
print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB")
PY
  done
  exit 0
fi
# The set the device calls carry (session 6: 48.8 MB with the slimmed pytriton wheel), pinned: two versions of one
# package in .whl stop the whole install there. pydantic & co. and doit: grc; tritonclient, python-rapidjson and the
# HTTP client's gevent set: bench/serve.py and `grc deploy`'s smoke test; nvidia-pytriton: tritonserver.
# .whls (the in-process runs) is the same without nvidia-pytriton.
"${PYTHON:-$(command -v python3 || command -v python)}" -m pip download -q --no-deps --only-binary=:all: \
  --implementation cp --python-version 3.12 --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl \
  pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 doit==0.37.0 \
  tritonclient==2.73.0 python-rapidjson==1.25 nvidia-pytriton==0.7.0 \
  gevent==26.9.0 geventhttpclient==2.6.1 greenlet==3.5.6 zope.event==6.2 zope.interface==8.7 brotli==1.2.1
bash "$0" slim .whl/nvidia_pytriton-*.whl
ls .whl
