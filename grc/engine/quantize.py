"""int8 / fp8 Q/DQ graphs for TensorRT engines: NVIDIA ModelOpt's ONNX post-training quantization
of the surgeried graph, calibrated on the CPU.

Why ModelOpt (and not onnxruntime's ``quantize_static``): both calibrate by running the graph in
an onnxruntime session of their own, and neither takes a custom-op library for it (ModelOpt's
route for plugins is the TensorRT execution provider: a GPU). grc's ``grc::HSTUAttention`` runs in
onnxruntime as an onnxruntime-extensions Python op, so the worker (its own process) moves those
nodes to the extensions' domain and has every session it opens register the extensions library;
with that, ModelOpt 0.47 quantizes hstu-tiny in about a second per precision (int8 and fp8, CPU),
inserts the Q/DQ pairs TensorRT expects (``op_types_to_exclude`` keeps the attention node whole)
and its output builds with TensorRT-RTX (sm80 int8, sm89 fp8). ModelOpt is the tool TensorRT
documents for Q/DQ placement, and does fp8 as well as int8; onnxruntime's quantizer does int8 and
fp8 Q/DQ too but places them for onnxruntime's kernels.

ModelOpt is installed on first use with ``pip install --no-deps --target`` into grc's cache folder
(``<cache>/modelopt/<version>``), never into the running Python: its ``[onnx]`` extra pins
onnx~=1.21 and onnxruntime-gpu, which would replace grc's onnx/onnxruntime. It runs in a child
process with that folder on its path; the few modules it imports beyond grc's own dependencies
(``EXTRA``, measured from ``sys.modules`` after an int8 and an fp8 run) come along.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from grc.errors import StageError
from grc.spec.schema import QUANTIZED_PRECISIONS

MODELOPT = ("nvidia-modelopt", "0.47.0")
EXTRA = ("tqdm==4.70.1", "onnxslim==0.1.98", "lief==1.0.0", "nvidia-ml-py==13.615.71")
MODE = {"int8": "int8", "fp8": "fp8"}  # engine.precision -> ModelOpt quantize_mode
# The dense GEMMs only (the uvqk projections and outputs). Left to itself ModelOpt also quantizes the
# graph's input tokens, the residual adds and the gate multiply (Q/DQ on 13 tensors of hstu-tiny):
# measured on hstu-tiny's ranking users, that cost int8 Kendall tau 0.89-0.94 and fp8 0.77-0.80 vs fp32.
QUANTIZED_OPS = ("MatMul", "Gemm")
EXCLUDED_OPS = ("HSTUAttention",)  # grc::HSTUAttention stays a float plugin layer
INSTALLED = ".grc-installed"  # written last: a folder without it is a half-finished install


def quantized_precisions(spec: Any) -> list[str]:
    """The quantized precisions some engine target asks for, in a fixed order."""
    wanted = {spec.engine.precision_of(t) for t in spec.engine.targets}
    return [p for p in QUANTIZED_PRECISIONS if p in wanted]


def feeds_digest(feeds: dict[str, np.ndarray]) -> str:
    """sha256 over every calibration array's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(feeds):
        a = np.ascontiguousarray(feeds[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def modelopt_site(cache: Path) -> Path:
    """The folder that holds ModelOpt (installed there on first use)."""
    from grc.build.lock import FileLock

    site = cache / "modelopt" / MODELOPT[1]
    if (site / INSTALLED).exists():
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(site.parent / f"{MODELOPT[1]}.lock"):
        if (site / INSTALLED).exists():
            return site
        shutil.rmtree(site, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            str(site),
            f"{MODELOPT[0]}=={MODELOPT[1]}",
            *EXTRA,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(site, ignore_errors=True)
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise StageError(
                f"quantize: installing {MODELOPT[0]}=={MODELOPT[1]} into {site} failed (int8/fp8 "
                f"engines need it; a host without PyPI can copy that folder from one with it):\n{tail}"
            )
        (site / INSTALLED).write_text(json.dumps({"packages": [f"{MODELOPT[0]}=={MODELOPT[1]}", *EXTRA]}))
    return site


def quantize(src: Path, dst: Path, precision: str, feeds: Path, site: Path, scratch: Path) -> dict[str, Any]:
    """Run ModelOpt on ``src`` (a surgeried graph) in a child process; the Q/DQ graph lands at
    ``dst``. Returns the worker's report (tool version, node counts, calibration method)."""
    src, dst, feeds, scratch = (p.resolve() for p in (src, dst, feeds, scratch))  # the worker runs in scratch
    scratch.mkdir(parents=True, exist_ok=True)
    request = scratch / f"quantize-{precision}.json"
    result = scratch / f"quantize-{precision}-result.json"
    result.unlink(missing_ok=True)
    request.write_text(
        json.dumps(
            {
                "onnx": str(src),
                "output": str(dst),
                "mode": MODE[precision],
                "feeds": str(feeds),
                "ops": list(QUANTIZED_OPS),
                "exclude": list(EXCLUDED_OPS),
                "scratch": str(scratch),
                "result": str(result),
            }
        )
    )
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, str(site), env.get("PYTHONPATH", "")) if p)
    # in the scratch folder: ModelOpt and onnxruntime's shape inference leave files in the working
    # directory (<uuid>.data, sym_shape_infer_temp.onnx)
    done = subprocess.run(
        [sys.executable, "-m", "grc.engine.quantize_worker", str(request)],
        env=env,
        capture_output=True,
        text=True,
        cwd=scratch,
    )
    report = json.loads(result.read_text()) if result.exists() else None
    if report is None or not report.get("ok"):
        why = report["error"] if report else "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        dst.unlink(missing_ok=True)  # nothing half-written left behind
        raise StageError(f"quantize: ModelOpt {precision} quantization of {src.name} failed: {why}")
    return dict(report)
