"""Exclusive flocks that name their holder: one build per spec at a time (``BuildLock`` on
``artifacts/<name>/.build.lock``), one maker of a shared venv at a time (``FileLock``).

The kernel drops the lock when the holder dies (even by SIGKILL), so a killed process never leaves
a stale lock behind. The holder writes its pid into the file so that a waiter can say who it waits for."""

from __future__ import annotations

import fcntl
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from grc.errors import GrcError


class FileLock:
    """Holds an exclusive flock on ``path``; waits up to ``wait_seconds`` (default: for ever), calls
    ``on_wait(holder_pid)`` once when it has to wait, raises ``GrcError(busy(holder))`` at the deadline."""

    def __init__(
        self,
        path: Path,
        wait_seconds: float = math.inf,
        on_wait: Callable[[str], None] | None = None,
        busy: Callable[[str], str] | None = None,
    ):
        self.path = path
        self.wait_seconds = wait_seconds
        self.on_wait = on_wait
        self.busy = busy or (lambda holder: f"{path} is held by pid {holder}; waited {wait_seconds:.0f}s")
        self.fh: IO[str] | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = fh = open(self.path, "a+")
        deadline = time.monotonic() + self.wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.path.read_text().strip() or "unknown"
                if time.monotonic() >= deadline:
                    fh.close()
                    raise GrcError(self.busy(holder)) from None
                if not told and self.on_wait:
                    self.on_wait(holder)
                    told = True
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        assert self.fh is not None
        self.fh.seek(0)
        self.fh.truncate()
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


class BuildLock(FileLock):
    """One build per spec: ``root/.build.lock``."""

    def __init__(self, root: Path, wait_seconds: float, on_wait: Callable[[str], None] | None = None):
        path = root / ".build.lock"
        super().__init__(
            path,
            wait_seconds,
            on_wait,
            lambda holder: (
                f"another build of this spec is running (pid {holder}, lock {path}); "
                f"waited {wait_seconds:.0f}s. Retry later or pass --wait SECONDS."
            ),
        )
