"""Atomic stage outputs: write into a temporary sibling folder, then swap it into place.

A build killed at any moment leaves either the old complete folder, no folder, or a temporary
folder that nothing trusts (doit's target is the manifest inside the final folder, written last).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TMP_MARK = ".partial-"
OLD_MARK = ".old-"


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` through a temporary sibling and a rename: a reader (or a concurrent writer)
    never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def make_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and write a file into it, or raise OSError: tried for real, since
    permission bits do not stop root, and neither they nor ``os.access`` show an immutable folder."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    os.close(fd)
    os.unlink(probe)


def temp_dir_for(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def install(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``; fsync first so a power cut cannot leave a torn manifest."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    old = final.with_name(f"{final.name}{OLD_MARK}{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def sweep(root: Path) -> list[Path]:
    """Remove leftovers of killed builds (called under the build lock, so none is in use)."""
    removed = []
    if root.exists():
        for path in list(root.rglob(f"*{TMP_MARK}*")) + list(root.rglob(f"*{OLD_MARK}*")):
            if path.is_dir() and (TMP_MARK in path.name or OLD_MARK in path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
