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


def write_result(name: str, data: dict) -> Path:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    data = {
        "date": datetime.date.today().isoformat(),
        "commit": commit.stdout.strip() or "uncommitted",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (CPU only)",
        **data,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
