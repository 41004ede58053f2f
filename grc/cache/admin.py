"""``grc cache stats | prune --max-size | verify`` over the local store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from grc.build.fingerprint import sha256_file
from grc.cache.store import LocalStore


@dataclass
class Stats:
    objects: int
    object_bytes: int
    records: int


def stats(store: LocalStore) -> Stats:
    objects = store.objects()
    return Stats(len(objects), sum(p.stat().st_size for p in objects), len(store.records()))


def prune(store: LocalStore, max_bytes: int) -> tuple[int, int]:
    """Drop least recently used action records, then every object no record references, until
    the objects fit in ``max_bytes``. Returns (records removed, bytes freed)."""
    import json

    records = sorted(store.records(), key=lambda p: p.stat().st_mtime)  # oldest use first
    removed = freed = 0

    def referenced() -> set[str]:
        out: set[str] = set()
        for r in store.records():
            try:
                out.update(f["sha256"] for f in json.loads(r.read_text())["files"])
            except (OSError, ValueError, KeyError):
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
    bad = []
    for obj in store.objects():
        if sha256_file(obj) != obj.name:
            os.chmod(obj, 0o644)
            obj.unlink()
            obj.with_name(f".{obj.name}.ok").unlink(missing_ok=True)
            bad.append(obj)
    return bad


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)
