"""The Triton kernels themselves, run on CPU by Triton's interpreter (TRITON_INTERPRET=1).

Each test starts tests/kernels/interp_worker.py in a subprocess: the interpreter flag must be set
before the kernels are decorated, and the rest of the suite shares this pytest process (xdist
workers), so setting it here would leak. Every run draws a fresh seed (printed on failure),
poisons the output with NaN, and compares with the float64 reference by ||out - ref|| / ||ref||.

Interpreter gaps worked around, not skipped (triton 3.9): its tl.dot multiplies bfloat16 operands
as raw uint16 bits and its fp32->bf16 cast truncates. Under the interpreter the kernels upcast
bf16 dot operands to fp32 (identical exact products) and round to bf16 with integer ops. Not
covered here: the tanh.approx SiLU (inline PTX; the interpreter cannot run it), which the GPU
check (bench/gpu_kernels_check.py) covers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("interp_worker.py")

# Bounds on ||out - ref|| / ||ref|| against float64. float32: ieee dots, so only fp32 rounding
# (seen ~2e-7). 16-bit: the output is rounded to the dtype and the SiLU weights are rounded to
# it before the second matmul (as on the GPU): seen ~3e-4 (fp16) and ~2.3e-3 (bf16).
BOUNDS = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def run_worker(job: str, dtype: str) -> tuple[dict[str, float], int]:
    seed = secrets.randbits(31)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(WORKER), job, dtype, str(seed)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"worker {job} {dtype} seed={seed} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), seed


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_hstu_attention_kernel(dtype: str) -> None:
    results, seed = run_worker("attention", dtype)
    bad = {case: err for case, err in results.items() if not err <= BOUNDS[dtype]}
    assert not bad, f"{dtype} seed={seed}: rel. error over {BOUNDS[dtype]} (inf = NaN left in output): {bad}"


def test_norm_gate_kernel() -> None:
    results, seed = run_worker("norm_gate", "all")
    bad = {case: err for case, err in results.items() if not err <= BOUNDS[case.split("_")[0]]}
    assert not bad, f"seed={seed}: rel. error over bound (inf = NaN left in output): {bad}"


def test_time_bucket_exact_at_power_of_two_edges() -> None:
    results, _ = run_worker("bucket", "int32")
    assert results and not any(results.values()), f"bucket mismatches: {results}"
