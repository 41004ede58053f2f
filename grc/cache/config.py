"""Which cache a build uses: environment first, CLI flags override (see ``grc build --help``).

GRC_CACHE=on|off              the build cache on (default) or off (also 1/0, true/false, yes/no)
GRC_CACHE_DIR=PATH            the local store (default ~/.cache/grc)
GRC_REMOTE_CACHE=URL          an HTTP store (GET/PUT/HEAD /cas/<digest>, /ac/<key>)
GRC_REMOTE_CACHE_READ_ONLY=1  download only (untrusted pipelines never upload)

A value grc cannot use is refused before any work, naming the setting and what it expects
(``SettingError``): a mistyped setting never silently means "on", and a store that cannot be
written never shows up later as a failed stage.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from grc.build.atomic import make_writable_folder
from grc.cache.store import Cache, HttpStore, LocalStore, default_dir
from grc.errors import SettingError

ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")


def _flag(name: str, flag: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value not in ON + OFF:
        raise SettingError(f"{name}={raw!r} ({flag}): expected on or off (also 1/0, true/false, yes/no)")
    return value in ON


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


def _writable_folder(folder: Path) -> None:
    what = f"the build cache folder {folder} (--cache-dir, GRC_CACHE_DIR)"
    expected = "expected a folder grc can create and write; choose another or pass --no-cache"
    if folder.exists() and not folder.is_dir():
        raise SettingError(f"{what} is not a folder; {expected}")
    try:
        make_writable_folder(folder)
    except OSError as exc:
        raise SettingError(f"{what} cannot be written ({exc.strerror or exc}); {expected}") from None


def _remote_url(raw: str) -> str:
    url = urllib.parse.urlsplit(raw.strip())
    if url.scheme not in ("http", "https") or not url.netloc:
        raise SettingError(
            f"the remote cache {raw!r} (--remote-cache, GRC_REMOTE_CACHE): expected an http:// or "
            "https:// URL of a store answering GET/PUT/HEAD of URL/cas/<digest> and URL/ac/<key>"
        )
    return raw.strip()


def open_cache() -> Cache | None:
    """The cache the settings describe (None when off); SettingError when a setting is unusable."""
    if not _flag("GRC_CACHE", "--no-cache", True):
        return None
    folder = default_dir()
    _writable_folder(folder)
    remote_url = os.environ.get("GRC_REMOTE_CACHE")
    read_only = _flag("GRC_REMOTE_CACHE_READ_ONLY", "--remote-read-only", False)
    remote = HttpStore(_remote_url(remote_url), read_only) if remote_url else None
    return Cache(LocalStore(folder), remote)
