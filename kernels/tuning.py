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


def jit_state() -> tuple[int, int]:
    """(compiled variants, autotuned keys) held by grc's Triton kernels in this process, summed: the difference
    across a call says whether it compiled (a new specialisation) or autotuned (a new key) on its way (the
    history cache's captures count both, grc/serving/common/score_graphs.py)."""
    import sys

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    compiled = tuned = 0
    seen: set[int] = set()  # a kernel imported by another module is one kernel
    for name, module in list(sys.modules.items()):
        if not name.startswith("kernels.") or module is None:
            continue
        for obj in vars(module).values():
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, Autotuner):
                tuned += len(getattr(obj, "cache", {}))
                obj = obj.fn
            for _ in range(4):  # heuristics and other wrappers hold the kernel as .fn (bounded: no cycle can hang)
                if isinstance(obj, JITFunction) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, JITFunction):
                # each device's entry leads with its kernel cache in Triton 3.x ({key: kernel}, then target,
                # backend, binder); read defensively: this runs on a served request's path at a capture
                entries = getattr(obj, "device_caches", {}).values()
                compiled += sum(len(e[0]) for e in entries if isinstance(e, tuple) and e and isinstance(e[0], dict))
    return compiled, tuned
