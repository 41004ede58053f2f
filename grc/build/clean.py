"""``grc clean``: remove a spec's artifacts under the same lock a build takes.

A clean that ran beside a build would pull folders from under it (the build dies mid-stage with a
traceback while clean says it succeeded); holding ``BuildLock`` makes them take turns. The lock
file itself stays: a build already waiting on it holds it open, and a fresh file beside that one
would let two builds run at once.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from grc.build.lock import BuildLock
from grc.errors import GrcError


def clean(root: Path, wait_seconds: float, on_wait: Callable[[str], None] | None = None) -> list[Path]:
    """Remove everything under ``root`` but its lock file; returns what was removed. Raises
    ``GrcError`` naming the first path that could not be removed (read-only tree, permissions)."""
    if not root.exists():
        return []
    lock = BuildLock(root, wait_seconds, on_wait)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(lock)
        except OSError as exc:  # a read-only tree: the lock file cannot even be opened for writing
            raise GrcError(
                f"clean: cannot take the build lock {lock.path}: {exc.strerror}; nothing was removed"
            ) from None
        return _remove_all_but(root, lock.path)


def _remove_all_but(root: Path, keep: Path) -> list[Path]:
    failures: list[tuple[str, OSError]] = []

    def failed(_function: object, path: str, excinfo: tuple[type, BaseException, object]) -> None:
        if isinstance(excinfo[1], OSError):  # rmtree's onerror (onexc needs Python 3.12)
            failures.append((path, excinfo[1]))

    removed = []
    for entry in sorted(root.iterdir()):
        if entry == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, onerror=failed)
        else:
            try:
                entry.unlink()
            except OSError as exc:
                failures.append((str(entry), exc))
        if not entry.exists() and not entry.is_symlink():
            removed.append(entry)
    if failures:
        path, first = failures[0]
        raise GrcError(f"clean: could not remove {path}: {first.strerror} ({len(failures)} path(s) left under {root})")
    return removed
