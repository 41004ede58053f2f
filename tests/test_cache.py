"""The content-addressed build cache across fresh clones, a real nginx WebDAV store, corruption,
and exact invalidation by spec field, source file and toolkit version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench._common import clone
from grc.cache.nginx import NginxStore

STAGES = ["weights", "export", "surgery", "verify"]
SKIP_FILES = {"build-report.json", ".doit.db", ".build.lock"}


def _clone(dest: Path) -> Path:
    return clone(dest)  # the files a fresh clone holds; shared with the benchmarks


def _build(
    clone: Path,
    cache: Path | None,
    remote: str | None = None,
    read_only: bool = False,
    spec: str = "specs/hstu-tiny.yaml",
) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(clone),
        "GRC_CACHE": "on" if cache else "off",
        "GRC_CACHE_DIR": str(cache or clone / "no-cache"),
    }
    env.pop("GRC_REMOTE_CACHE", None)
    if remote:
        env["GRC_REMOTE_CACHE"] = remote
    env["GRC_REMOTE_CACHE_READ_ONLY"] = "1" if read_only else "0"
    out = subprocess.run(
        [sys.executable, "-m", "grc.cli", "build", spec],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((clone / "artifacts" / "hstu-tiny" / "build-report.json").read_text())
    return {name: rec["status"] for name, rec in report["tasks"].items()}


def _files(clone: Path) -> dict[str, bytes]:
    root = clone / "artifacts" / "hstu-tiny"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in SKIP_FILES
    }


def _objects(store: Path) -> list[Path]:
    return [p for p in (store / "cas").rglob("*") if p.is_file() and not p.name.startswith(".")]


def _object_of(store: Path, clone: Path, rel: str) -> Path:
    import hashlib

    digest = hashlib.sha256((clone / "artifacts" / "hstu-tiny" / rel).read_bytes()).hexdigest()
    return store / "cas" / digest[:2] / digest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Clone A builds cold into local store S; clone B restores from S; clone D builds cold with an
    empty local store and uploads to nginx; clone E restores from nginx alone (read-only)."""
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.skip("nginx is not installed: apt-get install nginx (its dav module serves the remote store)")
    base = tmp_path_factory.mktemp("cache")
    stores = {n: base / f"store-{n}" for n in ("S", "S2", "S3")}
    with NginxStore(base / "nginx") as url:
        a, b, d, e = (_clone(base / n) for n in "abde")
        runs = {
            "a": _build(a, stores["S"]),
            "b": _build(b, stores["S"]),
            "d": _build(d, stores["S2"], url),
            "e": _build(e, stores["S3"], url, read_only=True),
        }
        yield {
            "base": base,
            "url": url,
            "stores": stores,
            "clones": {"a": a, "b": b, "d": d, "e": e},
            "runs": runs,
            "nginx_store": base / "nginx" / "store",
        }


def test_second_clone_runs_nothing_and_restores_identical_bytes(world) -> None:  # type: ignore[no-untyped-def]
    assert all(world["runs"]["a"][s] == "built" for s in STAGES)
    assert all(world["runs"]["b"][s] == "restored" for s in STAGES)
    assert _files(world["clones"]["a"]) == _files(world["clones"]["b"])


def test_independent_cold_builds_are_byte_identical(world) -> None:  # type: ignore[no-untyped-def]
    assert all(world["runs"]["d"][s] == "built" for s in STAGES)
    assert _files(world["clones"]["a"]) == _files(world["clones"]["d"])  # same key -> same bytes


def test_remote_store_alone_restores_everything(world) -> None:  # type: ignore[no-untyped-def]
    assert _objects(world["nginx_store"]), "clone D uploaded nothing"
    assert all(world["runs"]["e"][s] == "restored" for s in STAGES)
    assert _files(world["clones"]["e"]) == _files(world["clones"]["a"])


def test_read_only_remote_never_uploads(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clone = world["clones"]["e"]
    spec = clone / "specs" / "hstu-tiny.yaml"
    spec.write_text(
        spec.read_text().replace(
            "max_abs: 1.0e-5, max_rel: 1.0e-4}\n  surgery", "max_abs: 2.0e-5, max_rel: 1.0e-4}\n  surgery"
        )
    )
    before = sorted(p.name for p in (world["nginx_store"] / "ac").rglob("*"))
    runs = _build(clone, tmp_path / "fresh", world["url"], read_only=True)
    assert runs["verify"] == "built" and runs["export"] == "up to date"
    assert sorted(p.name for p in (world["nginx_store"] / "ac").rglob("*")) == before


def test_corrupt_local_object_is_detected_and_rebuilt(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, a = world["stores"]["S"], world["clones"]["a"]
    shard = _object_of(store, a, "weights/model-00001-of-00001.safetensors")
    os.chmod(shard, 0o644)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of the weights
    shard.write_bytes(bytes(data))
    onnx_obj = _object_of(store, a, "surgery/model.onnx")
    os.chmod(onnx_obj, 0o644)
    onnx_obj.write_bytes(onnx_obj.read_bytes()[:100])  # truncated
    runs = _build(_clone(tmp_path / "g"), store)
    assert runs["weights"] == "built" and runs["surgery"] == "built"  # both caught, both rebuilt
    assert runs["export"] == "restored"  # rebuilt weights are the same bytes, so export's key holds
    # clone A's files share inodes with store S (objects are hard links), so compare with D's
    assert _files(tmp_path / "g") == _files(world["clones"]["d"])


def test_corrupt_remote_object_is_discarded(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    onnx_bytes = (world["clones"]["d"] / "artifacts/hstu-tiny/onnx/model.onnx").read_bytes()
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    remote_obj = world["nginx_store"] / "cas" / digest
    remote_obj.write_bytes(onnx_bytes[:-10])  # truncated on the server
    clone = _clone(tmp_path / "h")
    runs = _build(clone, tmp_path / "empty", world["url"], read_only=True)
    assert runs["export"] == "built" and runs["weights"] == "restored"
    assert _files(clone) == _files(world["clones"]["d"])


def _plan(clone: Path) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(clone)}
    out = subprocess.run(
        [sys.executable, "-m", "grc.cli", "plan", "specs/hstu-tiny.yaml", "--json"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {row["task"]: row for row in json.loads(out.stdout)}


def test_source_edit_invalidates_exactly_the_tasks_that_import_it(world) -> None:  # type: ignore[no-untyped-def]
    clone = world["clones"]["b"]
    target = "grc/surgery/passes.py"
    including = {t for t, row in _plan(clone).items() if f"code:{target}" in row["parts"]}
    assert including == {"surgery", "verify"}
    with open(clone / target, "a") as fh:
        fh.write("\n# a harmless edit\n")
    rows = _plan(clone)
    stale = {t for t, row in rows.items() if row["state"] == "stale"}
    assert stale == including
    assert f"code:{target} changed" in rows["surgery"]["reasons"]


def test_toolkit_version_invalidates_exactly_its_tasks(tiny_copy, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from grc.build.runner import plan
    from grc.cache import key
    from grc.spec.loader import load_spec
    from tests.conftest import in_dir

    spec, _ = tiny_copy
    real = key.toolkit_version
    monkeypatch.setattr(key, "toolkit_version", lambda d: "99.0" if d == "onnx-graphsurgeon" else real(d))
    with in_dir(spec.parent):
        rows = {r.task: r for r in plan(load_spec(spec.name), Path("artifacts/hstu-tiny"))}
    including = {t for t, r in rows.items() if "toolkit:onnx-graphsurgeon" in r.parts}
    assert "surgery" in including and "weights" not in including and "export" not in including
    assert {t for t, r in rows.items() if r.state == "stale"} == including
    assert "toolkit:onnx-graphsurgeon changed" in rows["surgery"].reasons


def test_cache_admin_commands(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from grc.cli import main

    store = world["stores"]["S2"]
    assert main(["cache", "stats", "--cache-dir", str(store)]) == 0
    assert main(["cache", "verify", "--cache-dir", str(store)]) == 0
    victim = _objects(store)[0]
    os.chmod(victim, 0o644)
    victim.write_bytes(b"garbage")
    assert main(["cache", "verify", "--cache-dir", str(store)]) == 1 and not victim.exists()
    assert main(["cache", "prune", "--max-size", "0", "--cache-dir", str(store)]) == 0
    assert not _objects(store)
