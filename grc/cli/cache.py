"""``grc cache stats|prune|verify``: inspect and maintain the local build cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from grc.cli.common import guard

app = typer.Typer(
    name="cache",
    no_args_is_help=True,
    help="Inspect and maintain the local build cache (objects by digest, action records).",
)

CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", show_default=False, help="the cache folder (default $GRC_CACHE_DIR or ~/.cache/grc)"),
]


def _store(cache_dir: Path | None):  # type: ignore[no-untyped-def]
    from grc.cache.store import LocalStore, default_dir

    return LocalStore(cache_dir or default_dir())


@app.command()
@guard
def stats(cache_dir: CacheDirOpt = None) -> None:
    """Count action records and objects, and their size.

    \b
    Examples:
      grc cache stats
      grc cache stats --cache-dir /mnt/shared/grc-cache
    """
    from grc.cache import admin

    store = _store(cache_dir)
    s = admin.stats(store)
    print(f"{store.root}: {s.records} action records, {s.objects} objects, {s.object_bytes / 2**20:.1f} MiB")


@app.command()
@guard
def prune(
    max_size: Annotated[str, typer.Option("--max-size", help="target size, e.g. 500M, 10G")] = "10G",
    cache_dir: CacheDirOpt = None,
) -> None:
    """Shrink the cache to --max-size, dropping the least recently used records first.

    \b
    Examples:
      grc cache prune --max-size 2G
    """
    from grc.cache import admin

    removed, freed = admin.prune(_store(cache_dir), admin.parse_size(max_size))
    print(f"pruned {removed} action records, freed {freed / 2**20:.1f} MiB")


@app.command()
@guard
def verify(cache_dir: CacheDirOpt = None) -> int:
    """Re-hash every object, drop the corrupt ones; exit 1 when any was found.

    \b
    Examples:
      grc cache verify
    """
    from grc.cache import admin

    bad = admin.verify(_store(cache_dir))
    print(f"{len(bad)} corrupt objects removed" if bad else "every object matches its digest")
    return 1 if bad else 0
