"""What grc last wrote into each stage's output folder, so that an output changed behind grc's back
(a file edited, truncated, deleted or added, a mode changed) is never trusted.

``artifacts/<spec>/.outputs/<stage>.json`` holds the folder's tree (grc/build/tree.py: folders,
files with sha256 and mode, links) and each file's stat stamp (size, mtime_ns, inode) at the time
grc wrote or last checked it. A check costs one lstat per entry; a file is hashed again only when
its stamp changed (git's index works so), and a build stores the new stamp when the content is
the same (a ``touch``, a copied artifacts folder), so the next check is cheap again.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from grc.build.atomic import write_file
from grc.build.fingerprint import sha256_file
from grc.build.tree import Entry, UnsafeTree, from_json, kind_of, to_json, walk

FOLDER = ".outputs"
# A file written less than this long before its stamp is taken could be written again within the
# same timestamp tick, size unchanged, and keep its stamp ("racy git"): such a file gets no stamp and
# is hashed at the next check instead. Linux stamps files from a clock that ticks at least every 10 ms;
# kept short, because a restore copies every file just before stamping (multi-GB shards included).
RACY_NS = 20_000_000


def record_path(root: Path, stage: str) -> Path:
    return root / FOLDER / f"{stage}.json"


def _stamp(st: os.stat_result, now_ns: int) -> list[int] | None:
    if now_ns - st.st_mtime_ns < RACY_NS:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def save(root: Path, stage: str, folder: Path, entries: list[Entry], stamps: dict[str, Any] | None = None) -> None:
    """Record ``entries`` as what ``folder`` holds now, stamping every file (or using ``stamps``)."""
    if stamps is None:
        now = time.time_ns()
        stamps = {e.path: _stamp((folder / e.path).lstat(), now) for e in entries if e.kind == "file"}
    data = {"format": 1, "stage": stage, "tree": to_json(entries), "stamps": stamps}
    write_file(record_path(root, stage), json.dumps(data, sort_keys=True).encode())


def _load(root: Path, stage: str) -> tuple[list[Entry], dict[str, Any]] | None:
    try:
        data = json.loads(record_path(root, stage).read_text())
        return from_json(data["tree"]), dict(data["stamps"])
    except (OSError, ValueError, KeyError, TypeError, UnsafeTree):
        return None


def _differs(entry: Entry, path: Path, st: os.stat_result, recorded: Any) -> str | None:
    """How the thing at ``path`` differs from what grc wrote there, or None; hashes only a file whose
    stamp changed."""
    kind = kind_of(st)
    if kind != entry.kind:
        return f"is now a {kind}, grc wrote a {entry.kind}"
    if kind == "link":
        target = os.readlink(path)
        return None if target == entry.target else f"link now points to {target}, grc wrote {entry.target}"
    if stat.S_IMODE(st.st_mode) != entry.mode:
        return f"mode now {stat.S_IMODE(st.st_mode):o}, grc wrote {entry.mode:o}"
    if kind == "dir" or recorded == [st.st_size, st.st_mtime_ns, st.st_ino]:
        return None
    if st.st_size != entry.bytes:
        return f"now {st.st_size} bytes, grc wrote {entry.bytes}"
    if sha256_file(path) != entry.sha256:
        return "content changed (sha256 differs from what grc wrote)"
    return None


def changes(root: Path, stage: str, folder: Path, refresh: bool = False) -> list[str]:
    """How ``folder`` differs from what grc last wrote there: one line per path (relative to
    ``root``), [] when everything matches. ``refresh`` stores new stamps of files whose content
    is unchanged (the build does, under its lock; ``grc plan`` writes nothing)."""
    name = folder.relative_to(root).as_posix()
    if not folder.is_dir():
        return [f"{name}/: missing"]
    record = _load(root, stage)
    if record is None:
        return [f"{name}/: no record of what grc wrote here ({record_path(root, stage)} is missing or unreadable)"]
    entries, stamps = record
    found = dict(walk(folder))
    reasons = []
    for entry in entries:
        st = found.pop(entry.path, None)
        how = "deleted" if st is None else _differs(entry, folder / entry.path, st, stamps.get(entry.path))
        if how:
            reasons.append(f"{name}/{entry.path}: {how}")
    reasons += [f"{name}/{path}: added after grc wrote the folder" for path in found]
    if refresh and not reasons:
        now = time.time_ns()
        fresh = {e.path: _stamp((folder / e.path).lstat(), now) for e in entries if e.kind == "file"}
        if fresh != stamps:
            save(root, stage, folder, entries, fresh)
    return reasons
