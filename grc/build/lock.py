"""One build per spec at a time: an flock on ``artifacts/<name>/.build.lock``.

The kernel drops the lock when the holder dies (even by SIGKILL), so a killed build never leaves
a stale lock behind."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from grc.errors import GrcError


class BuildLock:
    def __init__(self, root: Path, wait_seconds: float, on_wait=None):  # type: ignore[no-untyped-def]
        self.path = root / ".build.lock"
        self.wait_seconds = wait_seconds
        self.on_wait = on_wait
        self.fh: IO[str] | None = None

    def __enter__(self) -> BuildLock:
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
                    raise GrcError(
                        f"another build of this spec is running (pid {holder}, lock {self.path}); "
                        f"waited {self.wait_seconds:.0f}s. Retry later or pass --wait SECONDS."
                    ) from None
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
