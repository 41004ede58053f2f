"""Whether a Ctrl-C came while a command ran.

A KeyboardInterrupt that lands inside a library can come back as that library's own error: one raised while
torch.export lazily imported ``torch._dynamo.exc`` surfaced as a TorchExportError ("module 'torch._dynamo' has
no attribute 'exc'"), the export stage reported a failure with its traceback and the build exited 1 instead of
being interrupted (tests/test_cli.py::test_ctrl_c_exits_130_cleanly_in_every_stage, CI of 2026-12-02). So the
command's SIGINT handler remembers the signal (``watch``), a stage that fails after it is reported as interrupted
(grc/build/graph.py), and ``grc.cli.main`` ends with 130 however the command ended.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

_SEEN = threading.Event()


def seen() -> bool:
    return _SEEN.is_set()


class watch:
    """Within: SIGINT is remembered, then raises KeyboardInterrupt as Python's default handler does (main thread
    only: elsewhere signal handlers cannot be set, and nothing changes)."""

    def __init__(self) -> None:
        self.previous: Any = None

    def __enter__(self) -> watch:
        _SEEN.clear()
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        _SEEN.set()
        signal.default_int_handler(signum, frame)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
