"""``grc cache stats | prune --max-size | verify`` over the local store.

Each refuses a store folder that is missing or not a folder (a mistyped ``--cache-dir`` must not
report an empty, healthy cache), and a size it cannot read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from grc.build.fingerprint import sha256_file
from grc.cache.store import LocalStore
from grc.errors import GrcError, SettingError


def _require_folder(store: LocalStore) -> None:
    where = f"the build cache folder {store.root} (--cache-dir, GRC_CACHE_DIR)"
    if not store.root.exists():
        raise GrcError(f"{where} does not exist: nothing to inspect (a build creates it)")
    if not store.root.is_dir():
        raise GrcError(f"{where} is not a folder")


@dataclass
class Stats:
    objects: int
    object_bytes: int
    records: int


def stats(store: LocalStore) -> Stats:
    _require_folder(store)
    objects = store.objects()
    return Stats(len(objects), sum(p.stat().st_size for p in objects), len(store.records()))


def prune(store: LocalStore, max_bytes: int) -> tuple[int, int]:
    """Drop least recently used action records, then every object no record references, until
    the objects fit in ``max_bytes``. Returns (records removed, bytes freed)."""
    import json

    _require_folder(store)
    records = sorted(store.records(), key=lambda p: p.stat().st_mtime)  # oldest use first
    removed = freed = 0

    def referenced() -> set[str]:
        out: set[str] = set()
        for r in store.records():
            try:
                out.update(e["sha256"] for e in json.loads(r.read_text())["tree"] if e["kind"] == "file")
            except (OSError, ValueError, KeyError, TypeError):  # unreadable, or an older grc's record
                r.unlink(missing_ok=True)
        return out

    while True:
        keep = referenced()
        for obj in store.objects():
            if obj.name not in keep:
                freed += obj.stat().st_size
                obj.unlink()
                obj.with_name(f".{obj.name}.ok").unlink(missing_ok=True)
        if stats(store).object_bytes <= max_bytes or not records:
            return removed, freed
        records.pop(0).unlink(missing_ok=True)
        removed += 1


def verify(store: LocalStore) -> list[Path]:
    """Re-hash every object; delete and return the corrupt ones (their records then miss)."""
    _require_folder(store)
    bad = []
    for obj in store.objects():
        if sha256_file(obj) != obj.name:
            os.chmod(obj, 0o644)
            obj.unlink()
            obj.with_name(f".{obj.name}.ok").unlink(missing_ok=True)
            bad.append(obj)
    return bad


def parse_size(text: str) -> int:
    """``500M``, ``10G``, ``1.5TiB``, ``0`` -> bytes; SettingError for anything else."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    body = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(body[-1:], 1)
    try:
        value = float(body[:-1] if scale > 1 else body)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise SettingError(f"--max-size {text!r}: expected a size such as 0, 500M, 10G or 1.5T")
    return int(value * scale)
