"""Which TensorRT toolkit can build an engine for which GPU, decided without importing either.

- ``tensorrt`` (full TensorRT) times kernels on the GPU it runs on, so it builds for the SM of a
  local GPU only; it is the toolkit for datacenter parts (H100/H200 = sm90, B200 = sm100).
- ``tensorrt_rtx`` (TensorRT-RTX) compiles ahead of time without a GPU for the SMs of its
  ``ComputeCapability`` enum (``RTX_SMS``); kernels are JIT-specialised on the target GPU at load.
  It has no sm90/sm100 target and rejects fp32 matrix products on sm75.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

RTX_SMS = (75, 80, 86, 89, 120, 121)  # TensorRT-RTX 1.x ComputeCapability (tests check it against the enum)
RTX_PIN = "tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116"
TOOLKIT_DISTRIBUTIONS = (  # for the stage keys: a toolkit upgrade rebuilds the engines
    "tensorrt-rtx-cu13-libs",
    "tensorrt-rtx-cu13-bindings",
    "tensorrt",
    "tensorrt-cu13-bindings",
    "tensorrt-cu12-bindings",
)
PREFERENCE = ("tensorrt", "tensorrt_rtx")  # "tensorrt where installed, tensorrt_rtx otherwise"


@dataclass(frozen=True)
class Toolkit:
    name: str  # "tensorrt" | "tensorrt_rtx"
    module: str  # what the worker imports
    version: str

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Gpu:
    name: str
    sm: int


@dataclass(frozen=True)
class Choice:
    toolkit: Toolkit | None  # None: no installed toolkit can build this target
    reason: str  # why this toolkit, or why none (and what to install)


def _version(*distributions: str) -> str:
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@cache
def installed() -> dict[str, Toolkit]:
    found: dict[str, Toolkit] = {}
    for module in ("tensorrt_rtx", "tensorrt_rtx_bindings"):  # the sdist adds the first name; the wheel has the second
        if _has_module(module):
            version = _version(
                "tensorrt-rtx-cu13-bindings", "tensorrt-rtx-cu12-bindings", "tensorrt-rtx-cu13", "tensorrt-rtx"
            )
            found["tensorrt_rtx"] = Toolkit("tensorrt_rtx", module, version)
            break
    for module in ("tensorrt", "tensorrt_bindings"):
        if _has_module(module):
            version = _version(
                "tensorrt", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings", "tensorrt-cu13", "tensorrt-cu12"
            )
            found["tensorrt"] = Toolkit("tensorrt", module, version)
            break
    return found


@cache
def local_gpus() -> tuple[Gpu, ...]:
    """GPUs of this host as nvidia-smi reports them (none without a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        name, _, cap = line.rpartition(",")
        major, _, minor = cap.strip().partition(".")
        if major.isdigit() and minor.isdigit():
            gpus.append(Gpu(name.strip(), int(major) * 10 + int(minor)))
    return tuple(gpus)


def install_hint(sm: int) -> str:
    if sm in RTX_SMS:
        return f"install TensorRT-RTX (pip install {RTX_PIN}) to build it on any host, GPU or not"
    return (
        f"run the same `grc build` on a host with an sm{sm} GPU and full TensorRT installed "
        "(pip install tensorrt-cu13; TensorRT builds for the GPU it runs on)"
    )


def can_build(toolkit: Toolkit, sm: int, precision: str, gpus: tuple[Gpu, ...]) -> tuple[bool, str]:
    if toolkit.name == "tensorrt":
        here = [g for g in gpus if g.sm == sm]
        if here:
            return True, f"{toolkit.label} on the local {here[0].name} (sm{sm})"
        seen = ", ".join(f"{g.name} (sm{g.sm})" for g in gpus) or "no GPU"
        return False, f"{toolkit.label} builds for the GPU it runs on, and this host has {seen}"
    if sm not in RTX_SMS:
        targets = "/".join(f"sm{s}" for s in RTX_SMS)
        return False, (
            f"{toolkit.label} targets {targets} only (no sm{sm}: datacenter Hopper/Blackwell are not RTX targets)"
        )
    if sm == 75 and precision == "fp32":
        return False, f"{toolkit.label} cannot compile fp32 matrix products for sm75 (Turing); use fp16 for this target"
    return True, f"{toolkit.label} compiles sm{sm} ahead of time (no GPU needed)"


def choose(
    sm: int,
    precision: str,
    wanted: str = "auto",
    toolkits: dict[str, Toolkit] | None = None,
    gpus: tuple[Gpu, ...] | None = None,
) -> Choice:
    """The first toolkit (full TensorRT, then TensorRT-RTX; or only ``wanted``) able to build sm/precision."""
    toolkits = installed() if toolkits is None else toolkits
    gpus = local_gpus() if gpus is None else gpus
    reasons = []
    for name in PREFERENCE if wanted == "auto" else (wanted,):
        toolkit = toolkits.get(name)
        if toolkit is None:
            reasons.append(f"{name} is not installed")
            continue
        ok, why = can_build(toolkit, sm, precision, gpus)
        if ok:
            return Choice(toolkit, why)
        reasons.append(why)
    # an installed toolkit that refused for a reason of its own (e.g. fp32 on sm75) already said what to change
    hint = "" if sm in RTX_SMS and "tensorrt_rtx" in toolkits else f" To build it: {install_hint(sm)}"
    return Choice(None, f"no installed toolkit can build sm{sm}: {'; '.join(reasons)}.{hint}")


def runnable_here(toolkit: Toolkit, sm: int) -> Gpu | None:
    """A local GPU that can run an engine built for ``sm`` by ``toolkit`` (parity needs one)."""
    return next((g for g in local_gpus() if g.sm == sm), None)


def worker_env(toolkit: Toolkit, scratch: Path) -> dict[str, str]:
    """Environment for ``python -m grc.engine.worker``.

    TensorRT-RTX 1.7's ONNX parser dlopen()s the unversioned ``libtensorrt_rtx.so`` when it meets a
    plugin node, but the wheel ships only ``libtensorrt_rtx.so.1``: the failed dlopen throws through a
    noexcept frame and the process aborts ("terminate called without an active exception"). The
    worker therefore gets a folder of ours holding that one symlink on its LD_LIBRARY_PATH (read at
    process start, hence the subprocess); site-packages stays untouched.
    """
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    if toolkit.name != "tensorrt_rtx":
        return env
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or spec.origin is None:
        return env
    libs = Path(spec.origin).parent
    if not (libs / "libtensorrt_rtx.so").exists():
        fix = scratch / "trt-rtx-lib"
        fix.mkdir(parents=True, exist_ok=True)
        link = fix / "libtensorrt_rtx.so"
        if not link.exists():
            link.symlink_to(libs / "libtensorrt_rtx.so.1")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(fix), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def worker_command(mode: str, request: Path) -> list[str]:
    return [sys.executable, "-m", "grc.engine.worker", mode, str(request)]
