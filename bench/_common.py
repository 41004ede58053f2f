"""Helpers shared by the benchmark scripts: fresh clones, timed grc runs, result files."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

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


class Timing(NamedTuple):
    """Wall seconds, and CPU seconds (user + system) of the command and the children it waited for:
    on a machine shared with other jobs the wall time grows with the load, the CPU time much less."""

    wall_s: float
    cpu_s: float


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> Timing:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return Timing(wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def grc(args: list[str], cwd: Path, env: dict[str, str]) -> Timing:
    return timed([sys.executable, "-m", "grc.cli", *args], cwd, {"PYTHONPATH": str(cwd), **env})


def fastest(runs: list[Timing]) -> Timing:
    return min(runs, key=lambda t: t.wall_s)


def interpreter_startup(cwd: Path) -> Timing:
    return fastest([timed([sys.executable, "-c", "pass"], cwd, {}) for _ in range(3)])


def load_test_parser(doc: str | None, built: str, time_limit_s: float, out: str) -> argparse.ArgumentParser:
    """The options both serving load tests take (bench/triton_load.py, bench/vllm_load.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(REPO / "specs" / "hstu-tiny.yaml"))
    parser.add_argument("--artifacts", type=Path, help=f"a folder holding {built} already built")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="load rounds per configuration; the median is reported")
    parser.add_argument("--time-limit", type=float, default=time_limit_s, help="seconds per round, at most")
    parser.add_argument("--out", default=out, help="result name under bench/results/")
    return parser


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
        found[name] = str(getattr(module, "__version__", "") or _distribution_version(name))
        if name == "torch" and getattr(module.version, "cuda", None):
            found["cuda"] = str(module.version.cuda)
    return found


SOURCE_FOLDERS = ("bench", "grc", "kernels", "plugins", "specs")
SOURCE_SUFFIXES = (".py", ".sh", ".yaml", ".cu", ".cuh", ".h", ".cpp")


def source_digest() -> str:
    """sha256 over the source files (path + bytes) that shape a measurement. Device machines get a
    copy of the work tree without git: the digest, computed again at a commit, says whether a
    result came from it (the same walk in both places, results and caches left out)."""
    digest = hashlib.sha256()
    for folder in SOURCE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            rel = path.relative_to(REPO)
            if path.suffix in SOURCE_SUFFIXES and path.is_file() and not {"results", "__pycache__"} & set(rel.parts):
                digest.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _distribution_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def provenance() -> dict:
    """What every result file starts with: command line, commit + dirty flag (or, outside a git
    checkout, the source digest alone), date, device, versions."""
    commit = _git("rev-parse", "HEAD")
    return {
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "commit": commit or "unknown (not a git checkout: match source_sha256)",
        # results are what benches write, not code: a run after another one is not "dirty" for it
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"))
        if commit
        else None,
        "source_sha256": source_digest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "load_average": os.getloadavg(),  # 1/5/15 min, when written: a shared machine's noise, on record
        "versions": versions(),
    }


def write_result(name: str | Path, data: dict) -> Path:
    """Write ``bench/results/<name>.json`` (or the path given) with its provenance first.
    The only way bench scripts write results, so no file can lack where it came from."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from grc.build.atomic import write_file  # a reader (report.py, a test) never sees half a file

    path = Path(name) if isinstance(name, Path) or str(name).endswith(".json") else RESULTS / f"{name}.json"
    write_file(path, (json.dumps({**provenance(), **data}, indent=1) + "\n").encode())
    return path


def source_digest_at(commit: str) -> str:
    """``source_digest`` of a commit's tree (read from git, not the work tree): the same walk."""
    listing = _git("ls-tree", "-r", "--name-only", commit, "--", *SOURCE_FOLDERS).splitlines()
    digest = hashlib.sha256()
    for rel in sorted(listing, key=lambda r: Path(r).parts):
        parts = Path(rel).parts
        if Path(rel).suffix in SOURCE_SUFFIXES and not {"results", "__pycache__"} & set(parts):
            blob = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=REPO, capture_output=True, check=True)
            digest.update(rel.encode() + b"\0" + blob.stdout + b"\0")
    return digest.hexdigest()


def attest(path: Path, dest: Path, search: int = 30) -> Path:
    """Copy a result written on a machine whose git is not this checkout's (a device machine gets the
    work tree beside a stale .git) into ``dest``, with ``commit`` set to the commit (HEAD or one of
    the ``search`` before it) whose sources have the result's source_sha256. Refuses when none has."""
    data = json.loads(Path(path).read_text())
    for commit in _git("rev-list", f"-{search}", "HEAD").splitlines():
        if source_digest_at(commit) == data.get("source_sha256"):
            break
    else:
        raise SystemExit(f"{path}: no commit among the last {search} has source_sha256 {data.get('source_sha256')}")
    data.update(
        commit=commit,
        dirty=False,
        commit_from=f"source_sha256 matched here (bench/_common.py --attest); written as {data.get('commit')}",
    )
    out = dest / Path(path).name if dest.is_dir() else dest
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


def backfill_digest(path: Path) -> None:
    """Give a result written before results carried source_sha256 (this session's first writer) the
    digest of its recorded commit's sources, read from git, saying so; its dirty flag stays as written."""
    data = json.loads(path.read_text())
    if "source_sha256" in data or not data.get("commit"):
        raise SystemExit(f"{path}: has a source digest already, or no commit to compute one from")
    data["source_sha256"] = source_digest_at(data["commit"])
    data["source_sha256_from"] = "the recorded commit's tree, computed later (bench/_common.py --backfill-digest)"
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    # no argument: the digest of this checkout, to hold against a result's source_sha256;
    # --attest FILE... DEST: copy device results in with the commit they were measured at
    if sys.argv[1:2] == ["--backfill-digest"]:
        for name in sys.argv[2:]:
            backfill_digest(Path(name))
    elif sys.argv[1:2] == ["--attest"] and len(sys.argv) >= 4:
        for name in sys.argv[2:-1]:
            print(attest(Path(name), Path(sys.argv[-1])))
    else:
        print(source_digest())
