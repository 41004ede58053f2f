"""Placing large files (weights, tables, engines) into a bundle."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link (same filesystem: multi-GB weights cost nothing), else copy. Returns which."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"
