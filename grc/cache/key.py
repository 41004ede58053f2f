"""What decides a task's output, and the key built from it.

A key hashes: the spec leaves the stage reads, the stage's source files (the stage module and
everything it imports from grc/, kernels/, plugins/, found by reading import statements, plus
any non-Python sources it declares), the versions of the toolkits that shape its output, the
host's GPUs for stages that build for them, and the manifests of its input stages (which carry
the digests of big artifacts, so multi-GB files are never re-hashed). ``grc plan`` shows the
parts; the cache stores outputs under the key.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCAL_PACKAGES = ("grc", "kernels", "plugins")
# The stage registry imports every stage; it wires the graph and is no stage's code. Following
# it would make each stage's key depend on all the others.
WIRING = {REPO / "grc" / "stages" / "__init__.py"}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in LOCAL_PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement, descending only into statement blocks (imports live nowhere else); far
    cheaper than ast.walk, which visits every expression node: no-op builds hash code each time."""
    for node in body:
        yield node
        for block in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(node, block, []) or [])
        for handler in getattr(node, "handlers", []) or []:
            yield from _statements(handler.body)


@cache
def _imports(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return frozenset(names)


@cache
def import_closure(module: str) -> tuple[Path, ...]:
    """Every local source file ``module`` reaches through imports (its packages' __init__ too)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            path = _module_file(".".join(parts[:i]))
            if path is not None and path not in seen and path not in WIRING:
                seen.add(path)
                todo.extend(_imports(path))
    return tuple(sorted(seen))


def toolkit_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def code_digests(module: str, extra: tuple[str, ...]) -> dict[str, str]:
    files = set(import_closure(module))
    for rel in extra:
        path = REPO / rel
        files.update(
            p
            for p in (sorted(path.rglob("*")) if path.is_dir() else [path])
            if p.is_file() and "__pycache__" not in p.parts
        )
    return {f"code:{p.relative_to(REPO)}": hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(files)}


def toolkit_digests(toolkits: tuple[str, ...]) -> dict[str, str]:
    return {f"toolkit:{t}": toolkit_version(t) for t in toolkits}


@cache
def host_gpus() -> str:
    """This host's NVIDIA GPUs (name and compute capability, one per line) or "none": part of the
    key of stages whose output depends on the GPU they run on (a GPU package is built, or recorded
    as skipped, by what the host has). nvidia-smi, not torch: no-op builds must stay cheap."""
    from grc.engine.toolkits import local_gpus

    return "\n".join(f"{g.name}, sm{g.sm}" for g in local_gpus()) or "none"


def host_digests(depends_on_gpu: bool) -> dict[str, str]:
    return {"host:gpus": host_gpus()} if depends_on_gpu else {}


def input_digests(inputs: dict[str, Path]) -> dict[str, str]:
    """Input stage -> the digest of the file of its output the stage reads (its manifest, or a part)."""
    return {
        f"input:{name}": hashlib.sha256(file.read_bytes()).hexdigest()[:16] for name, file in sorted(inputs.items())
    }


def action_key(stage: str, parts: dict[str, str]) -> str:
    # format 2: action records hold the whole tree (folders, modes, links), not a list of files
    blob = json.dumps({"stage": stage, "parts": parts, "format": 2}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
