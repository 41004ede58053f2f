"""Host cost of the fused model's `upload` phase on a GPU, taken apart (issue 18: served at 16 clients the phase
took 1.78 ms per execute of ~6 mtgr-base users, where the numpy layout before it took 0.57 ms).

    python bench/upload_micro.py [--out FILE]      # on a CUDA machine; ~10 s

The shipped path (grc/serving/ranker/layout.on_device) stages the packed int64 layout in pinned memory with
``Tensor.pin_memory()`` (the caching host allocator) and queues one non-blocking host->device copy into a fresh
device tensor, then cuts ~20 named views. Timed per call, host wall time, each call followed by a small device step
and a synchronize (as an execute ends with the scores' fetch), for layouts of 50k and 200k int64 (~6 and ~25 users),
in two allocator states: fresh, and after 16 GiB of device blocks were allocated and half of them freed in random
order (the history store's churn). Variants: ``pin_memory`` alone, ``+ copy`` (the shipped staging and copy),
``shipped`` (on_device's ops: pin, copy, views) and ``persistent`` (one pinned buffer and one device buffer kept
across calls, an event guarding the pinned one: what ScoreGraphs' steps do). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result

FIELDS = 20  # named views on_device cuts


class Persistent:
    """One pinned host buffer and one device buffer, reused; the event says the last copy has read the host one."""

    def __init__(self, n: int):
        self.host = torch.empty(n, dtype=torch.int64, pin_memory=True)
        self.device = torch.empty(n, dtype=torch.int64, device="cuda")
        self.copied = torch.cuda.Event()

    def __call__(self, packed: np.ndarray) -> torch.Tensor:
        self.copied.synchronize()
        n = packed.size
        self.host.numpy()[:n] = packed
        out = self.device[:n]
        out.copy_(self.host[:n], non_blocking=True)
        self.copied.record()
        return out


def pinned(packed: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(packed).pin_memory()


def shipped(packed: np.ndarray, cut: bool = True) -> object:
    flat = pinned(packed).to("cuda", non_blocking=True)
    return views(flat) if cut else flat


def views(flat: torch.Tensor) -> list[torch.Tensor]:
    step = flat.numel() // FIELDS
    return [flat[i * step : (i + 1) * step] for i in range(FIELDS)]


def timed(fn: Callable[[], object], calls: int) -> dict[str, float]:
    sink = torch.zeros(1 << 20, device="cuda")
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        sink.mul_(1.0001)  # a little device work, then the execute's end: the fetch synchronizes
        torch.cuda.synchronize()
    ms = sorted(t * 1e3 for t in times)
    return {"p50_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * len(ms))], "mean_ms": statistics.fmean(ms)}


def churn(gib: int, gen: np.random.Generator) -> list[torch.Tensor]:
    """``gib`` GiB in 8 MiB..24 MiB blocks, half of them freed in random order: the caching allocator's state after
    a store of history entries grew and evicted."""
    held = [torch.empty(int(gen.integers(1, 4)) << 21, dtype=torch.float32, device="cuda") for _ in range(gib * 64)]
    for i in sorted(gen.permutation(len(held))[: len(held) // 2], reverse=True):
        del held[i]
    return held


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="result file (default bench/results/upload-micro-<gpu>.json)")
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    gen = np.random.default_rng(0)
    rows, held = [], []
    for state in ("fresh", "after 16 GiB churn"):
        if state != "fresh":
            held = churn(16, gen)
        for n in (50_000, 200_000):
            packed = gen.integers(0, 1 << 40, n, dtype=np.int64)
            keep = Persistent(n)
            variants: dict[str, Callable[[], object]] = {
                "pin_memory": functools.partial(pinned, packed),
                "pin_memory + copy": functools.partial(shipped, packed, cut=False),
                "shipped (pin, copy, views)": functools.partial(shipped, packed),
                "persistent (+ views)": functools.partial(lambda k, p: views(k(p)), keep, packed),
            }
            for name, fn in variants.items():
                timed(fn, 20)  # warm: the allocators' first blocks
                row = {"state": state, "int64": n, "variant": name, **timed(fn, args.calls)}
                rows.append(row)
                print(f"{state:>20}  {n:>7}  {name:<28} p50 {row['p50_ms']:.3f} ms  p90 {row['p90_ms']:.3f} ms")
    del held
    slug = torch.cuda.get_device_name().split()[-1].lower()
    path = write_result(Path(args.out) if args.out else f"upload-micro-{slug}", {"rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
