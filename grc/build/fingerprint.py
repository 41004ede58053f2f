"""Fingerprints: one digest per spec leaf a stage reads and per source file it runs.

Kept per leaf (not one hash per stage) so ``grc plan`` can say *which* field or file changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (multi-GB weight shards never sit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _leaves(value: Any, path: str) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key in sorted(value):
            out.update(_leaves(value[key], f"{path}.{key}" if path else key))
        return out or {path: "{}"}
    return {path: json.dumps(value, sort_keys=True)}


def _subtree(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def spec_fields(spec_data: dict[str, Any], reads: tuple[str, ...]) -> dict[str, str]:
    """{"model.hstu.num_heads": digest, ...} for every leaf under the paths a stage reads."""
    out: dict[str, str] = {}
    for dotted in reads:
        for leaf, text in _leaves(_subtree(spec_data, dotted), dotted).items():
            out[leaf] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def changed(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Keys whose digest differs, appeared or disappeared."""
    if old is None:
        return ["(never built)"]
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]
