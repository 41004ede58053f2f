"""Safe, bounded YAML loading that remembers where every value came from.

Spec errors must name ``file:line``; PyYAML's composed node tree carries the marks, so we build
plain Python data from it ourselves and keep a map ``field path -> (file, line)`` beside it.
Nothing in a file can make this hang or exhaust memory: the text is bounded (grc.spec.reading),
nesting is checked on the event stream before a node tree is composed (the composers recurse), and
aliases are expanded against a budget of values (an alias bomb is a few lines that expand to
billions). Floats may be written YAML 1.2 style (``1e-5``, ``2E3``): YAML 1.1 reads those as strings,
which the schema's strict number fields would reject for a reason no user could guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grc.errors import SpecError
from grc.spec.limits import MAX_YAML_DEPTH, MAX_YAML_VALUES
from grc.spec.reading import FILE_FIELD, read_spec_text

Path_ = tuple[str | int, ...]

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml parses ~20x faster


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader (no Python object tags, ever) that also reads YAML 1.2 exponent floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


@dataclass
class Located:
    """Data loaded from one YAML file, plus the source line of each field path."""

    data: Any
    lines: dict[Path_, tuple[str, int]] = field(default_factory=dict)


@dataclass
class _Builder:
    """Turns a node tree into plain data, counting values so shared (aliased) nodes cannot explode."""

    where: str
    lines: dict[Path_, tuple[str, int]] = field(default_factory=dict)
    values: int = 0

    def fail(self, node: yaml.Node, path: Path_, message: str) -> SpecError:
        return SpecError([f"{self.where}:{node.start_mark.line + 1}: {dotted(path)}: {message}"])

    def scalar(self, node: yaml.Node, path: Path_) -> Any:
        try:
            return yaml.constructor.SafeConstructor().construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            raise self.fail(node, path, f"YAML: {exc.problem}") from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            raise self.fail(node, path, f"not a usable value: {exc}") from None

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise self.fail(
                node,
                path,
                f"more than {MAX_YAML_VALUES:,} values once aliases are expanded "
                "(a spec has a few hundred; is this an alias bomb?)",
            )
        if len(path) > MAX_YAML_DEPTH:  # only reachable through an alias that contains itself
            raise self.fail(node, path, f"nested deeper than {MAX_YAML_DEPTH} levels (an alias inside itself?)")
        self.lines[path] = (self.where, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    shown = repr(key) if isinstance(key_node, yaml.ScalarNode) else "a collection"
                    raise self.fail(key_node, path, f"keys must be strings (got {shown})")
                if key in out:
                    raise self.fail(key_node, (*path, key), "duplicate key")
                out[key] = self.build(value_node, (*path, key))
                self.lines[(*path, key)] = (self.where, key_node.start_mark.line + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalar(node, path)


def dotted(path: Path_) -> str:
    """``("model", "hstu", "num_heads")`` -> ``model.hstu.num_heads``; list indices in brackets."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def _syntax_error(exc: yaml.YAMLError, display: str) -> SpecError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else 1
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return SpecError([f"{display}:{line}: {FILE_FIELD}: YAML syntax: {problem}"])


def _check_depth(text: str, display: str) -> None:
    """Walk the event stream (the parsers iterate; the composers recurse) and refuse deep nesting."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else 1
                raise SpecError(
                    [
                        f"{display}:{line}: {FILE_FIELD}: nested deeper than {MAX_YAML_DEPTH} levels "
                        "(a spec is at most 5 deep)"
                    ]
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_located(file: Path, display: str, via: str = "") -> Located:
    """Parse ``file`` safely; every problem becomes a SpecError with the line it is on."""
    text = read_spec_text(file, display, via)
    try:
        _check_depth(text, display)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, display) from None
    if node is None:
        return Located({}, {(): (display, 1)})
    builder = _Builder(display)
    data = builder.build(node, ())
    if not isinstance(data, dict):
        raise SpecError([f"{display}:1: (top level): a spec must be a mapping of sections (got {type(data).__name__})"])
    return Located(data, builder.lines)
