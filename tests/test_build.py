"""The build graph on real doit and real files: no-op, exact invalidation, kills, locks, plan."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from grc.build.runner import plan
from grc.spec.loader import load_spec
from tests.conftest import REPO, TEST_SPECS, in_dir, require_plugin_library, run_build, write_spec

ALL = ["weights", "export", "surgery", "verify"]


def _edit(spec: Path, dotted: str, value: object) -> None:
    data = yaml.safe_load(spec.read_text())
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    spec.write_text(yaml.safe_dump(data, sort_keys=False))


def _ran(statuses: dict[str, str]) -> list[str]:
    return [t for t, s in statuses.items() if s == "built"]


def test_noop_build_runs_nothing(tiny_copy: tuple[Path, Path]) -> None:
    spec, _ = tiny_copy
    statuses = run_build(spec)
    assert set(statuses) >= set(ALL)
    assert _ran(statuses) == []


def test_weights_field_reruns_weights_and_downstream(tiny_copy: tuple[Path, Path]) -> None:
    spec, _ = tiny_copy
    _edit(spec, "weights.init.seed", 99)
    statuses = run_build(spec)
    assert set(ALL) <= set(_ran(statuses))  # weights and everything downstream of it
    assert statuses["plugins"] == "up to date"  # reads no weights


def test_surgery_passes_rerun_surgery_and_verify_only(tiny_copy: tuple[Path, Path]) -> None:
    spec, _ = tiny_copy
    _edit(spec, "surgery.passes", ["fuse_hstu_attention", "cleanup"])
    with in_dir(spec.parent):
        rows = {r.task: r for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny"))}
    assert rows["surgery"].state == "stale" and "surgery.passes changed" in rows["surgery"].reasons
    assert rows["export"].state == "up to date" and rows["weights"].state == "up to date"
    ran = _ran(run_build(spec))
    assert {"surgery", "verify"} <= set(ran) and not {"weights", "export"} & set(ran)


def test_verify_tolerance_reruns_verify_and_the_bundle_that_records_it(tiny_copy: tuple[Path, Path]) -> None:
    spec, _ = tiny_copy
    _edit(spec, "verify.export", {"max_abs": 2.0e-5, "max_rel": 1.0e-4})
    # nothing reads verify's output; the triton stage reads the field (a fused bundle records it as the tolerance
    # its smoke test holds answers to); no other stage reruns
    assert _ran(run_build(spec)) == ["verify", "triton"]


def test_deleted_output_is_rebuilt(tiny_copy: tuple[Path, Path]) -> None:
    spec, artifacts = tiny_copy
    (artifacts / "hstu-tiny" / "surgery" / "manifest.json").unlink()
    with in_dir(spec.parent):
        rows = {r.task: r for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny"))}
    assert any("output missing" in r for r in rows["surgery"].reasons)
    assert "surgery" in _ran(run_build(spec))


def _flip(path: Path) -> None:
    """One byte inverted in the middle, written in place (same inode, as an editor run by root would)."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _halve(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _append_comment(path: Path) -> None:
    with open(path, "a") as fh:
        fh.write("\n# edited by hand\n")


def _add_model(path: Path) -> None:
    path.mkdir()
    (path / "config.pbtxt").write_text('name: "extra"\n')


def _stage_files(root: Path, rel: str) -> dict[Path, bytes]:
    """The bytes of every file of the stage folder holding ``rel`` (an engine's timings left out)."""
    folder = root / Path(rel).parts[0]
    return {
        p.relative_to(root): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "build-report.json"
    }


SHARD = "weights/model-00001-of-00001.safetensors"
# (stage, output file relative to artifacts/hstu-tiny, what a user does to it)
TAMPERED = [
    ("weights", SHARD, _flip),
    ("export", "onnx/model.onnx", _flip),
    ("surgery", "surgery/model.onnx", _flip),
    ("plugins", "plugins/libgrc_plugins.so", _flip),
    ("weights", SHARD, _halve),
    ("export", "onnx/model.onnx", _halve),
    ("engine", "engines/sm80/model.plan", _halve),
    ("export", "onnx/model.onnx", Path.unlink),  # its manifest stays
    ("triton", "triton/model_repository/hstu-tiny/config.pbtxt", _append_comment),
    ("triton", "triton/model_repository/extra", _add_model),
]


@pytest.mark.parametrize(
    ("stage", "rel", "tamper"), TAMPERED, ids=[f"{t.__name__.strip('_')}-{r}" for _, r, t in TAMPERED]
)
def test_output_changed_behind_grcs_back_is_named_and_rebuilt(
    tiny_copy: tuple[Path, Path], stage: str, rel: str, tamper: object
) -> None:
    spec, artifacts = tiny_copy
    root = artifacts / "hstu-tiny"
    if stage in ("plugins", "engine"):
        require_plugin_library(root)  # skips only without nvcc
        if not (root / rel).exists():
            pytest.skip(f"no {rel} here: TensorRT-RTX is not installed (the engine stage skipped sm80)")
    before = _stage_files(root, rel)
    tamper(root / rel)  # type: ignore[operator]
    with in_dir(spec.parent):
        rows = {r.task: r for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny"))}
    assert rows[stage].state == "stale" and any(rel in r for r in rows[stage].reasons), rows[stage].reasons
    statuses = run_build(spec)
    assert statuses[stage] == "built"
    assert _stage_files(root, rel) == before  # the same bytes as grc wrote, nothing added
    with in_dir(spec.parent):
        assert all(r.state == "up to date" for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny")))


def test_touched_output_is_hashed_once_and_not_rebuilt(tiny_copy: tuple[Path, Path]) -> None:
    """A new mtime (or inode: tiny_copy copied every file) with the same bytes is no change; the build
    stores the new stamps, so later checks stat instead of hashing."""
    from grc.build import outputs

    spec, artifacts = tiny_copy
    root = artifacts / "hstu-tiny"
    shard = root / SHARD
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 5_000_000_000))
    with in_dir(spec.parent):
        assert all(r.state == "up to date" for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny")))
    assert _ran(run_build(spec)) == []
    stamps = json.loads(outputs.record_path(root, "weights").read_text())["stamps"]
    st = shard.stat()
    assert stamps[Path(SHARD).name] == [st.st_size, st.st_mtime_ns, st.st_ino]


def test_plain_doit_sees_the_same_state(tiny_copy: tuple[Path, Path]) -> None:
    spec, _ = tiny_copy
    out = subprocess.run(
        [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", ".", f"spec={spec.name}"],
        cwd=spec.parent,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert "-- weights" in out.stdout and "-- verify" in out.stdout  # "--" is doit's up-to-date mark


def _big_weights_spec(folder: Path) -> Path:
    """mtgr-tiny with a 128M-parameter table: weights take seconds, so a kill lands mid-write."""
    return write_spec(
        folder,
        TEST_SPECS / "mtgr-tiny.yaml",
        {
            "model.tables": {
                **yaml.safe_load((TEST_SPECS / "mtgr-tiny.yaml").read_text())["model"]["tables"],
                "item": {"vocab_size": 8_000_000},
            },
            "weights.shard_size_mb": 64,
            "weights.table_block_rows": 1 << 19,
        },
    )


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_sigkill_mid_write_is_recovered_with_identical_outputs(tmp_path: Path) -> None:
    spec = _big_weights_spec(tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "grc.cli", "build", spec.name, "weights"],
        cwd=spec.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = spec.parent / "artifacts" / "mtgr-tiny"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until shards are being written, then kill
        partial = list(root.glob("weights.partial-*"))
        if partial and len(list(partial[0].glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        raise AssertionError("the build never started writing shards")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "weights" / "manifest.json").exists()  # nothing trusted was left behind
    statuses = run_build(spec, only=["weights"])
    assert statuses["weights"] == "built"
    assert not list(root.glob("weights.partial-*"))
    clean = _big_weights_spec(tmp_path / "b")
    run_build(clean, only=["weights"])
    assert _digests(root / "weights") == _digests(clean.parent / "artifacts" / "mtgr-tiny" / "weights")


def test_second_concurrent_build_waits_then_fails_clearly(tmp_path: Path) -> None:
    from grc.build.lock import BuildLock
    from grc.errors import GrcError

    root = tmp_path / "artifacts" / "x"
    with BuildLock(root, wait_seconds=0):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from pathlib import Path; from grc.build.lock import BuildLock\n"
                f"with BuildLock(Path({str(root)!r}), wait_seconds=0.5): pass",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert out.returncode != 0 and "another build of this spec is running" in out.stderr
    with BuildLock(root, wait_seconds=0):  # released: a new holder gets it at once
        pass
    try:
        with BuildLock(root, 0), BuildLock(root, 0.2):
            pass
    except GrcError as exc:
        assert f"pid {os.getpid()}" in str(exc)
    else:
        raise AssertionError("a second holder got the lock")


def test_parallel_build_of_two_specs_in_one_folder(tmp_path: Path) -> None:
    a = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {"name": "one"}, name="one.yaml")
    b = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", {"name": "two", "weights.init.seed": 4}, name="two.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "grc.cli", "build", s.name, "weights", "-j", "2"],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in (a, b)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert (tmp_path / "artifacts/one/weights/manifest.json").exists()
    assert (tmp_path / "artifacts/two/weights/manifest.json").exists()
