"""bench/served_host_profile.py end to end on the CPU at a tiny size: the device call that runs it (issue 18's served
session: which mode strays from float64, and at which visit) must not discover a broken bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_served_host_profile_writes_both_modes_errors_by_visit(tmp_path: Path) -> None:
    out = tmp_path / "served-host.json"
    cmd = [sys.executable, "bench/served_host_profile.py", "--users", "6", "--visits", "2", "--base", "30",
           "--candidates", "16", "--max-seq-len", "128", "--repeats", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert len(data["commit"]) == 40 and data["args"]["visits"] == 2
    by_visit = data["max_rel_vs_float64_by_visit"]
    assert set(by_visit) == {"uncached", "cached"} and all(len(v) == 2 for v in by_visit.values())
    assert all(0 < e <= 1e-4 for v in by_visit.values() for e in v)  # float32 vs float64: close, not exact
    assert data["max_rel_vs_float64"] == {mode: max(v) for mode, v in by_visit.items()}
    assert set(data["modes"]["cached"]["host_us_per_execute"]) >= {"check", "layout", "wall", "host"}
