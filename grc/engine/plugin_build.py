"""Building the plugin library: TensorRT headers, nvcc, and checks of the result.

Headers: no TensorRT-RTX wheel and no apt package on Debian ships ``NvInferRuntime.h``. A host with
full TensorRT has them (``GRC_TRT_INCLUDE`` or the usual system folders); otherwise they are taken
from the pinned PyPI wheel ``kernel-lens==2.0.1``, which carries the TensorRT 10.14 OSS headers
(Apache-2.0), fetched with ``pip download --no-deps`` into the grc cache folder and checked against
the wheel's sha256. Nothing third-party is copied into the repository. The plugin uses only the
versioned IPluginV3One* interfaces, which TensorRT-RTX 1.x implements with the same ABI.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from grc.cache.store import default_dir

HEADERS_WHEEL = "kernel-lens==2.0.1"
HEADERS_WHEEL_FILE = "kernel_lens-2.0.1-py3-none-any.whl"
HEADERS_WHEEL_SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
HEADERS_IN_WHEEL = "kernel_lens/include/tensorrt/"
SYSTEM_INCLUDES = (
    "/usr/include/x86_64-linux-gnu",
    "/usr/include/aarch64-linux-gnu",
    "/usr/include",
    "/usr/local/tensorrt/include",
    "/opt/tensorrt/include",
)


class Unavailable(Exception):
    """A tool or input the plugin build needs is missing here (the stage records a skip)."""


@dataclass(frozen=True)
class Headers:
    folder: Path
    source: str  # where they came from, for the manifest
    version: str  # TensorRT version the headers declare


def _header_version(folder: Path) -> str:
    text = (folder / "NvInferVersion.h").read_text(errors="replace") if (folder / "NvInferVersion.h").exists() else ""
    parts = [
        re.search(rf"#define\s+(?:TRT|NV_TENSORRT)_{k}(?:_ENTERPRISE)?\s+(\d+)", text)
        for k in ("MAJOR", "MINOR", "PATCH")
    ]
    return ".".join(m.group(1) for m in parts if m) or "unknown"


def _download_headers(dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="grc-trt-headers-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            HEADERS_WHEEL,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wheel = Path(tmp) / HEADERS_WHEEL_FILE
        if done.returncode != 0 or not wheel.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(
                f"`pip download --no-deps {HEADERS_WHEEL}` failed ({tail[0]}); set GRC_TRT_INCLUDE to "
                "a TensorRT include folder instead"
            )
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != HEADERS_WHEEL_SHA256:
            raise Unavailable(f"{HEADERS_WHEEL_FILE} has sha256 {digest}, expected {HEADERS_WHEEL_SHA256}")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(HEADERS_IN_WHEEL) and member.endswith(".h"):
                    (staging / Path(member).name).write_bytes(zf.read(member))
        try:
            staging.rename(dest)  # atomic: a concurrent build sees all headers or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race; its copy is identical
            if not dest.exists():
                raise


def find_headers() -> Headers:
    env = os.environ.get("GRC_TRT_INCLUDE")
    if env:
        folder = Path(env)
        if not (folder / "NvInferRuntime.h").exists():
            raise Unavailable(f"GRC_TRT_INCLUDE={env} holds no NvInferRuntime.h")
        return Headers(folder, f"GRC_TRT_INCLUDE={env}", _header_version(folder))
    for candidate in map(Path, SYSTEM_INCLUDES):
        if (candidate / "NvInferRuntime.h").exists():
            return Headers(candidate, f"system ({candidate})", _header_version(candidate))
    folder = default_dir() / "third_party" / f"{HEADERS_WHEEL_FILE[:-4]}-tensorrt-include"
    if not (folder / "NvInferRuntime.h").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _download_headers(folder)
    return Headers(
        folder,
        f"{HEADERS_WHEEL} (wheel sha256 {HEADERS_WHEEL_SHA256[:16]}..., via pip download)",
        _header_version(folder),
    )


def find_nvcc() -> Path:
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise Unavailable("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): install the CUDA toolkit (12.x or 13.x)")


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return match.group(2) if match else out.strip().splitlines()[-1]


def supported_arches(nvcc: Path) -> set[int]:
    out = subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    return {int(m) for m in re.findall(r"sm_(\d+)\b", out)}


def gencode_flags(sms: list[int]) -> list[str]:
    """A cubin per target SM, plus PTX of the newest so a later GPU can JIT it."""
    flags = []
    for sm in sms:
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    if sms:
        flags += ["-gencode", f"arch=compute_{max(sms)},code=compute_{max(sms)}"]
    return flags


def compile_library(nvcc: Path, source: Path, include: Path, sms: list[int], out: Path) -> list[str]:
    cmd = [
        str(nvcc),
        "-std=c++17",
        "-O2",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-fvisibility=hidden",
        # -isystem: TensorRT's headers warn about their own deprecated members; not ours to fix
        "-isystem",
        str(include),
        "-I",
        str(source.parent),
        # the only host-specific bytes nvcc leaves are the temp file's name (it holds the pid) in the
        # symbol table: strip it, so the same sources give the same library (and sha256) on any host
        "-Xlinker",
        "--strip-all",
        *gencode_flags(sms),
        "-o",
        str(out),
        str(source),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed ({done.returncode}):\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    return cmd


def lint_library(path: Path) -> dict[str, object]:
    """What the loader and the runtime need of the .so: exported entry points, no dynamic TensorRT or
    cudart dependency (one library for TensorRT and TensorRT-RTX, no libcudart.so at run time)."""
    report: dict[str, object] = {"bytes": path.stat().st_size}
    tools = {name: shutil.which(name) for name in ("nm", "readelf")}
    missing = [name for name, found in tools.items() if not found]
    if missing:  # an unchecked library never passes its lint
        raise RuntimeError(f"cannot lint {path.name}: {' and '.join(missing)} not found on PATH (install binutils)")
    out = subprocess.run(
        [str(tools["nm"]), "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True
    ).stdout
    exported = sorted({line.split()[-1] for line in out.splitlines() if " T " in line})
    report["exported"] = exported
    report["entry_points_ok"] = {"getCreators", "setLoggerFinder"} <= set(exported)
    out = subprocess.run([str(tools["readelf"]), "-d", str(path)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    report["needed"] = needed
    report["links_tensorrt_or_cudart"] = any(n.startswith(("libnvinfer", "libtensorrt", "libcudart")) for n in needed)
    return report
