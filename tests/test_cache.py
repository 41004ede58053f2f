"""The content-addressed build cache across fresh clones: a restored build is the same tree as a built
one (folders, modes, links) and serves with the real tritonserver; a user's edit of an output never
reaches the store; corrupt or truncated objects are caught, reported and rebuilt; unusable settings
are refused before any work; a real nginx WebDAV store; exact invalidation by spec field, source
file and toolkit version.

Only the remote-store tests need nginx (``.ci/setup-tests`` installs it); the local-store ones do not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench._common import clone
from grc.cache.nginx import NginxStore
from grc.cli import main
from tests.conftest import SPECS

SPEC = "specs/hstu-tiny.yaml"
# what a build keeps beside the stage folders: its state, lock, report and records of what it wrote
BUILD_STATE = {"build-report.json", ".doit.db", ".build.lock", ".outputs"}
TIMINGS = "build-report.json"  # an engine target's build seconds: the one file two cold builds disagree on


@dataclass
class Run:
    statuses: dict[str, str]
    stderr: str
    report: dict[str, Any]


def _clone(dest: Path) -> Path:
    return clone(dest)  # the files a fresh clone holds; shared with the benchmarks


def _build(clone: Path, cache: Path | None, remote: str | None = None, read_only: bool = False) -> Run:
    env = {
        **os.environ,
        "PYTHONPATH": str(clone),
        "GRC_CACHE": "on" if cache else "off",
        "GRC_CACHE_DIR": str(cache or clone / "no-cache"),
        "GRC_REMOTE_CACHE_READ_ONLY": "1" if read_only else "0",
    }
    env.pop("GRC_REMOTE_CACHE", None)
    if remote:
        env["GRC_REMOTE_CACHE"] = remote
    out = subprocess.run(
        [sys.executable, "-m", "grc.cli", "build", SPEC],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((clone / "artifacts" / "hstu-tiny" / "build-report.json").read_text())
    return Run({name: rec["status"] for name, rec in report["tasks"].items()}, out.stderr, report)


def _tree(clone: Path, timings: bool = True) -> dict[str, tuple[str, int, bytes | str | None]]:
    """Every folder, file and link of the built spec: (kind, mode, bytes or link target)."""
    return _walk_tree(clone / "artifacts" / "hstu-tiny", BUILD_STATE, timings)


def _walk_tree(
    root: Path, leave_out: set[str] | None = None, timings: bool = True
) -> dict[str, tuple[str, int, bytes | str | None]]:
    out: dict[str, tuple[str, int, bytes | str | None]] = {}
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # written by the python backend that serves a bundle
        if Path(top) == root:
            dirs[:] = [d for d in dirs if d not in (leave_out or set())]
            files = [f for f in files if f not in (leave_out or set())]
        for name in dirs + files:
            path = Path(top) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            elif timings or name != TIMINGS:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def _objects(store: Path) -> list[Path]:
    return [p for p in (store / "cas").rglob("*") if p.is_file() and not p.name.startswith(".")]


def _object_of(store: Path, clone: Path, rel: str) -> Path:
    digest = hashlib.sha256((clone / "artifacts" / "hstu-tiny" / rel).read_bytes()).hexdigest()
    return store / "cas" / digest[:2] / digest


def _records(store: Path) -> dict[str, dict[str, Any]]:
    """The action records of a store, by stage."""
    out = {}
    for path in (store / "ac").rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            record = json.loads(path.read_text())
            out[record["stage"]] = record
    return out


def _flip_keeping_stat(path: Path) -> None:
    """One byte inverted in place, then the mtime put back: size, mtime and inode are unchanged."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


# --------------------------------------------------------------------------- the local store


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Clone A builds cold into local store S; clone B, a fresh clone, restores from S."""
    base = tmp_path_factory.mktemp("cache")
    store = base / "store"
    a, b = _clone(base / "a"), _clone(base / "b")
    return {"base": base, "store": store, "a": a, "b": b, "runs": {"a": _build(a, store), "b": _build(b, store)}}


def test_second_clone_restores_the_very_tree_a_build_writes(local: dict[str, Any]) -> None:
    built, restored = local["runs"]["a"].statuses, local["runs"]["b"].statuses
    assert set(built.values()) == {"built"} and set(restored.values()) == {"restored"}, (built, restored)
    tree = _tree(local["b"])
    assert tree == _tree(local["a"])  # folders, modes and bytes alike
    ensemble_version = "triton/model_repository/hstu-tiny/1"  # empty by design: Triton needs it
    assert tree[ensemble_version][0] == "dir" and not any(
        (local["b"] / "artifacts/hstu-tiny" / ensemble_version).iterdir()
    )


def test_action_record_describes_the_tree(local: dict[str, Any]) -> None:
    records = _records(local["store"])
    assert set(records) == set(local["runs"]["a"].statuses)
    tree = {e["path"]: e for e in records["triton"]["tree"]}
    assert tree["model_repository/hstu-tiny/1"]["kind"] == "dir"  # the empty ensemble version folder
    built = local["a"] / "artifacts" / "hstu-tiny" / "triton"
    for rel, entry in tree.items():
        assert entry["mode"] == stat.S_IMODE((built / rel).stat().st_mode), rel
        if entry["kind"] == "file":
            assert entry["bytes"] == (built / rel).stat().st_size


@pytest.mark.slow
def test_restored_triton_bundle_serves(local: dict[str, Any]) -> None:
    """The user path: ``grc deploy --target triton`` on a clone whose bundle came from the store,
    with the real tritonserver (installed on first use), smoke-tested against PyTorch."""
    from grc.serving.triton.server import ensure_tritonserver

    ensure_tritonserver()  # an installer failure is grc's own: it fails the test
    b = local["b"]
    out = subprocess.run(
        [sys.executable, "-m", "grc.cli", "deploy", "--target", "triton", SPEC, "--timeout", "180"],
        cwd=b,
        env={**os.environ, "PYTHONPATH": str(b)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "smoke test: hstu-tiny vs PyTorch" in out.stdout and "stale" not in out.stdout + out.stderr


def test_user_edit_of_an_output_never_reaches_the_store(local: dict[str, Any]) -> None:
    """Root ignores read-only modes: an edit in place of a built output must change that file only."""
    store, a = local["store"], local["a"]
    rel = "weights/model-00001-of-00001.safetensors"
    obj = _object_of(store, a, rel)
    output = a / "artifacts" / "hstu-tiny" / rel
    assert output.stat().st_ino != obj.stat().st_ino
    with open(output, "r+b") as fh:  # no chmod needed: root writes whatever the mode
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name  # the store's copy is untouched
    run = _build(a, store)
    assert run.statuses["weights"] == "restored" and "weights/model-00001-of-00001.safetensors" in run.stderr
    assert _tree(a) == _tree(local["b"])


def test_corrupt_store_objects_are_reported_and_rebuilt(local: dict[str, Any], tmp_path: Path) -> None:
    store, b = local["store"], local["b"]
    _flip_keeping_stat(_object_of(store, b, "weights/model-00001-of-00001.safetensors"))
    truncated = _object_of(store, b, "surgery/model.onnx")
    os.chmod(truncated, 0o644)
    truncated.write_bytes(truncated.read_bytes()[:100])
    run = _build(_clone(tmp_path / "g"), store)
    assert run.statuses["weights"] == "built" and run.statuses["surgery"] == "built"  # both caught, both rebuilt
    assert run.statuses["export"] == "restored"  # rebuilt weights are the same bytes, so export's key holds
    weights_note = next(n for n in run.report["tasks"]["weights"]["cache"] if "corrupt" in n)
    surgery_note = next(n for n in run.report["tasks"]["surgery"]["cache"] if "truncated" in n)
    assert weights_note in run.stderr and surgery_note in run.stderr  # said on the console too
    assert _tree(tmp_path / "g") == _tree(b)


def test_store_round_trips_folders_modes_and_links(tmp_path: Path) -> None:
    """No stage writes a link or an executable today; the store keeps them anyway, and refuses a
    record whose paths leave the folder (a remote store is not trusted with where files go)."""
    from grc.build.tree import scan
    from grc.cache.store import Cache, Events, LocalStore

    built = tmp_path / "built"
    (built / "model" / "1").mkdir(parents=True)  # empty, as Triton's ensemble version folder
    (built / "model" / "run.sh").write_text("#!/bin/sh\n")
    (built / "model" / "run.sh").chmod(0o755)
    (built / "private").mkdir(mode=0o700)
    (built / "private" / "key").write_text("k")
    (built / "private" / "key").chmod(0o600)
    (built / "latest").symlink_to("model/run.sh")
    cache, events = Cache(LocalStore(tmp_path / "store")), Events()
    cache.save("k1", "demo", built, scan(built, {}), events)
    restored = tmp_path / "restored"
    restored.mkdir()
    record = cache.lookup("k1", events)
    assert record is not None and cache.restore(record, restored, events) is not None
    assert _walk_tree(restored) == _walk_tree(built) and not events.warnings

    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "up").symlink_to("../elsewhere")
    cache.save("k2", "demo", escaping, scan(escaping, {}), events)
    assert cache.lookup("k2", events) is None and "points outside" in events.warnings[-1]
    hostile = {
        "key": "k3",
        "tree": [{"path": "../outside", "kind": "file", "mode": 0o644, "sha256": "0" * 64, "bytes": 1}],
    }
    assert cache.restore(hostile, tmp_path / "restored", events) is None and "unsafe" in events.warnings[-1]
    assert not (tmp_path / "outside").exists()


def test_cache_admin_commands(local: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(local["store"], store)
    assert main(["cache", "stats", "--cache-dir", str(store)]) == 0
    assert main(["cache", "verify", "--cache-dir", str(store)]) == 0
    victim = _objects(store)[0]
    os.chmod(victim, 0o644)
    victim.write_bytes(b"garbage")
    assert main(["cache", "verify", "--cache-dir", str(store)]) == 1 and not victim.exists()
    assert main(["cache", "prune", "--max-size", "0", "--cache-dir", str(store)]) == 0
    assert not _objects(store)


def _plan(clone: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    env = {**os.environ, "PYTHONPATH": str(clone)}
    out = subprocess.run(
        [sys.executable, "-m", "grc.cli", "plan", SPEC, "--json"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {row["task"]: row for row in json.loads(out.stdout)}


def test_source_edit_invalidates_exactly_the_tasks_that_import_it(local: dict[str, Any]) -> None:
    clone = local["b"]
    target = "grc/onnx/surgery/passes.py"
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


# --------------------------------------------------------------------------- settings grc cannot use


@contextlib.contextmanager
def _read_only_folder(path: Path) -> Iterator[Path]:
    """A folder this process cannot write, even as root (permission bits do not stop root: the
    immutable attribute does)."""
    path.mkdir(parents=True)
    root = os.geteuid() == 0
    if root:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"running as root and `chattr +i` failed ({done.stderr.strip()}): no read-only folder here")
    else:
        path.chmod(0o555)
    try:
        yield path
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *named: str) -> str:
    """``grc`` exits 2 with one error line naming the setting (no traceback); returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, err
    return err[len("error: ") :]


@pytest.fixture
def cache_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The cache on, as for a user (tests run with it off); each setting put back afterwards (the CLI
    writes its flags into the environment)."""
    monkeypatch.setenv("GRC_CACHE", "on")
    for name in ("GRC_CACHE_DIR", "GRC_REMOTE_CACHE", "GRC_REMOTE_CACHE_READ_ONLY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("case", ["read-only folder", "a file", "not a URL", "GRC_CACHE=bogus", "READ_ONLY=maybe"])
def test_unusable_cache_settings_are_refused_before_any_work(
    case: str, tmp_path: Path, cache_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts = tmp_path / "artifacts"
    argv = ["build", str(SPECS / "hstu-tiny.yaml"), "--artifacts", str(artifacts), "--cache-dir", str(tmp_path / "c")]
    with contextlib.ExitStack() as stack:
        if case == "read-only folder":
            stack.enter_context(_read_only_folder(tmp_path / "c"))
            named: tuple[str, ...] = ("--cache-dir", "GRC_CACHE_DIR", "cannot be written", "expected a folder")
        elif case == "a file":
            (tmp_path / "c").write_text("not a folder")
            named = ("--cache-dir", "GRC_CACHE_DIR", "is not a folder", "expected a folder")
        elif case == "not a URL":
            argv += ["--remote-cache", "notaurl"]
            named = ("--remote-cache", "GRC_REMOTE_CACHE", "'notaurl'", "expected an http:// or https:// URL")
        elif case == "GRC_CACHE=bogus":
            cache_env.setenv("GRC_CACHE", "bogus")
            named = ("GRC_CACHE='bogus'", "expected on or off")
        else:
            cache_env.setenv("GRC_REMOTE_CACHE_READ_ONLY", "maybe")
            argv += ["--remote-cache", "http://127.0.0.1:9"]
            named = ("GRC_REMOTE_CACHE_READ_ONLY='maybe'", "expected on or off")
        message = _refused(capsys, argv, *named)
    report = json.loads((artifacts / "hstu-tiny" / "build-report.json").read_text())
    assert report["ok"] is False and report["error"] == message
    assert not (artifacts / "hstu-tiny" / "weights").exists()  # refused before any stage ran


@pytest.mark.parametrize("case", ["/dev/null", "read-only folder"])
def test_unusable_artifacts_folder_is_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.ExitStack() as stack:
        folder = Path("/dev/null") if case == "/dev/null" else stack.enter_context(_read_only_folder(tmp_path / "ro"))
        _refused(
            capsys,
            ["build", str(SPECS / "hstu-tiny.yaml"), "--artifacts", str(folder)],
            "--artifacts",
            str(folder),
            "expected a folder grc can create and write",
        )


def test_cache_commands_refuse_a_missing_or_file_folder_and_a_bad_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for action in ("stats", "verify", "prune"):
        assert main(["cache", action, "--cache-dir", str(tmp_path / "missing")]) == 1
        assert "does not exist" in capsys.readouterr().err
        assert main(["cache", action, "--cache-dir", str(afile)]) == 1
        assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "store").mkdir()
    for size in ("abc", "-1G", "nan"):
        _refused(
            capsys,
            ["cache", "prune", f"--max-size={size}", "--cache-dir", str(tmp_path / "store")],
            f"--max-size {size!r}",
            "expected a size",
        )


# --------------------------------------------------------------------------- a remote store (nginx)


@pytest.fixture(scope="module")
def remote(local: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Clone D builds cold with an empty local store and uploads to nginx; clone E restores from
    nginx alone (read-only)."""
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.skip("nginx is not installed (.ci/setup-tests installs it; its dav module serves the remote store)")
    base = tmp_path_factory.mktemp("remote")
    with NginxStore(base / "nginx") as url:
        d, e = _clone(base / "d"), _clone(base / "e")
        runs = {"d": _build(d, base / "store-d", url), "e": _build(e, base / "store-e", url, read_only=True)}
        yield {"url": url, "d": d, "e": e, "runs": runs, "nginx_store": base / "nginx" / "store"}


def test_independent_cold_builds_are_byte_identical(local: dict[str, Any], remote: dict[str, Any]) -> None:
    assert set(remote["runs"]["d"].statuses.values()) == {"built"}
    assert _tree(remote["d"], timings=False) == _tree(local["b"], timings=False)  # same key -> same tree


def test_remote_store_alone_restores_everything(remote: dict[str, Any]) -> None:
    assert _objects(remote["nginx_store"]), "clone D uploaded nothing"
    assert set(remote["runs"]["e"].statuses.values()) == {"restored"}
    assert _tree(remote["e"]) == _tree(remote["d"])


def test_read_only_remote_never_uploads(remote: dict[str, Any], tmp_path: Path) -> None:
    clone = remote["e"]
    spec = clone / SPEC
    spec.write_text(
        spec.read_text().replace(
            "max_abs: 1.0e-5, max_rel: 1.0e-4}\n  surgery", "max_abs: 2.0e-5, max_rel: 1.0e-4}\n  surgery"
        )
    )
    before = sorted(p.name for p in (remote["nginx_store"] / "ac").rglob("*"))
    run = _build(clone, tmp_path / "fresh", remote["url"], read_only=True)
    assert run.statuses["verify"] == "built" and run.statuses["export"] == "up to date"
    assert sorted(p.name for p in (remote["nginx_store"] / "ac").rglob("*")) == before


def test_corrupt_remote_object_is_discarded_and_reported(remote: dict[str, Any], tmp_path: Path) -> None:
    onnx_bytes = (remote["d"] / "artifacts/hstu-tiny/onnx/model.onnx").read_bytes()
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    (remote["nginx_store"] / "cas" / digest).write_bytes(onnx_bytes[:-10])  # truncated on the server
    clone = _clone(tmp_path / "h")
    run = _build(clone, tmp_path / "empty", remote["url"], read_only=True)
    assert run.statuses["export"] == "built" and run.statuses["weights"] == "restored"
    note = next(n for n in run.report["tasks"]["export"]["cache"] if "truncated or corrupt" in n)
    assert digest[:12] in note and note in run.stderr
    assert _tree(clone, timings=False) == _tree(remote["d"], timings=False)
