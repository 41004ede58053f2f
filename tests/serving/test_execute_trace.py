"""The opt-in execute() profiles (grc/serving/triton/models/trace.py): windows per kind, files with real figures."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from grc.serving.triton.models import trace


def _work(i: int) -> int:
    torch.from_numpy(np.arange(50_000)).sum()
    np.sort(np.random.default_rng(0).random(20_000))
    return i


def test_off_by_default_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(trace.ENV, raising=False)
    t = trace.ExecuteTrace("m")
    assert t.folder is None
    assert t.run("cached", _work, 3) == 3
    t.flush()
    assert t.counts == {}


@pytest.mark.parametrize("stop_early", [False, True])
def test_windows_per_kind(tmp_path, monkeypatch, stop_early: bool) -> None:
    monkeypatch.setattr(trace, "WINDOWS", {"start": (0, 2), "steady": (3, 5)})
    monkeypatch.setattr(trace, "TORCH_WINDOW", (6, 8))
    t = trace.ExecuteTrace("fused", str(tmp_path / "t"))
    executes = 7 if stop_early else 9
    for i in range(executes):
        assert t.run("cached", _work, i) == i
    t.run("plain", _work, 0)  # one plain execute: only its open "start" window, written at the flush
    t.flush()
    names = sorted(p.name.split("-", 2)[2] for p in (tmp_path / "t").iterdir())
    assert names == [
        "cached-cprofile-start.txt",
        "cached-cprofile-steady.txt",
        "cached-torch.json",
        "cached-torch.txt",
        "plain-cprofile-start.txt",
    ]
    start = next((tmp_path / "t").glob("*-cached-cprofile-start.txt")).read_text()
    assert "executes 0..1" in start and "_work" in start and "process CPU user" in start
    # runcall: the profiled call is a proper frame, called once per execute (not "n/0" recursive counts)
    assert re.search(r"^\s+2\s+.*\(_work\)$", start, re.M), start
    plain = next((tmp_path / "t").glob("*-plain-cprofile-start.txt")).read_text()
    assert "executes 0..0" in plain  # the window cut at the flush says so
    torch_txt = next((tmp_path / "t").glob("*-cached-torch.txt")).read_text()
    assert ("executes 6..6" if stop_early else "executes 6..7") in torch_txt
    assert "aten::sum" in torch_txt


def test_write_json_only_when_on(tmp_path) -> None:
    trace.ExecuteTrace("m", "").write_json("captures", [1])  # off: nothing, nowhere
    on = trace.ExecuteTrace("m", str(tmp_path))
    on.write_json("captures", [{"shape": [2, 16, 256], "first_run": 0.1}])
    (written,) = tmp_path.iterdir()
    assert written.name.endswith("-captures.json") and '"first_run": 0.1' in written.read_text()


def test_profiles_off_keeps_the_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(trace.PROFILE_ENV, "0")
    monkeypatch.setattr(trace, "WINDOWS", {"start": (0, 2)})
    t = trace.ExecuteTrace("m", str(tmp_path))
    for i in range(3):
        t.run("cached", _work, i)
    t.flush()
    t.write_json("captures", [])
    assert [p.name.split("-", 2)[2] for p in tmp_path.iterdir()] == ["captures.json"]
