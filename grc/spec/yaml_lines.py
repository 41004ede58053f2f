"""Safe YAML loading that remembers where every value came from.

Spec errors must name ``file:line``; PyYAML's composed node tree carries the marks, so we build
plain Python data from it ourselves and keep a map ``field path -> (file, line)`` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grc.errors import SpecError

Path_ = tuple[str | int, ...]


@dataclass
class Located:
    """Data loaded from one YAML file, plus the source line of each field path."""

    data: Any
    lines: dict[Path_, tuple[str, int]] = field(default_factory=dict)


class _Constructor(yaml.constructor.SafeConstructor):
    """SafeConstructor, used only for scalars: no Python object tags, ever."""


def _build(node: yaml.Node, path: Path_, where: str, lines: dict[Path_, tuple[str, int]]) -> Any:
    lines[path] = (where, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _Constructor().construct_object(key_node)
            if not isinstance(key, str):
                raise SpecError([f"{where}:{key_node.start_mark.line + 1}: keys must be strings (got {key!r})"])
            if key in out:
                raise SpecError([f"{where}:{key_node.start_mark.line + 1}: {_dotted((*path, key))}: duplicate key"])
            out[key] = _build(value_node, (*path, key), where, lines)
            lines[(*path, key)] = (where, key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), where, lines) for i, item in enumerate(node.value)]
    return _Constructor().construct_object(node)


def _dotted(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def dotted(path: Path_) -> str:
    """``("model", "hstu", "num_heads")`` -> ``model.hstu.num_heads``; list indices in brackets."""
    return _dotted(path)


def load_located(file: Path, display: str) -> Located:
    """Parse ``file`` safely; syntax errors become SpecErrors with the line YAML reports."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{display}: file not found"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise SpecError([f"{display}:{line}: YAML syntax: {exc.problem}"]) from None
    lines: dict[Path_, tuple[str, int]] = {}
    if node is None:
        return Located({}, {(): (display, 1)})
    try:
        data = _build(node, (), display, lines)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise SpecError([f"{display}:{line}: YAML: {exc.problem}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{display}:1: a spec must be a mapping of sections (got {type(data).__name__})"])
    return Located(data, lines)
