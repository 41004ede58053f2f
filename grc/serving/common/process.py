"""Server processes on this machine: free ports, HTTP probes, process groups, detached-server records.

Servers start in their own session (``start_new_session=True``), so the server, its engine cores, workers and
python-backend stubs share one process group that these helpers end together.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (another process may still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout_s: float = 1.0) -> bytes | None:
    """The body of a 200 answer, else None. No proxies: none may intercept 127.0.0.1."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return bytes(response.read()) if response.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    return http_get(url, timeout_s) is not None


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group ``pgid``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left in the group
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(pid: int, grace_s: float = 20.0) -> bool:
    """SIGTERM the process group ``pid`` leads, SIGKILL what is left after ``grace_s``.
    Returns whether the group was still there."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pid):
            return True
        with contextlib.suppress(ChildProcessError):  # reap it when it is our child, or the group never empties
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    kill_group(pid)
    return True


def read_live_record(path: Path, alive: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The detached server recorded in ``path`` (JSON) when ``alive(record)``; a stale record is removed."""
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    if alive(record):
        return record
    path.unlink(missing_ok=True)
    return None
