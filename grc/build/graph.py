"""Stages -> doit task dicts. Explicit dicts, no magic: what doit sees is what ``grc graph`` prints.

Per stage task:
  file_dep  the manifests of its input stages (small files; big artifacts are fingerprinted once,
            by the stage that wrote them, inside its manifest)
  targets   its own manifest (written last, so a half-built folder is never trusted)
  uptodate  the digests of exactly the spec leaves and source files it reads, and the output
            folder still being what grc wrote (grc/build/outputs.py: stat stamps, hashes on change)
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed
from rich.markup import escape

from grc.build import interrupt, outputs
from grc.build.atomic import install, temp_dir_for
from grc.build.fingerprint import spec_fields
from grc.build.progress import BuildRecords
from grc.build.tree import Entry, scan
from grc.cache.config import open_cache
from grc.cache.key import action_key, code_digests, host_digests, input_digests, toolkit_digests
from grc.cache.store import Events
from grc.errors import GrcError
from grc.spec.loader import LoadedSpec
from grc.stages import STAGES, stage_named
from grc.stages.base import MANIFEST, Context, Stage


def active_stages(loaded: LoadedSpec) -> list[Stage]:
    return [s for s in STAGES if s.enabled(loaded.spec)]


def fingerprint(stage: Stage, loaded: LoadedSpec) -> dict[str, str]:
    """Everything but the inputs that decides a stage's output: spec leaves, code, toolkits."""
    data = loaded.spec.model_dump(mode="json")
    return {
        **spec_fields(data, stage.reads),
        **code_digests(stage.run.__module__, stage.code),
        **toolkit_digests(stage.toolkits),
        **host_digests(stage.host_gpu(loaded.spec)),
    }


class FieldsUpToDate:
    """doit ``uptodate`` callable: the digests saved by the last successful run equal today's."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        return values.get("fields") == self.fields


class OutputsUnchanged:
    """doit ``uptodate`` callable: the stage's output folder is still what grc wrote (an edited,
    truncated, deleted or added file makes the stage run again: restored from the cache or rebuilt).
    Says which file changed; stores fresh stamps when only the stat changed (the build holds its lock)."""

    def __init__(self, root: Path, stage: str, folder: Path, records: BuildRecords):
        self.root, self.stage, self.folder, self.records = root, stage, folder, records

    def __call__(self, task: Any, values: dict[str, Any]) -> bool | None:
        if not values or not (self.folder / MANIFEST).exists():
            return None  # never built, or its manifest is gone: doit reruns it anyway
        reasons = outputs.changes(self.root, self.stage, self.folder, refresh=True)
        if reasons:
            self.records.note_changed_outputs(self.stage, reasons)
        return not reasons


def execute(
    stage_name: str, loaded: LoadedSpec, root: Path, fields: dict[str, str], records: BuildRecords
) -> dict[str, Any] | TaskFailed:
    """The doit action of every stage: run into a temp folder, write the manifest last, swap in."""
    from grc.build.progress import CONSOLE

    stage = stage_named(stage_name)
    final = root / stage.output
    tmp = temp_dir_for(final)
    inputs = {name: root / stage_named(name).output for name in stage.inputs_for(loaded.spec)}
    key = action_key(stage.name, {**fields, **input_digests({n: f / stage.input_file(n) for n, f in inputs.items()})})
    events = Events()
    try:
        cache = open_cache()
    except GrcError as exc:  # checked when the build began; here for plain doit (dodo.py)
        _discard(tmp, final)
        return TaskFailed(str(exc))
    started = time.perf_counter()
    restored = _restore(cache, key, tmp, final, events) if cache is not None else None
    if restored is not None:
        CONSOLE.print(f"  [dim]{stage.name}: restored from the build cache (key {key[:12]})[/]")
        _finish(records, root, stage.name, final, restored, started, key, events, restored=True)
        return {"fields": fields, "key": key}
    _print_warnings(stage.name, events)
    ctx = Context(loaded=loaded, out=tmp, inputs=inputs, console=CONSOLE)
    try:
        manifest = stage.run(ctx)
        manifest = {"stage": stage.name, "spec": loaded.spec.name, **manifest}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        install(tmp, final)
        entries = scan(final, _known_digests(manifest))
    except Exception as exc:
        _discard(tmp, final)
        if interrupt.seen():  # the Ctrl-C, come back as the stage's own error (grc/build/interrupt.py)
            raise KeyboardInterrupt from None
        if isinstance(exc, GrcError):
            return TaskFailed(str(exc))
        return TaskFailed(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")  # unexpected: keep the traceback
    if cache is not None:
        cache.save(key, stage.name, final, entries, events)
    _finish(records, root, stage.name, final, entries, started, key, events)
    return {"fields": fields, "key": key}


def _finish(
    records: BuildRecords,
    root: Path,
    stage: str,
    final: Path,
    entries: list[Entry],
    started: float,
    key: str,
    events: Events,
    restored: bool = False,
) -> None:
    """Remember what the folder holds (so a later change behind grc's back is noticed) and report it."""
    outputs.save(root, stage, final, entries)
    _print_warnings(stage, events)
    digests = {e.path: e.sha256 for e in entries if e.kind == "file"}
    records.record_outputs(
        stage, final, time.perf_counter() - started, restored=restored, key=key, events=events.log, digests=digests
    )


def _print_warnings(stage: str, events: Events) -> None:
    from grc.build.progress import CONSOLE

    for text in events.warnings:
        CONSOLE.print(f"  [yellow]{stage}: {escape(text)}[/]")
    events.warnings.clear()


def _restore(cache: Any, key: str, tmp: Path, final: Path, events: Events) -> list[Entry] | None:
    record = cache.lookup(key, events)
    if record is None:
        return None
    try:
        entries = cache.restore(record, tmp, events)
    except OSError as exc:  # e.g. the disk filled up while copying out of the store
        events.warn(f"restoring from the build cache failed ({exc}); building")
        entries = None
    if entries is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return None
    install(tmp, final)
    return entries


def _known_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """Digests a stage computed while writing (weights shards, ONNX files): never hash GBs twice."""
    known = {s["file"]: s["sha256"] for s in manifest.get("shards", [])}
    known.update({k: v for k, v in (manifest.get("sha256") or {}).items() if isinstance(v, str)})
    return known


def _discard(tmp: Path, final: Path) -> None:
    """A failed stage leaves no output: neither its partial one nor the previous one, which no
    longer matches the spec and inputs (a stale "verify passed" report would be a lie)."""
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)


def task_dicts(loaded: LoadedSpec, root: Path, records: BuildRecords | None = None) -> list[dict[str, Any]]:
    """doit task dicts of the spec's stages; their actions record into ``records`` (a fresh one when not given,
    as for plain doit through dodo.py)."""
    records = records if records is not None else BuildRecords()
    tasks = []
    names = {s.name for s in active_stages(loaded)}
    for stage in active_stages(loaded):
        fields = fingerprint(stage, loaded)
        upstream = stage.inputs_for(loaded.spec)
        missing = [i for i in upstream if i not in names]
        if missing:  # e.g. bundles.triton.backend aotinductor with engine.aoti off: say so before any work
            raise GrcError(
                f"stage {stage.name} reads the output of {', '.join(missing)}, which this spec does not "
                f"build: {stage_named(missing[0]).doc} (enable it in the spec)"
            )
        deps = [str(root / stage_named(i).output / stage.input_file(i)) for i in upstream]
        out = root / stage.output
        tasks.append(
            {
                "basename": stage.name,
                "doc": stage.doc,
                "actions": [(execute, [stage.name, loaded, root, fields, records])],
                "file_dep": deps,
                "task_dep": list(upstream),
                "targets": [str(out / MANIFEST)],
                "uptodate": [FieldsUpToDate(fields), OutputsUnchanged(root, stage.name, out, records)],
                "clean": [(shutil.rmtree, [str(out), True])],
                "verbosity": 2,
            }
        )
    return tasks
