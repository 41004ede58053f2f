"""Autotuning settings shared by grc's Triton kernels.

``PERSIST``: keep each autotuning's pick in Triton's on-disk cache (``cache_results``, next to the compiled
kernels in ~/.triton/cache or TRITON_CACHE_DIR), so a restarted server, or a second process on the host, skips
the tuning a new key costs (the history cache's first hit of a new attention key spent ~7 s on the H200 tuning
and compiling, bench/results/history-cache-notes.md); the compiled kernels are cached there already. Empty on a
Triton whose ``autotune`` has no such option.
"""

from __future__ import annotations

import inspect
from typing import Any

import triton

PERSIST: dict[str, Any] = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)
