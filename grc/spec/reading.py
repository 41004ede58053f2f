"""A spec file's text, whatever is at its path: every way the bytes can be unusable is a SpecError
``file:line: (file): message``, decided before YAML sees them.

Checked in this order, so nothing blocks or reads without bound: the path exists and resolves (a
symlink loop is named), it is a regular file (a FIFO would block ``open`` forever, a directory or
device is no spec), its size is at most ``MAX_SPEC_BYTES``, the bytes are UTF-8, and no control
character is in them (YAML forbids them; naming the line here beats the parser's offset).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from grc.errors import SpecError
from grc.spec.limits import MAX_SPEC_BYTES

FILE_FIELD = "(file)"
# C0 controls except tab, newline and carriage return; DEL, C1 controls; surrogates and the two
# non-characters YAML rejects (the same set as PyYAML's reader, which reports only an offset).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def _problem(display: str, line: int, message: str, via: str) -> SpecError:
    return SpecError([f"{display}:{line}: {FILE_FIELD}: {message}{via}"])


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def path_problem(path: Path) -> str | None:
    """Why the file at ``path`` cannot be a spec without reading it (None: it may be one)."""
    try:
        info = os.stat(path)  # follows symlinks: ELOOP names a loop
    except (OSError, ValueError) as exc:
        code = getattr(exc, "errno", None) or 0
        return {
            errno.ENOENT: "file not found",
            errno.ELOOP: "symlink loop (a link that leads back to itself)",
            errno.ENOTDIR: "file not found (a parent is not a folder)",
            errno.EACCES: "permission denied",
        }.get(code, getattr(exc, "strerror", None) or str(exc))
    if not stat.S_ISREG(info.st_mode):
        return f"is {_kind(info.st_mode)}, not a spec file (a YAML file)"
    if info.st_size > MAX_SPEC_BYTES:
        return (
            f"{info.st_size:,} bytes; a spec file may hold at most {MAX_SPEC_BYTES:,} bytes "
            "(specs are a few KiB: this is not one)"
        )
    return None


def read_spec_text(path: Path, display: str, via: str = "") -> str:
    """The text of the spec file at ``path``; ``via`` is appended to messages (who pointed here)."""
    problem = path_problem(path)
    if problem:
        raise _problem(display, 1, problem, via)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)  # the file may have grown since stat
    except OSError as exc:
        raise _problem(display, 1, f"cannot read: {exc.strerror or exc}", via) from None
    if len(data) > MAX_SPEC_BYTES:
        raise _problem(display, 1, f"more than {MAX_SPEC_BYTES:,} bytes; a spec file may hold at most that", via)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _problem(
            display,
            _line_at(data, exc.start),
            f"byte 0x{data[exc.start]:02x} is not UTF-8 (a spec is UTF-8 text; is this a binary file?)",
            via,
        ) from None
    bad = _CONTROL.search(text)
    if bad:
        raise _problem(
            display,
            text.count("\n", 0, bad.start()) + 1,
            f"control character U+{ord(bad.group()):04X} is not allowed in a spec (YAML text)",
            via,
        )
    return text
