"""Which cache a build uses: environment first, CLI flags override (see ``grc build --help``).

GRC_CACHE=off                 no cache at all
GRC_CACHE_DIR=PATH            the local store (default ~/.cache/grc)
GRC_REMOTE_CACHE=URL          an HTTP store (GET/PUT/HEAD /cas/<digest>, /ac/<key>)
GRC_REMOTE_CACHE_READ_ONLY=1  download only (untrusted pipelines never upload)
"""

from __future__ import annotations

import os
from pathlib import Path

from grc.cache.store import Cache, HttpStore, LocalStore, default_dir


def _env_on(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "off", "false", "no", "")


def configure(
    enabled: bool | None = None, directory: Path | None = None, remote: str | None = None, read_only: bool | None = None
) -> None:
    """CLI overrides, applied through the environment so plain-doit subprocesses see them too."""
    if enabled is not None:
        os.environ["GRC_CACHE"] = "on" if enabled else "off"
    if directory is not None:
        os.environ["GRC_CACHE_DIR"] = str(directory)
    if remote is not None:
        os.environ["GRC_REMOTE_CACHE"] = remote
    if read_only is not None:
        os.environ["GRC_REMOTE_CACHE_READ_ONLY"] = "1" if read_only else "0"


def open_cache() -> Cache | None:
    if not _env_on("GRC_CACHE", "on"):
        return None
    remote_url = os.environ.get("GRC_REMOTE_CACHE")
    remote = HttpStore(remote_url, _env_on("GRC_REMOTE_CACHE_READ_ONLY", "0")) if remote_url else None
    return Cache(LocalStore(default_dir()), remote)
