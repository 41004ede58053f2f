"""bench/e2e.py end to end on the CPU (--smoke): the GPU benchmark's own code on hstu-tiny, so a
device run does not discover a broken bench. Real model, real timing, real profiler."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_e2e_smoke_writes_baselines_speedups_profile_and_provenance(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    modes = "eager_bf16_padded,eager_bf16_triton,aoti_bf16"  # the package needs a GPU: skipped, saying so
    cmd = [sys.executable, "bench/e2e.py", "--smoke", "--profile", "--budget", "0", "--modes", modes, "--out", str(out)]
    cmd += ["--rounds", "2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    data = json.loads(out.read_text())
    assert data["argv"] == ["e2e.py", *cmd[2:]]
    assert len(data["commit"]) == 40 and len(data["source_sha256"]) == 64 and data["versions"]["torch"]
    spec = data["specs"]["hstu-tiny"]
    assert spec["errors"] == {}
    assert set(spec["modes"]) == {"eager_bf16_padded", "eager_bf16_triton"}
    assert spec["modes"]["eager_bf16_padded"]["baseline"] and not spec["modes"]["eager_bf16_triton"]["baseline"]
    for wl in ("latency", "throughput"):
        assert spec["best_baseline"][wl]["mode"] == "eager_bf16_padded"
        base = spec["modes"]["eager_bf16_padded"][wl]["p50_ms"]
        for rows in spec["modes"].values():
            row = rows[wl]
            assert row["samples"] >= 3 and row["p50_ms"] > 0
            assert row["speedup_vs_best_baseline"] == round(base / row["p50_ms"], 2)
    for rows in spec["modes"].values():  # bf16 against the float64 oracle: close, not exact
        err = rows["latency"]["rel_err_vs_fp64"]
        assert math.isfinite(err) and 0 < err < 0.05
    assert set(spec["latency_profiles"]) == set(spec["profiles"]) == set(spec["modes"])  # each workload's call
    for profile in [*spec["profiles"].values(), *spec["latency_profiles"].values()]:  # the top ops, slowest first
        times = [op["ms"] for op in profile["ops"]]
        assert times and times == sorted(times, reverse=True) and sum(times) <= profile["total_ms"] + 1e-3
        assert any(op["name"] == "aten::bmm" for op in profile["ops"])  # the attention's matmuls are named
    assert spec["skipped"]["aoti_bf16"] == "needs a CUDA GPU"
    for rows in spec["modes"].values():  # --rounds 2: the latency calls timed again, interleaved
        rounds = rows["latency"]["rounds_p50_ms"]
        assert len(rounds) == 2 and all(t > 0 for t in rounds)
        assert rows["latency"]["rounds_median_p50_ms"] == round(sum(rounds) / 2, 4)


def test_e2e_refuses_an_unknown_mode(tmp_path: Path) -> None:
    cmd = [sys.executable, "bench/e2e.py", "--smoke", "--modes", "eager_bf16_padded,warp_drive"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "unknown mode(s) ['warp_drive']" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_e2e_skips_mode_workload_pairs_and_refuses_unknown_ones(tmp_path: Path) -> None:
    """--skip MODE:WORKLOAD leaves out one workload of a mode (a compile that recompiles per
    workload costs the device run its budget), saying so; a pair naming no workload is refused."""
    out = tmp_path / "pairs.json"
    cmd = [sys.executable, "bench/e2e.py", "--smoke", "--budget", "0", "--modes", "eager_bf16_triton"]
    done = subprocess.run([*cmd, "--skip", "eager_bf16_triton:latency", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    spec = json.loads(out.read_text())["specs"]["hstu-tiny"]
    assert set(spec["modes"]["eager_bf16_triton"]) >= {"throughput"}
    assert "latency" not in spec["modes"]["eager_bf16_triton"]
    assert spec["skipped"]["eager_bf16_triton:latency"] == "--skip"
    done = subprocess.run([*cmd, "--skip", "eager_bf16_triton:lunch", "--out", str(tmp_path / "y.json")], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "eager_bf16_triton:lunch" in done.stderr


def test_graphed_modes_copy_integer_inputs_as_one_packed_buffer() -> None:
    """bench/e2e_modes.packed_inputs: what every graphed mode copies per call. Integer inputs of a dtype share one
    buffer at 16-byte-aligned offsets, filled by one copy; floating inputs are cloned; after the copies every static
    input equals its input, whatever the buffers held."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.e2e_modes import packed_inputs

    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randn(5, 3, generator=gen),
        torch.randint(-9, 9, (3,), generator=gen),
        torch.randint(-9, 9, (7,), generator=gen),
        torch.randint(-9, 9, (5,), generator=gen, dtype=torch.int32),
        torch.randint(-9, 9, (3, 4), generator=gen),
    )
    copies, static = packed_inputs(args)
    assert len(copies) == 3  # the float input, the int64 buffer, the int32 buffer
    int64 = [s for s, a in zip(static, args, strict=True) if a.dtype == torch.int64]
    assert len({s.untyped_storage().data_ptr() for s in int64}) == 1
    assert all(s.data_ptr() % 16 == 0 for s in static)
    for dst, _ in copies:
        dst.fill_(7)
    for dst, src in copies:
        dst.copy_(src)
    assert all(torch.equal(s, a) and s.shape == a.shape for s, a in zip(static, args, strict=True))
