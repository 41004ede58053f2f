"""What a build shows and records: a doit reporter that prints with rich and remembers, per task,
its status, seconds and outputs, for the summary table and ``build-report.json``."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

CONSOLE = Console(stderr=True, highlight=False, soft_wrap=True)
RECORDS: dict[str, dict[str, Any]] = {}
_LOCK = threading.Lock()
HASH_LIMIT = 64 << 20  # bigger files carry their digest in the stage manifest instead


def _file_entry(path: Path, root: Path, digest: str | None) -> dict[str, Any]:
    size = path.stat().st_size
    if digest is None and size <= HASH_LIMIT:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path.relative_to(root)), "bytes": size, "sha256": digest or "see manifest"}


def record_outputs(
    task: str,
    folder: Path,
    seconds: float,
    restored: bool = False,
    key: str = "",
    events: list[str] | None = None,
    digests: dict[str, str] | None = None,
) -> None:
    """``digests``: relative path -> sha256 of files already hashed (the output's recorded tree)."""
    digests = digests or {}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = [_file_entry(p, folder.parent, digests.get(p.relative_to(folder).as_posix())) for p in files]
    with _LOCK:
        RECORDS.setdefault(task, {})["outputs"] = entries
        RECORDS[task]["stage_seconds"] = round(seconds, 3)
        RECORDS[task]["restored"] = restored
        RECORDS[task]["key"] = key
        if events:
            RECORDS[task]["cache"] = events


def note_changed_outputs(task: str, reasons: list[str]) -> None:
    """An output changed behind grc's back: say which file, and keep it for the report."""
    with _LOCK:
        RECORDS.setdefault(task, {})["outputs_changed"] = reasons
    CONSOLE.print(f"[yellow]{escape(task)}: its output changed since grc wrote it; running it again[/]")
    for reason in reasons:
        CONSOLE.print(f"  [yellow]{escape(reason)}[/]")


class Reporter:
    """doit reporter interface (see doit.reporter.ConsoleReporter), rendered with rich."""

    desc = "grc: rich progress + records"

    def __init__(self, outstream: Any, options: dict[str, Any]):
        self.started: dict[str, float] = {}

    def initialize(self, tasks: Any, selected_tasks: Any) -> None:
        pass

    def get_status(self, task: Any) -> None:
        pass

    def execute_task(self, task: Any) -> None:
        self.started[task.name] = time.perf_counter()
        CONSOLE.print(f"[bold cyan]▶ {task.name}[/] ...")

    def _done(self, task: Any, status: str, **extra: Any) -> float:
        seconds = time.perf_counter() - self.started.get(task.name, time.perf_counter())
        with _LOCK:
            RECORDS.setdefault(task.name, {}).update(status=status, seconds=round(seconds, 3), **extra)
        return seconds

    def add_failure(self, task: Any, fail: Any) -> None:
        message = fail.message if hasattr(fail, "message") else str(fail)
        if getattr(fail, "traceback", None):  # an exception doit caught: its reason is in there, never drop it
            message = f"{message}\n{''.join(fail.traceback)}"
        self._done(task, "failed", error=message)
        CONSOLE.print(f"[bold red]✗ {task.name} failed[/]\n{escape(message)}")

    def add_success(self, task: Any) -> None:
        restored = RECORDS.get(task.name, {}).get("restored", False)
        seconds = self._done(task, "restored" if restored else "built")
        CONSOLE.print(f"[green]✓ {task.name}[/] {'restored' if restored else 'built'} in {seconds:.2f}s")

    def skip_uptodate(self, task: Any) -> None:
        with _LOCK:
            RECORDS.setdefault(task.name, {}).update(status="up to date", seconds=0.0)
        CONSOLE.print(f"[dim]· {task.name} up to date[/]")

    def skip_ignore(self, task: Any) -> None:
        with _LOCK:
            RECORDS.setdefault(task.name, {}).update(status="ignored", seconds=0.0)

    def cleanup_error(self, exception: Any) -> None:
        CONSOLE.print(f"[red]cleanup error: {escape(str(exception))}[/]")

    def runtime_error(self, msg: str) -> None:
        CONSOLE.print(f"[bold red]error:[/] {escape(msg)}")

    def teardown_task(self, task: Any) -> None:
        pass

    def complete_run(self) -> None:
        pass
