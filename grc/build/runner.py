"""Run the graph through doit's Python API; explain staleness; write the build report.

doit's state lives in ``artifacts/<spec>/.doit.db`` with the sqlite3 backend: it commits each
task's result in a transaction, so a killed build never corrupts it (``dbm.dumb`` can), and it is
safe with ``-j N`` because we run tasks in threads of one process, and only that process writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.cmd_base import TaskLoader2
from doit.dependency import Dependency, MD5Checker, SqliteDB
from doit.doit_cmd import DoitMain
from doit.task import Task, dict_to_task
from rich.markup import escape
from rich.table import Table

from grc.build import outputs
from grc.build.atomic import make_writable_folder, sweep
from grc.build.budget import check_disk
from grc.build.fingerprint import changed
from grc.build.graph import fingerprint, task_dicts
from grc.build.lock import BuildLock
from grc.build.progress import CONSOLE, BuildRecords, Reporter
from grc.errors import SettingError
from grc.spec.loader import LoadedSpec
from grc.stages import stage_named

DB_NAME = ".doit.db"
REPORT = "build-report.json"


def _tasks(loaded: LoadedSpec, root: Path, records: BuildRecords) -> list[Task]:
    out = []
    for d in task_dicts(loaded, root, records):
        d = dict(d)
        d["name"] = d.pop("basename")
        out.append(dict_to_task(d))
    return out


class _Loader(TaskLoader2):
    def __init__(self, tasks: list[Task], dep_file: Path, records: BuildRecords):
        super().__init__()
        self.tasks = tasks
        self.dep_file = dep_file
        self.records = records

    def setup(self, opt_values: dict[str, Any]) -> None:
        pass

    def load_doit_config(self) -> dict[str, Any]:
        return {
            "dep_file": str(self.dep_file),
            "backend": "sqlite3",
            "reporter": Reporter(self.records),
            "verbosity": 2,
        }

    def load_tasks(self, cmd: Any, pos_args: list[str]) -> list[Task]:
        return self.tasks


def doit_main(loaded: LoadedSpec, root: Path, records: BuildRecords) -> DoitMain:
    root.mkdir(parents=True, exist_ok=True)
    return DoitMain(_Loader(_tasks(loaded, root, records), root / DB_NAME, records), config_filenames=())


def _writable_root(root: Path) -> None:
    try:
        make_writable_folder(root)
    except OSError as exc:
        raise SettingError(
            f"the artifacts folder {root.parent} (--artifacts) cannot hold {root.name}/ "
            f"({exc.strerror or exc}); expected a folder grc can create and write"
        ) from None


def _check_settings(loaded: LoadedSpec, root: Path) -> None:
    """Refuse unusable settings before any work, with the reason on the console and in the report."""
    from grc.cache.config import open_cache

    _writable_root(root)
    try:
        open_cache()
    except SettingError as exc:
        _write_report(loaded, root, 2, 0.0, error=str(exc))
        raise


def build(
    loaded: LoadedSpec,
    root: Path,
    jobs: int = 1,
    wait: float = 600.0,
    only: list[str] | None = None,
    records: BuildRecords | None = None,
) -> int:
    """Run every stale task (or ``only`` these and what they need). Returns doit's exit code.
    ``records``: where this build records what each task did (pass one to read it afterwards)."""
    records = records if records is not None else BuildRecords()

    def waiting(holder: str) -> None:
        CONSOLE.print(f"[yellow]another build of {escape(loaded.spec.name)} is running (pid {holder}); waiting...[/]")

    _check_settings(loaded, root)
    with BuildLock(root, wait, waiting):
        for leftover in sweep(root):
            CONSOLE.print(f"[dim]removed leftover of an interrupted build: {escape(str(leftover))}[/]")
        check_disk(loaded, root, only)  # refuses, naming the bytes, what cannot fit
        started = time.perf_counter()
        # -j 1 runs tasks in this (the main) thread: a Ctrl-C lands in the stage itself and unwinds
        # through its cleanup. doit's thread runner would leave its worker inside torch/onnx native
        # code while the interpreter shuts down, which aborts the process (grc.cli hard-exits then).
        workers = ["-n", str(jobs), "-P", "thread"] if jobs > 1 else ["-n", "0"]
        args = ["run", *workers, *(only or [])]
        code = doit_main(loaded, root, records).run(args)
        total = time.perf_counter() - started
        _write_report(loaded, root, code, total, records)
    _print_summary(loaded, total, code, records)
    return code


def _write_report(
    loaded: LoadedSpec,
    root: Path,
    code: int,
    total: float,
    records: BuildRecords | None = None,
    error: str | None = None,
) -> None:
    tasks = records.as_dict() if records is not None and error is None else {}
    report = {
        "spec": loaded.spec.name,
        "spec_files": [str(p) for p in loaded.files],
        "ok": code == 0,
        "seconds": round(total, 3),
        **({"error": error} if error else {}),
        "tasks": {name: tasks[name] for name in sorted(tasks)},
    }
    (root / REPORT).write_text(json.dumps(report, indent=1) + "\n")


def _print_summary(loaded: LoadedSpec, total: float, code: int, records: BuildRecords) -> None:
    table = Table(title=f"grc build {loaded.spec.name}: {'ok' if code == 0 else 'FAILED'} in {total:.2f}s")
    for col in ("task", "status", "seconds", "outputs"):
        table.add_column(col)
    for name, rec in records.as_dict().items():
        outs = rec.get("outputs", [])
        size = sum(o["bytes"] for o in outs)
        table.add_row(
            name,
            rec.get("status", "?"),
            f"{rec.get('seconds', 0):.2f}",
            f"{len(outs)} files, {size / 2**20:.1f} MiB" if outs else "",
        )
    CONSOLE.print(table)


@dataclass
class PlanRow:
    task: str
    state: str  # "up to date" | "stale" | "waits"
    reasons: list[str]
    parts: dict[str, str]  # what the task's key hashes (inputs are added when it runs)


def plan(loaded: LoadedSpec, root: Path) -> list[PlanRow]:
    """Per task: up to date, or why it would run. Runs nothing, writes nothing."""
    tasks = _tasks(loaded, root, BuildRecords())  # plan runs nothing: what the checks note is not kept
    by_name = {t.name: t for t in tasks}
    db = root / DB_NAME
    dep = Dependency(SqliteDB, str(db), checker_cls=MD5Checker) if db.exists() else None
    rows: list[PlanRow] = []
    stale: set[str] = set()
    for task in tasks:
        stage = stage_named(task.name)
        old = dep.get_values(task.name).get("fields") if dep else None
        parts = fingerprint(stage, loaded)
        reasons = [f"{k} changed" if k != "(never built)" else k for k in changed(old, parts)]
        if dep:
            status = dep.get_status(task, by_name, get_log=True)
            missing = status.reasons.get("missing_target", [])
            reasons += [f"output missing: {Path(t).relative_to(root)}" for t in missing]
            if not missing and dep.get_values(task.name):
                reasons += [f"output changed: {r}" for r in outputs.changes(root, task.name, root / stage.output)]
            reasons += [
                f"input changed: {Path(f).relative_to(root)}" for f in status.reasons.get("changed_file_dep", [])
            ]
        upstream = [i for i in task.task_dep if i in stale]
        if reasons:
            rows.append(PlanRow(task.name, "stale", reasons, parts))
            stale.add(task.name)
        elif upstream:
            rows.append(PlanRow(task.name, "waits", [f"reruns if the output of {', '.join(upstream)} changes"], parts))
            stale.add(task.name)
        else:
            rows.append(PlanRow(task.name, "up to date", [], parts))
    if dep:
        dep.close()
    return rows
