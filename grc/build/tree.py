"""A stage's output folder as grc records it: every folder, file and symbolic link, with its mode,
each file's sha256 and size, each link's target.

The build cache stores this tree per action, so that a restored output is the same tree as a built
one (empty folders such as a Triton ensemble's ``1/``, modes, links), not just the same files; the
build keeps it per stage output with each file's stat stamp (``grc/build/outputs.py``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from grc.build.fingerprint import sha256_file

KINDS = ("dir", "file", "link")
BYTECODE_CACHE = "__pycache__"


class UnsafeTree(ValueError):
    """A recorded tree names a path outside its folder (``..``, absolute) or a kind grc does not write."""


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the folder, "/"-separated
    kind: str  # "dir" | "file" | "link"
    mode: int = 0  # permission bits (files and folders)
    sha256: str = ""  # files
    bytes: int = 0  # files
    target: str = ""  # links: what the link says, relative to its own folder


def walk(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under ``folder``, sorted, links never followed. Python's
    bytecode caches are left out: the interpreter that serves a bundle writes them (Triton's python
    backend compiles each ``model.py``), they are no part of what grc built."""
    for top, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d != BYTECODE_CACHE)
        base = Path(top)
        for name in (*dirs, *sorted(files)):
            path = base / name
            yield path.relative_to(folder).as_posix(), path.lstat()


def kind_of(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "link"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "file" if stat.S_ISREG(st.st_mode) else "other"


def scan(folder: Path, known: dict[str, str]) -> list[Entry]:
    """The tree of ``folder``; a file's digest comes from ``known`` (relative path -> sha256, what the
    stage computed while writing: multi-GB shards are never hashed twice) or is computed here."""
    entries = []
    for rel, st in walk(folder):
        kind = kind_of(st)
        if kind == "link":
            entries.append(Entry(rel, "link", target=os.readlink(folder / rel)))
        elif kind == "dir":
            entries.append(Entry(rel, "dir", stat.S_IMODE(st.st_mode)))
        elif kind == "file":
            digest = known.get(rel) or sha256_file(folder / rel)
            entries.append(Entry(rel, "file", stat.S_IMODE(st.st_mode), digest, st.st_size))
        else:
            raise UnsafeTree(f"{folder / rel} is neither a file, a folder nor a link")
    return entries


def escapes(entry: Entry) -> bool:
    """Whether the entry's path (or a link's target) leaves the folder it belongs to."""
    path = PurePosixPath(entry.path)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        return True
    if entry.kind != "link":
        return False
    target = PurePosixPath(entry.target)
    if target.is_absolute():
        return True
    depth = len(path.parts) - 1  # folders above the link, inside the tree
    for part in target.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def to_json(entries: list[Entry]) -> list[dict[str, Any]]:
    keep = {
        "dir": ("path", "kind", "mode"),
        "file": ("path", "kind", "mode", "sha256", "bytes"),
        "link": ("path", "kind", "target"),
    }
    return [{k: v for k, v in asdict(e).items() if k in keep[e.kind]} for e in entries]


def from_json(items: Any) -> list[Entry]:
    """Entries read back from a record (the store's, perhaps a remote one): checked, never trusted."""
    if not isinstance(items, list):
        raise UnsafeTree("the record holds no tree")
    entries = []
    for item in items:
        try:
            entry = Entry(**item)
            unsafe = entry.kind not in KINDS or escapes(entry) or entry.mode & ~0o777
        except TypeError as exc:
            raise UnsafeTree(f"malformed entry {item!r}") from exc
        if unsafe:
            raise UnsafeTree(f"entry {item!r} is unsafe (a path or link outside its folder, or a special mode)")
        entries.append(entry)
    return entries
