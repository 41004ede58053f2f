"""The TensorRT plugin kernel's time gap and bucket (plugins/hstu_attention_kernel.cuh), on the CPU.

They are __host__ __device__ functions: plugins/bucket_check.cu runs the very same code on the host,
built by nvcc here (no GPU needed). The plugin kernel itself runs only on a GPU
(plugins/check_kernel.py, with cases at 32 and 64 time buckets and int64-end timestamps).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def rule(a: int, b: int, num_buckets: int) -> tuple[int, int]:
    gap = min(abs(a - b), INT64_MAX)
    return gap, min((gap + 1).bit_length() - 1, num_buckets - 1)


def test_plugin_gap_saturates_and_buckets_are_exact(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found on PATH: the plugin's host/device code cannot be built here")
    exe = tmp_path / "bucket_check"
    subprocess.run([nvcc, "-std=c++17", "-O2", "-I", str(REPO / "plugins"), "-o", str(exe),
                    str(REPO / "plugins" / "bucket_check.cu")], check=True, capture_output=True)  # fmt: skip
    pairs = [(x, 0) for e in range(64) for x in ((1 << e) - 2, (1 << e) - 1, 1 << e) if 0 <= x <= INT64_MAX]
    pairs += [(1 << 45, (1 << 45) - x) for x, _ in pairs[:90]]
    pairs += [(INT64_MAX, INT64_MIN), (INT64_MIN, INT64_MAX), (INT64_MAX, -1), (INT64_MAX, -2), (0, INT64_MIN)]
    pairs += [(-1, INT64_MIN), (INT64_MIN, INT64_MIN), (1 << 62, -(1 << 62)), (-7, 9)]
    cases = [(a, b, nb) for a, b in pairs for nb in (1, 24, 32, 64, 100)]
    stdin = "".join(f"{a} {b} {nb}\n" for a, b, nb in cases)
    proc = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    got = [tuple(int(x) for x in line.split()) for line in proc.stdout.splitlines()]
    want = [rule(a, b, nb) for a, b, nb in cases]
    wrong = [(c, g, w) for c, g, w in zip(cases, got, want, strict=True) if g != w]
    assert len(got) == len(cases) and not wrong, wrong[:10]
    assert sum(w[1] == 63 for w in want) > 0  # the saturated gap reaches bucket 63
