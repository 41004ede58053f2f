"""The ``grc`` command as a user meets it: Ctrl-C, clean beside a build, odd paths and bad
arguments, help, version and completion. Real processes, real signals, real doit builds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from grc.cli import main
from tests.conftest import REPO, SPECS, in_dir, run_build, write_spec
from tests.test_build import _big_weights_spec

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
COMMANDS = [
    ["validate"],
    ["show"],
    ["build"],
    ["plan"],
    ["graph"],
    ["clean"],
    ["schema"],
    ["deploy"],
    ["cache", "stats"],
    ["cache", "prune"],
    ["cache", "verify"],
    ["inspect", "engine"],
    ["inspect", "targets"],
]


def _grc(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grc.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


Ready = Callable[[Path, int, str], bool]  # (artifacts folder, build pid, its stderr so far) -> interrupt now


# -- Ctrl-C -------------------------------------------------------------------------------------------


def _interrupt(spec: Path, stage: str, jobs: int, ready: Ready) -> tuple[int, str] | None:
    """``grc build SPEC STAGE -j JOBS``, SIGINT once ``ready(artifacts, pid, stderr so far)``: (exit
    code, stderr), or None when the stage finished before the signal landed. stderr is a pipe, as
    under a terminal or CI runner (a file there made the abort rarer)."""
    if stage == "weights":  # an earlier trial may have finished it: start where the stage must run
        assert _grc("clean", spec.name, cwd=spec.parent).returncode == 0
    proc = subprocess.Popen(  # --no-cache: the stage runs, never restored from an earlier trial's store entry
        [sys.executable, "-m", "grc.cli", "build", spec.name, stage, "-j", str(jobs), "--no-cache"],
        cwd=spec.parent,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as a terminal user's build has it: a pytest-xdist worker ignores SIGINT, and an ignored
        # signal is inherited (Python then installs no KeyboardInterrupt handler in the child)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 300
    while proc.poll() is None and not ready(spec.parent / "artifacts", proc.pid, "".join(lines)):
        assert time.monotonic() < deadline, f"{stage} never reached the point to interrupt"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=60)
    err = "".join(lines)
    return None if f"✓ {stage}" in err else (proc.returncode, err)


def _first_shard_written(artifacts: Path, pid: int, _err: str) -> bool:
    """The weights stage is inside torch writing tables (native code, the GIL released)."""
    return any(next(p.glob("*.safetensors"), None) for p in artifacts.glob(f"*/weights.partial-{pid}"))


def _seconds_into(stage: str, seconds: float) -> Ready:
    started: list[float] = []

    def ready(_artifacts: Path, _pid: int, err: str) -> bool:
        if not started and f"▶ {stage}" in err:
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] >= seconds

    return ready


def test_ctrl_c_exits_130_cleanly_in_every_stage(tmp_path: Path) -> None:
    """Before: a SIGINT while a stage ran torch in doit's worker thread (-j 1 too) ended in "terminate
    called without an active exception" (SIGABRT, exit 134): the interpreter finalized under it."""
    big = _big_weights_spec(tmp_path / "big")  # seconds of native table writes
    tiny = write_spec(tmp_path / "tiny", SPECS / "hstu-tiny.yaml")
    run_build(tiny, only=["weights"])  # export's input: the export trials start at export
    points = [
        (big, "weights", 1, _first_shard_written),
        (big, "weights", 2, _first_shard_written),
        (tiny, "export", 1, _seconds_into("export", 5.0)),
        (tiny, "plugins", 1, _seconds_into("plugins", 2.0)),
    ]
    landed = 0
    for spec, stage, jobs, ready in points:
        result = _interrupt(spec, stage, jobs, ready)
        if result is None:
            continue
        landed += 1
        code, err = result
        where = f"SIGINT during {stage} (-j {jobs})"
        assert code == 130, f"{where}: exit {code}\n{err[-2000:]}"
        assert "terminate called" not in err and "Traceback" not in err, f"{where}:\n{err[-2000:]}"
        assert err.rstrip().endswith("interrupted"), f"{where}:\n{err[-2000:]}"
    assert landed >= 2, "the stages finished before the interrupts: nothing was tested"
    for spec in (big, tiny):  # the lock is free and doit's state readable
        assert _grc("plan", spec.name, "--json", cwd=spec.parent).returncode == 0
        assert _grc("clean", spec.name, cwd=spec.parent).returncode == 0


# -- clean ---------------------------------------------------------------------------------------------


def _artifacts(tmp_path: Path) -> tuple[Path, Path]:
    spec = write_spec(tmp_path, SPECS / "hstu-tiny.yaml")
    root = tmp_path / "artifacts" / "hstu-tiny"
    (root / "onnx").mkdir(parents=True)
    (root / "onnx" / "model.onnx").write_bytes(b"built")
    return spec, root


def test_clean_refuses_while_a_build_holds_the_lock(tmp_path: Path) -> None:
    from grc.build.lock import BuildLock

    spec, root = _artifacts(tmp_path)
    with BuildLock(root, wait_seconds=0):  # the lock a running build holds
        out = _grc("clean", spec.name, cwd=tmp_path)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"pid {os.getpid()}" in out.stderr and "removed" not in out.stdout
        assert (root / "onnx" / "model.onnx").read_bytes() == b"built"
        started = time.monotonic()
        assert _grc("clean", spec.name, "--wait", "1", cwd=tmp_path).returncode == 1
        assert time.monotonic() - started >= 1
    out = _grc("clean", spec.name, cwd=tmp_path)
    assert out.returncode == 0 and f"removed {Path('artifacts/hstu-tiny')}" in out.stdout, out.stderr
    assert not (root / "onnx").exists()


def test_clean_of_a_read_only_tree_fails_and_says_why(tmp_path: Path) -> None:
    spec, root = _artifacts(tmp_path)
    command = [sys.executable, "-m", "grc.cli", "clean", spec.name]
    if os.geteuid() == 0:  # root writes through permission bits: make the tree a read-only mount
        if shutil.which("unshare") is None:
            pytest.skip("running as root, and util-linux `unshare` (for a read-only bind mount) is not installed")
        folder = str(tmp_path / "artifacts")
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"running as root without CAP_SYS_ADMIN for a read-only bind mount: {probe.stderr.strip()}")
        script = f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, "sh", *command]
    else:
        for path in (root / "onnx", root, root.parent):
            path.chmod(0o555)
    try:
        out = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    finally:
        for path in (root.parent, root, root / "onnx"):
            path.chmod(0o755)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "removed" not in out.stdout
    assert "Read-only file system" in out.stderr or "Permission denied" in out.stderr, out.stderr
    assert (root / "onnx" / "model.onnx").exists()


# -- text printed as text -----------------------------------------------------------------------------


def test_bracketed_paths_print_verbatim_in_a_failed_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: rich read "[/x]" as a closing tag: MarkupError inside the printer, exit 3."""
    data = yaml.safe_load((SPECS / "hstu-tiny.yaml").read_text())
    data["weights"] = {"checkpoint": "ck[/x]/model.pt"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    with in_dir(tmp_path):
        code = main(["build", "s.yaml", "weights", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    assert "ck[/x]/model.pt" in err and "MarkupError" not in err


def test_show_prints_a_description_with_brackets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, SPECS / "hstu-tiny.yaml", {"description": "ids like [/x] and TORCH_TO_ST[dtype]"})
    assert main(["show", str(spec)]) == 0
    assert "ids like [/x] and TORCH_TO_ST[dtype]" in capsys.readouterr().out


def test_reporter_and_stage_log_print_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``TORCH_TO_ST[dtype]`` printed as ``TORCH_TO_ST`` (``[dtype]`` read as a style)."""
    from doit.exceptions import TaskFailed
    from doit.task import Task

    from grc.build.progress import CONSOLE, BuildRecords, Reporter
    from grc.stages.base import Context

    Reporter(BuildRecords()).add_failure(Task("export", []), TaskFailed("KeyError: TORCH_TO_ST[dtype] [bold]x[/bold]"))
    Context(loaded=None, out=Path("."), inputs={}, console=CONSOLE).log("reading ck[/x]/a[b].pt")  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "TORCH_TO_ST[dtype] [bold]x[/bold]" in err and "reading ck[/x]/a[b].pt" in err


# -- arguments ----------------------------------------------------------------------------------------


def test_unknown_stage_is_named_with_the_real_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, SPECS / "hstu-tiny.yaml")
    with in_dir(tmp_path):
        assert main(["build", spec.name, "nosuchstage"]) == 2
    err = capsys.readouterr().err
    assert "'nosuchstage' is not a stage" in err and "weights, export" in err and "grc list" not in err
    with in_dir(tmp_path):
        assert main(["build", spec.name, "weights", "aoti"]) == 2  # a stage, but engine.aoti is off here
    assert "'aoti' is turned off in this spec" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()


def test_spec_that_is_no_file_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")
    assert main(["validate", str(tmp_path)]) == 2
    assert f"{tmp_path.name}:1: (file): is a directory, not a spec file" in capsys.readouterr().err  # path as given
    assert main(["build", str(tmp_path / "pipe.yaml")]) == 2  # never opened: a FIFO would block
    assert "pipe.yaml:1: (file): is a FIFO (named pipe), not a spec file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml:1: (file): file not found" in capsys.readouterr().err


def test_unknown_option_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "No such option: --frobnicate" in err and "required" not in err
    assert main(["build", "--frobnicate"]) == 2
    assert "No such option: --frobnicate" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "-inf"])
def test_wait_takes_finite_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    """Before: ``--wait nan`` waited for ever behind a running build (no deadline compares true)."""
    spec = write_spec(tmp_path, SPECS / "hstu-tiny.yaml")
    with in_dir(tmp_path):
        assert main(["build", spec.name, "weights", "--wait", value]) == 2
        assert main(["clean", spec.name, "--wait", value]) == 2
    err = capsys.readouterr().err
    assert err.count("Invalid value for '--wait'") == 2 and "0 or more, finite" in err
    assert not (tmp_path / "artifacts").exists()


# -- help, version, completion -----------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"grc {' '.join(command)}" in out and "Examples:" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from grc import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grc {__version__}"


def test_shell_completion_completes_commands_and_options(tmp_path: Path) -> None:
    # typer picks the shell from the parent processes (shellingham): give it a bash parent, which a
    # test run does not always have (an orphaned background job's is init). `; exit` keeps bash from
    # exec-ing python in its place.
    script = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m grc.cli --show-completion; exit $?'],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0 and "_GRC_COMPLETE=complete_bash" in script.stdout, script.stderr
    env = {**ENV, "_GRC_COMPLETE": "complete_bash", "COMP_WORDS": "grc bu", "COMP_CWORD": "1"}
    out = subprocess.run([sys.executable, "-m", "grc.cli"], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["build"], out.stdout + out.stderr
    env.update(COMP_WORDS="grc build --no", COMP_CWORD="2")
    out = subprocess.run([sys.executable, "-m", "grc.cli"], env=env, capture_output=True, text=True, timeout=60)
    assert "--no-cache" in out.stdout.split(), out.stdout + out.stderr
    env.update(COMP_WORDS="grc show specs/mtgr-s", COMP_CWORD="2")
    out = subprocess.run(
        [sys.executable, "-m", "grc.cli"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    wanted = sorted(f"specs/{p.name}" for p in (REPO / "specs").glob("mtgr-s*.yaml"))  # small and small-gpu
    assert len(wanted) >= 2 and sorted(out.stdout.split()) == wanted, out.stdout + out.stderr
