"""Load a spec: YAML files joined by ``extends``, validated by the pydantic schema.

Every problem becomes one line ``file:line: field.path: what was expected (got what)``; typos get
the nearest valid key. ``extends`` is relative to the file that says it; maps merge deeply, lists
and scalars replace; a cycle, a chain of more than ``MAX_EXTENDS`` files or a target that is no
readable file is an error at the ``extends`` line. What a file's bytes may be is reading.py's and
yaml_lines.py's to say; at most ``MAX_PROBLEMS`` problems are listed.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from grc.errors import SpecError
from grc.spec.limits import MAX_EXTENDS, MAX_PROBLEMS
from grc.spec.reading import path_problem
from grc.spec.schema import Spec
from grc.spec.yaml_lines import Located, Path_, dotted, load_located


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from (the files in ``extends`` order, base first)."""

    spec: Spec
    path: Path
    files: tuple[Path, ...]
    raw: dict[str, Any]


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _real(path: Path) -> Path:
    """The file a path names, for cycle detection; a symlink loop stays as written (reading names it)."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return path


def _resolve(path: Path, chain: tuple[Path, ...], via: str = "") -> tuple[Located, tuple[Path, ...]]:
    """Load ``path`` and everything it extends; return merged data and the files, base first."""
    path = _real(path)
    if path in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, path))
        raise SpecError([f"{_display(chain[-1])}:1: extends: cycle {cycle}"])
    own = load_located(path, _display(path), via)
    parent_ref = own.data.pop("extends", None)
    if parent_ref is None:
        return own, (path,)
    where, line = own.lines[("extends",)]
    if not isinstance(parent_ref, str) or not parent_ref or "\0" in parent_ref:
        raise SpecError([f"{where}:{line}: extends: expected a file path (got {_shown(parent_ref)})"])
    if len(chain) + 1 >= MAX_EXTENDS:
        raise SpecError([f"{where}:{line}: extends: more than {MAX_EXTENDS} files in one extends chain"])
    parent_path = path.parent / parent_ref
    problem = path_problem(parent_path)
    if problem:
        raise SpecError([f"{where}:{line}: extends: {_display(parent_path)}: {problem}"])
    parent, files = _resolve(parent_path, (*chain, path), f" (extended by {where}:{line})")
    lines = dict(parent.lines)
    lines.update({k: v for k, v in own.lines.items() if k != ("extends",)})
    return Located(_deep_merge(parent.data, own.data), lines), (*files, path)


def _unwrap(annotation: Any) -> Any:
    """The model class inside ``X | None``, ``list[X]``, ``dict[str, X]`` (for walking field paths)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _unwrap(arg)
    if origin in (list, dict):
        return _unwrap(typing.get_args(annotation)[-1])
    return annotation


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section at ``loc`` (to suggest the nearest one for a typo)."""
    current: Any = Spec
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _unwrap(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


# "field: ...", "field[2]: ..." or, from a cross-section rule, "section.field: ..." (a dotted path
# below the validated model): the message's own path, so the error points at that key's line
_FIELD_PREFIX = re.compile(r"^(?P<field>[a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): (?P<rest>.*)$", re.S)


def _message(err: Any) -> tuple[tuple[Any, ...], str]:
    """Turn one pydantic error into (field path, human message)."""
    loc = tuple(err["loc"])
    kind = err["type"]
    got = _shown(err.get("input"))
    if loc and loc[-1] == "[key]":  # a dict key failed its own type: the path ends at the key
        loc = loc[:-1]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        near = difflib.get_close_matches(key, _fields_at(loc[:-1]), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(_fields_at(loc[:-1]))}"
        return loc, f"unknown key{hint}"
    if kind == "missing":
        return loc, "required field is missing"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "value_error":
        match = _FIELD_PREFIX.match(msg)
        if match:
            for field in match["field"].split("."):
                name, _, index = field.partition("[")
                loc = (*loc, name) + ((int(index.rstrip("]")),) if index else ())
            return loc, match["rest"]
        return loc, msg
    msg = msg.replace("Input should be", "expected").replace("String should", "expected a name to")
    msg = msg[0].lower() + msg[1:] if msg else msg
    return loc, f"{msg} (got {got})"


def _shown(value: Any, limit: int = 80) -> str:
    """repr of a wrong value, cut short: a section given where a number belongs can be any size."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _line_of(loc: tuple[Any, ...], located: Located, fallback: str) -> tuple[str, int]:
    for end in range(len(loc), -1, -1):
        hit = located.lines.get(loc[:end])
        if hit:
            return hit
    return fallback, 1


def load_spec(path: str | Path) -> LoadedSpec:
    """Load and validate a spec file. Raises SpecError listing every problem found."""
    path = Path(path)
    located, files = _resolve(path, ())
    data = dict(located.data)
    data.setdefault("name", path.stem)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = []
        for err in errors[:MAX_PROBLEMS]:
            loc, msg = _message(err)
            where, line = _line_of(loc, located, _display(path))
            problems.append(f"{where}:{line}: {dotted(loc)}: {msg}")
        if len(errors) > MAX_PROBLEMS:
            problems.append(
                f"{_display(path)}:1: (top level): {len(errors) - MAX_PROBLEMS:,} more problems "
                f"(the first {MAX_PROBLEMS} are above)"
            )
        raise SpecError(problems) from None
    return LoadedSpec(spec=spec, path=path.resolve(), files=files, raw=data)


def field_path(loc: Path_) -> str:
    return dotted(loc)
