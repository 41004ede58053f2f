"""Opt-in profiles of a python model's execute() inside a running server: where a served execute spends its host time.

Served, the fused model's phases take several times what the same code takes in-process (history-cache-notes.md,
session 13: the ``upload`` phase 1.6 ms per execute vs 0.1 ms alone), and phase counters cannot say why. With
``GRC_TRACE_DIR`` set in the server's environment, each model instance writes, per kind of execute ("cached": some
request carries a user id; "plain": none), to that folder:

- ``<model>-<pid>-<kind>-cprofile-<window>.txt``: cProfile over the executes of each WINDOWS entry (Python functions
  and the C functions they call: numpy, torch's bindings), sorted by own time and by cumulative time;
- ``<model>-<pid>-<kind>-torch.txt`` (+ ``.json``, a Chrome trace): torch.profiler over TORCH_WINDOW (aten ops and
  the CUDA runtime calls: a synchronisation or a pinned allocation shows here; 20 executes keep the trace small).

Windows count executes of one kind from the instance's start; they never overlap (one profiler at a time). Off
(the default), ``run`` costs one attribute check. ``GRC_TRACE_PROFILE=0`` keeps the folder's other files (the
cached step's captures, one by one: fused.py's finalize) without the profiles, which slow the executes they cover.
A diagnostic for benchmarks, not a serving feature.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
ENV = "GRC_TRACE_DIR"
PROFILE_ENV = "GRC_TRACE_PROFILE"
# cProfile windows: the first executes (a cached step's new shapes are captured there) and a steady stretch
WINDOWS = {"start": (0, 100), "steady": (300, 500)}
TORCH_WINDOW = (600, 620)
ROWS = 60


class ExecuteTrace:
    def __init__(self, model: str, folder: str | None = None) -> None:
        folder = os.environ.get(ENV) if folder is None else folder
        self.folder = Path(folder) if folder else None
        self.model = model
        self.profile = os.environ.get(PROFILE_ENV, "1") != "0"
        self.counts: dict[str, int] = {}
        self.profiles: dict[tuple[str, str], cProfile.Profile] = {}
        self.torch_prof: Any = None
        self.torch_kind = ""
        self.usage: dict[tuple[str, str], tuple[float, resource.struct_rusage, float]] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def run(self, kind: str, fn: Callable[[T], R], arg: T) -> R:
        """``fn(arg)`` (one execute), profiled when it falls in a window of its ``kind`` ("cached" or "plain"). cProfile
        wraps the call itself (``runcall``): enabled from inside a context manager's generator, it saw frames return
        that it never saw called and misattributed the cumulative times (session 14's first trace)."""
        if self.folder is None or not self.profile:
            return fn(arg)
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        window = next((w for w, (a, b) in WINDOWS.items() if a <= n < b), None)
        if window is not None:
            prof = self.profiles.setdefault((kind, window), cProfile.Profile())
            wall, usage, inside = self.usage.get((kind, window), (time.perf_counter(), _rusage(), 0.0))
            began = time.perf_counter()
            try:
                return prof.runcall(fn, arg)
            finally:
                self.usage[kind, window] = (wall, usage, inside + time.perf_counter() - began)
                if n == WINDOWS[window][1] - 1:
                    self._write_cprofile(kind, window)
        first, end = TORCH_WINDOW
        if n == first and self.torch_prof is None:
            self._start_torch(kind)
        try:
            return fn(arg)
        finally:
            if self.torch_prof is not None and self.torch_kind == kind and n == end - 1:
                self._write_torch(kind)

    def write_json(self, what: str, data: Any) -> None:
        """``data`` as ``<model>-<pid>-<what>.json`` (nothing when tracing is off)."""
        if self.folder is not None:
            self._name("", what).with_suffix(".json").write_text(json.dumps(data, indent=1))

    def flush(self) -> None:
        """Write the windows still open (the server stops before a window's end): called at the model's finalize."""
        for kind, window in list(self.profiles):
            self._write_cprofile(kind, window)
        if self.torch_prof is not None:
            self._write_torch(self.torch_kind)

    def _name(self, kind: str, what: str) -> Path:
        assert self.folder is not None
        return self.folder / "-".join(p for p in (self.model, str(os.getpid()), kind, what) if p)

    def _write_cprofile(self, kind: str, window: str) -> None:
        prof = self.profiles.pop((kind, window))
        a, b = WINDOWS[window]
        last = min(b, self.counts[kind]) - 1
        out = io.StringIO()
        out.write(f"# {self.model} pid {os.getpid()}: cProfile of {kind} executes {a}..{last}\n")
        out.write(_host_figures(*self.usage[kind, window]))
        for key in ("tottime", "cumulative"):
            out.write(f"\n## sorted by {key}\n")
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(ROWS)
        self._name(kind, f"cprofile-{window}.txt").write_text(out.getvalue())

    def _start_torch(self, kind: str) -> None:
        import torch

        self.torch_kind = kind
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.torch_prof = torch.profiler.profile(activities=activities)
        self.torch_prof.__enter__()

    def _write_torch(self, kind: str) -> None:
        prof, self.torch_prof = self.torch_prof, None
        prof.__exit__(None, None, None)
        a, b = TORCH_WINDOW
        last = min(b, self.counts.get(kind, b)) - 1
        events = prof.key_averages()
        text = [f"# {self.model} pid {os.getpid()}: torch.profiler over {kind} executes {a}..{last}"]
        for key in ("self_cpu_time_total", "cpu_time_total", "self_device_time_total"):
            try:
                text += [f"\n## sorted by {key}", events.table(sort_by=key, row_limit=ROWS)]
            except (KeyError, AttributeError, RuntimeError) as exc:  # a column this build or device lacks
                text.append(f"\n## sorted by {key}: not available ({exc})")
        self._name(kind, "torch.txt").write_text("\n".join(text) + "\n")
        prof.export_chrome_trace(str(self._name(kind, "torch.json")))


def _rusage() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


def _host_figures(wall_start: float, start: resource.struct_rusage, inside_s: float) -> str:
    """The process's CPU time and context switches over a window vs its wall time and the time inside execute():
    CPU time well above the wall means threads spinning; far below the time inside, waiting (GIL, device, sleep)."""
    import torch

    now, wall = _rusage(), time.perf_counter() - wall_start
    user, system = now.ru_utime - start.ru_utime, now.ru_stime - start.ru_stime
    return (
        f"# wall {wall:.3f} s, inside execute() {inside_s:.3f} s; process CPU user"
        f" {user:.3f} s + system {system:.3f} s;"
        f" context switches voluntary {now.ru_nvcsw - start.ru_nvcsw}, involuntary {now.ru_nivcsw - start.ru_nivcsw}\n"
        f"# torch threads {torch.get_num_threads()}, CPUs allowed {len(os.sched_getaffinity(0))},"
        f" load average {os.getloadavg()}\n"
    )
