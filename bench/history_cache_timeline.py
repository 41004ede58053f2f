"""Where a device run of the history-cache bench spends its time, and what it may still start.

On the H200 most of a shape's time is Triton compiling grc's attention kernel: each new autotuning key
(``kernels/hstu_attention.py``: heads, dims, dtype, PARTIAL, SEQ_BUCKET) compiles every config listed for
the head dim (4 at mtgr's head dim 256, 4-5 s each for sm_90 on the CPU host: bench/history_cache_compile.py;
~7-9 s estimated on the H200's, bench/results/history-cache-notes.md), and every new integer
specialisation (a token count divisible by 16 or not) compiles the chosen config once more. A run cut by
its time limit must still say where it was, so:

- ``Clock.say`` prints every line with the UTC time and the seconds since the start;
- ``ShapeRun.phase`` prints a line as each phase of a shape starts, times it, counts the kernels Triton
  compiled and the keys it tuned during it, saves the partial result after it, and refuses to start a
  phase past the shape's deadline (``Cut``: the row says which phase was not started and why);
- ``Costs`` estimates a shape before it starts: the autotuning keys it will tune that are not tuned yet,
  times the measured (or assumed) seconds per key, plus the time the last shape of its spec and dtype
  took once compiled. A shape whose estimate does not fit before the deadline is skipped, said so.
"""

from __future__ import annotations

import datetime
import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Cut(Exception):
    """A phase not started: its shape's (or the run's) time is spent."""


class Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        print(f"[{now} +{self.elapsed():6.1f} s] {message}", flush=True)


def compiled_kernels() -> int | None:
    """How many kernels Triton has compiled in this process for grc's attention and norm-gate kernels
    (every config and integer specialisation counts); None where Triton keeps no such cache (the
    interpreter) or its layout is not the one read here."""
    total, found = 0, False
    for name in (
        "kernels.hstu_attention",
        "kernels.norm_gate",
    ):  # the modules (kernels/ exports functions of their names)
        for obj in vars(importlib.import_module(name)).values():
            jit = obj if hasattr(obj, "device_caches") else getattr(obj, "fn", None)  # the autotuner wraps one
            caches = getattr(jit, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            try:
                total += sum(len(per_device[0]) for per_device in caches.values())
                found = True
            except (TypeError, IndexError, KeyError):
                return None
    return total if found else None


def tuned_keys() -> dict[str, str]:
    """The attention kernel's autotuning cache: key -> the config it picked (empty when one config is
    listed, as under the interpreter: nothing is tuned)."""
    from kernels.hstu_attention import _hstu_fwd_kernel

    return {str(key): str(config) for key, config in getattr(_hstu_fwd_kernel, "cache", {}).items()}


class ShapeRun:
    """The phases of one shape: ``with run.phase(name, what):`` prints ``label: name: what`` as it starts, and
    records in ``row`` its seconds (``phase_s``), the kernels compiled (``compiled``) and the keys tuned
    (``autotuned``) during it; ``save`` runs after each phase (the partial row reaches the JSON)."""

    def __init__(self, clock: Clock, label: str, deadline: float, row: dict[str, Any], save: Callable[[], None]):
        self.clock, self.label, self.deadline, self.row, self.save = clock, label, deadline, row, save
        row.setdefault("phase_s", {})

    @contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        at = self.clock.elapsed()
        if at > self.deadline:
            raise Cut(
                f"{name} ({what}) not started: the shape's time ran out at +{self.deadline:.0f} s (now +{at:.0f} s)"
            )
        self.clock.say(f"{self.label}: {name}: {what}")
        kernels, keys = compiled_kernels(), tuned_keys()
        start = time.perf_counter()
        try:
            yield
        finally:  # a phase that raised is recorded too (the shape's row says the error)
            self.row["phase_s"][name] = round(time.perf_counter() - start, 3)
            after = compiled_kernels()
            if kernels is not None and after is not None and after > kernels:
                self.row.setdefault("compiled", {})[name] = after - kernels
            new = {k: v for k, v in tuned_keys().items() if k not in keys}
            if new:
                self.row.setdefault("autotuned", {})[name] = new
            self.save()


class Costs:
    """Seconds a shape is expected to take: ``new_keys`` autotuning keys at ``per_key_s`` each (the
    assumed figure until a shape has measured it: its first calls' time over the keys it tuned), plus
    its spec and dtype's last compiled-shape time (``steady_s`` until one ran)."""

    def __init__(self, per_key_s: float, steady_s: float):
        self.per_key_s, self.default_steady_s = per_key_s, steady_s
        self.steady: dict[tuple[str, str], float] = {}
        self.measured_key_s = False

    def estimate(self, spec: str, dtype: str, new_keys: int) -> float:
        return self.steady.get((spec, dtype), self.default_steady_s) + new_keys * self.per_key_s

    def update(self, spec: str, dtype: str, seconds: float, first_calls_s: float, new_keys: int) -> None:
        """A shape took ``seconds``, ``first_calls_s`` of them in first calls (compiles, autotuning)."""
        self.steady[(spec, dtype)] = max(seconds - first_calls_s, 0.0)
        if new_keys and first_calls_s > 0:
            self.per_key_s = first_calls_s / new_keys
            self.measured_key_s = True
