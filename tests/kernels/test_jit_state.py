"""kernels.tuning.jit_state: what the history cache's captures count (compiled Triton variants, autotuned keys)
runs on a served request's path, so it must finish and never raise whatever grc's kernel modules hold. On a GPU its
counts grow as kernels compile and tune (read by the device benches); here it walks every kernel module."""

from __future__ import annotations

import time

import kernels  # noqa: F401  (imports every kernel module)
from kernels.tuning import jit_state


def test_jit_state_walks_every_kernel_module_quickly() -> None:
    started = time.perf_counter()
    compiled, tuned = jit_state()
    assert isinstance(compiled, int) and isinstance(tuned, int) and compiled >= 0 and tuned >= 0
    assert time.perf_counter() - started < 1.0  # a capture's own cost is ~10 ms
