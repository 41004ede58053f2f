"""What a build shows and records: a doit reporter that prints with rich, and ``BuildRecords``, per task its
status, seconds and outputs, for the summary table and ``build-report.json``.

One ``BuildRecords`` per build: the runner makes it and hands it to the task graph (whose actions record outputs)
and to the reporter (which records statuses), so two builds in one process never mix their records."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

CONSOLE = Console(stderr=True, highlight=False, soft_wrap=True)
HASH_LIMIT = 64 << 20  # bigger files carry their digest in the stage manifest instead


def _file_entry(path: Path, root: Path, digest: str | None) -> dict[str, Any]:
    size = path.stat().st_size
    if digest is None and size <= HASH_LIMIT:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path.relative_to(root)), "bytes": size, "sha256": digest or "see manifest"}


class BuildRecords:
    """What one build did, per task (doit may run tasks in threads: every write holds the lock)."""

    def __init__(self) -> None:
        self._tasks: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def update(self, task: str, **fields: Any) -> None:
        with self._lock:
            self._tasks.setdefault(task, {}).update(fields)

    def get(self, task: str) -> dict[str, Any]:
        """A copy of ``task``'s record ({} when nothing was recorded)."""
        with self._lock:
            return dict(self._tasks.get(task, {}))

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Every task's record, in the order tasks were first recorded."""
        with self._lock:
            return {name: dict(rec) for name, rec in self._tasks.items()}

    def record_outputs(
        self,
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
        fields: dict[str, Any] = {"outputs": entries, "stage_seconds": round(seconds, 3), "restored": restored}
        self.update(task, **fields, key=key, **({"cache": events} if events else {}))

    def note_changed_outputs(self, task: str, reasons: list[str]) -> None:
        """An output changed behind grc's back: say which file, and keep it for the report."""
        self.update(task, outputs_changed=reasons)
        CONSOLE.print(f"[yellow]{escape(task)}: its output changed since grc wrote it; running it again[/]")
        for reason in reasons:
            CONSOLE.print(f"  [yellow]{escape(reason)}[/]")


class Reporter:
    """doit reporter interface (see doit.reporter.ConsoleReporter), rendered with rich."""

    desc = "grc: rich progress + records"

    def __init__(self, records: BuildRecords):
        self.records = records
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
        self.records.update(task.name, status=status, seconds=round(seconds, 3), **extra)
        return seconds

    def add_failure(self, task: Any, fail: Any) -> None:
        message = fail.message if hasattr(fail, "message") else str(fail)
        if getattr(fail, "traceback", None):  # an exception doit caught: its reason is in there, never drop it
            message = f"{message}\n{''.join(fail.traceback)}"
        self._done(task, "failed", error=message)
        CONSOLE.print(f"[bold red]✗ {task.name} failed[/]\n{escape(message)}")

    def add_success(self, task: Any) -> None:
        restored = self.records.get(task.name).get("restored", False)
        seconds = self._done(task, "restored" if restored else "built")
        CONSOLE.print(f"[green]✓ {task.name}[/] {'restored' if restored else 'built'} in {seconds:.2f}s")

    def skip_uptodate(self, task: Any) -> None:
        self.records.update(task.name, status="up to date", seconds=0.0)
        CONSOLE.print(f"[dim]· {task.name} up to date[/]")

    def skip_ignore(self, task: Any) -> None:
        self.records.update(task.name, status="ignored", seconds=0.0)

    def cleanup_error(self, exception: Any) -> None:
        CONSOLE.print(f"[red]cleanup error: {escape(str(exception))}[/]")

    def runtime_error(self, msg: str) -> None:
        CONSOLE.print(f"[bold red]error:[/] {escape(msg)}")

    def teardown_task(self, task: Any) -> None:
        pass

    def complete_run(self) -> None:
        pass
