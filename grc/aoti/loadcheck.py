"""Load and run a freshly compiled package in a child process, before grc loads it itself.

Why a child: a package whose model .so crashes its loader (seen on lent H200s: SIGSEGV in
``std::regex`` inside the .so, see ``grc.aoti.build.compiler_shim``) would otherwise kill
``grc build`` with no message and a half-written stage. In a child the crash becomes a
``StageError`` that names the package, the signal, the compiler and the child's last lines.

    python -m grc.aoti.loadcheck PACKAGE DEVICE DTYPE MODEL_CONFIG_JSON   (what the parent runs)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from grc.errors import StageError
from grc.spec.schema import ModelConfig

TIMEOUT_S = 900  # a cold CUDA package load (kernel images, weights to the GPU) took ~55 s on an H200


def check_loads(path: Path, device: str, dtype: str, cfg: ModelConfig, what: str, compiler: str | None) -> None:
    """Raise StageError unless ``path`` loads and runs a small ragged batch in a fresh process."""
    cmd = [sys.executable, "-X", "faulthandler", "-m", __name__, str(path), device, dtype, cfg.model_dump_json()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # grc and kernels as here
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as exc:
        raise StageError(f"{what}: loading the package {path} in a fresh process took over {TIMEOUT_S}s") from exc
    if done.returncode == 0:
        return
    rc = done.returncode
    how = f"crashed ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() else f"failed (exit {rc})"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
    raise StageError(
        f"{what}: the compiled package {path} {how} when loaded and run in a fresh process "
        f"(C++ compiler: {compiler or 'none found'}). Last lines:\n{tail}\n"
        f"{_advice(compiler) if rc < 0 else ''}"
    )


def _advice(compiler: str | None) -> str:
    """What to try: a crash inside the model .so followed the compiler on the lent H200 image
    ($CXX=/opt/gcc/bin/g++ there crashed, /usr/bin/g++ loaded: bench/results/aoti-probe-h200.json)."""
    from grc.aoti.build import SYSTEM_CXX

    if compiler != SYSTEM_CXX and os.access(SYSTEM_CXX, os.X_OK):
        how = f"this host has {SYSTEM_CXX}: rebuild with CXX={SYSTEM_CXX}"
    else:
        how = "rebuild with another compiler: CXX=/path/to/g++"
    return (
        f"A crash inside the model .so has followed the compiler before (grc.aoti.build.cxx_compiler); {how} "
        "(`python bench/gpu_aoti_probe.py` tries every g++ here)."
    )


def main(argv: list[str]) -> None:
    import torch

    from grc.aoti.build import DTYPES
    from grc.aoti.inputs import random_inputs
    from grc.aoti.runtime import load

    package, device, dtype = Path(argv[0]), argv[1], DTYPES[argv[2]]
    cfg = ModelConfig.model_validate_json(argv[3])
    run = load(package, device)
    inputs = random_inputs(cfg, 3, 6, 3, torch.Generator().manual_seed(0)).to(device, dtype)
    scores = run(*inputs.args())
    if scores.shape != (inputs.tokens.shape[0], len(cfg.tasks)) or not bool(torch.isfinite(scores).all()):
        raise SystemExit(f"unexpected scores: shape {tuple(scores.shape)}, finite {bool(torch.isfinite(scores).all())}")
    print(f"loaded and ran: {tuple(scores.shape)}")


if __name__ == "__main__":
    main(sys.argv[1:])
