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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hstu_attention_cached_kernel(dtype: str) -> None:
    """Queries against cached keys (the same kernel, q_offsets != kv_offsets) vs the float64
    reference: suffix = whole sequence, candidates only, mixed, empty suffixes, a cached history
    over many key blocks, 64 time buckets with huge gaps, once through the op, the key range split
    into parts (fp32 partial sums), keys as ranges of an arena (bit-identical to the contiguous launch);
    causal and full."""
    results, seed = run_worker("cached", dtype)
    bad = {case: err for case, err in results.items() if not err <= BOUNDS[dtype]}
    assert len(results) == 26 and not bad, f"{dtype} seed={seed}: rel. error over {BOUNDS[dtype]}: {bad}"


def test_a_key_splits_parts_are_added_in_one_kernel_in_part_order() -> None:
    """finish_parts == torch adding the fp32 parts in part order and casting once, bit for bit (fp32, bf16, fp16)."""
    results, seed = run_worker("sum_parts", "all")
    assert len(results) == 9 and not any(results.values()), f"seed={seed}: mismatching elements: {results}"


def test_the_bias_tables_of_unchanged_weights_are_computed_once() -> None:
    results, seed = run_worker("tables_cache", "float32")
    assert all(v == 1.0 for v in results.values()), f"seed={seed}: {results}"


def test_cached_kernel_poisons_users_with_more_queries_than_keys() -> None:
    results, _ = run_worker("not_a_suffix", "float32")
    assert results["bad_user_nan_fraction"] == 1.0 and results["valid_user_rel_err"] <= BOUNDS["float32"], results


def test_the_step_over_an_arena_through_the_kernel() -> None:
    """The history cache's step with its keys as ranges of a NaN-filled arena, through the Triton kernels (the
    cached attention with max_user_keys, the norm-gate), float32 against GRDense.score in float64; and fused as
    served (the UVQK GEMM's epilogue writes the new K/V rows: the same rows, and no other, as index_copy_)."""
    results, seed = run_worker("arena_step", "float32")
    assert results["foreign_rows_nan"] == 1.0, f"seed={seed}: the step wrote outside its users' extents"
    assert results["fused_wrote_the_same_rows"] == 1.0, f"seed={seed}: the fused step wrote other rows: {results}"
    for key in ("scores_rel_err", "fused_scores_rel_err", "fused_rows_rel_err"):
        assert results[key] <= BOUNDS["float32"] * 10, f"seed={seed}: {key}: {results}"


def test_norm_gate_kernel() -> None:
    """kernels/norm_gate.py's norm-gate vs float64, each dtype, u activated or raw, and from an attention's key parts
    (norm_gate_parts_triton), which must give bit for bit what the sum kernel then the norm-gate give."""
    results, seed = run_worker("norm_gate", "all")
    same = {case: results.pop(case) for case in list(results) if case.startswith("parts_equal_finish_")}
    assert same == {f"parts_equal_finish_{name}": 1.0 for name in ("float32", "float16", "bfloat16")}, (seed, same)
    bad = {case: err for case, err in results.items() if not err <= BOUNDS[case.split("_")[0]]}
    assert not bad, f"seed={seed}: rel. error over bound (inf = NaN left in output): {bad}"


def test_group_norm_kernel() -> None:
    """kernels/norm_gate.py's group LayerNorm (the history cache step's norm before its UVQK GEMM), each dtype."""
    results, seed = run_worker("group_norm", "all")
    bad = {case: err for case, err in results.items() if not err <= BOUNDS[case.split("_")[0]]}
    assert len(results) == 13 and not bad, f"seed={seed}: rel. error over bound (inf = NaN left in output): {bad}"


def test_silu_kernel() -> None:
    results, seed = run_worker("silu", "all")
    assert results.pop("op_equals_kernel") == 1.0, f"seed={seed}: grc::silu is not its kernel"
    bounds = {**BOUNDS, "float64": 1e-12}
    bad = {case: err for case, err in results.items() if not err <= bounds[case.split("_")[0]]}
    assert len(results) == 12 and not bad, f"seed={seed}: rel. error over bound (inf = NaN left in output): {bad}"


def test_time_bucket_exact_at_power_of_two_edges() -> None:
    """The kernel's bucket paths (int32, int64, float64 exponent bits) and the reference against the integer
    rule, time_buckets 24..64, gaps at every power of two and past INT64_MAX (saturated into the last bucket)."""
    results, _ = run_worker("bucket", "int32")
    mismatches = {k: v for k, v in results.items() if k.endswith("_mismatches")}
    assert len(mismatches) == 13 and not any(mismatches.values()), f"bucket mismatches: {results}"
    assert all(v > 0 for k, v in results.items() if k.endswith("_last_bucket_cases")), results


def test_key_splits_fill_the_resident_program_slots_of_the_measured_shapes() -> None:
    """split_count at the shapes the H200 measured (132 SMs; kernels-explore-hopper-oneuser-h200-s24.json): the
    fastest part counts there, the caps, and one part once the windows fill the slots."""
    from kernels.hstu_attention import MAX_SPLITS, SPLIT_MIN_KEYS, split_count

    assert split_count(24 * 2, 256, 1515, 132) == 3  # mtgr-small's latency call: 2 heads of d 256 (5-6 parts: slower)
    assert split_count(24 * 4, 128, 1515, 132) == 3  # 4 heads of d 128: two programs an SM
    assert split_count(4 * 4, 256, 4352, 132) == MAX_SPLITS  # a cached user at 4,096 + 256
    assert split_count(4 * 4, 256, 3 * SPLIT_MIN_KEYS + 5, 132) == 3  # each part at least SPLIT_MIN_KEYS keys
    assert split_count(132, 256, 8192, 132) == split_count(264, 128, 8192, 132) == 1  # the slots full: one part
    assert split_count(0, 64, 0, 132) == 1
