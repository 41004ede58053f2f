"""Helpers shared by the benchmark scripts: fresh clones, timed grc runs, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def clone(dest: Path) -> Path:
    """The files a fresh clone holds (tracked + untracked-not-ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return seconds


def grc(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    return timed([sys.executable, "-m", "grc.cli", *args], cwd, {"PYTHONPATH": str(cwd), **env})


def interpreter_startup(cwd: Path) -> float:
    return min(timed([sys.executable, "-c", "pass"], cwd, {}) for _ in range(3))


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def device() -> str:
    """The accelerator if torch sees one, else the CPU: read by code, never typed."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"{props.name} (sm{props.major}{props.minor}, {torch.cuda.device_count()} visible)"
    except ImportError:
        pass
    return f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def versions() -> dict[str, str]:
    """Versions of what shapes a measurement (python, torch + its CUDA, triton, onnxruntime)."""
    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "onnxruntime", "onnx", "tensorrt_rtx", "tritonclient"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        found[name] = str(getattr(module, "__version__", "?"))
        if name == "torch" and getattr(module.version, "cuda", None):
            found["cuda"] = str(module.version.cuda)
    return found


def provenance() -> dict:
    """What every result file starts with: command line, commit + dirty flag, date, device, versions."""
    return {
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "commit": _git("rev-parse", "HEAD") or "unknown (not a git checkout)",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
    }


def write_result(name: str | Path, data: dict) -> Path:
    """Write ``bench/results/<name>.json`` (or the path given) with its provenance first.
    The only way bench scripts write results, so no file can lack where it came from."""
    path = Path(name) if isinstance(name, Path) or str(name).endswith(".json") else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**provenance(), **data}, indent=1) + "\n")
    return path
