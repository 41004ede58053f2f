"""Find, install and run a real Triton Inference Server (``tritonserver``) on 127.0.0.1.

Where the binary comes from: ``tritonserver`` on PATH (an NGC container), else the server that the
PyPI wheel ``nvidia-pytriton`` ships, pip-installed with ``--no-deps --target`` into a dedicated
directory (``$GRC_TRITON_HOME``, default ``~/.cache/grc/tritonserver``). ``--no-deps`` because we
only need its binary, and the wheel pins numpy<2, which must not reach our environment.

Why the python backend needs help to see our packages: its stub process embeds CPython through
pybind11 with an *isolated* config, so PYTHONPATH and PYTHONHOME are ignored. The stub links
``libpython3.X.so.1.0`` by soname (left alone it gets the distro's, e.g. Debian's 3.11.2 with
/usr/lib/python3 packages) and derives ``sys.prefix`` by looking ``python3`` up on PATH. So the
server is started with (1) a directory holding only a link to *our* libpython first on
LD_LIBRARY_PATH and (2) our interpreter's bin/ first on PATH; a venv's bin/ makes the stub read
its pyvenv.cfg, so the venv's site-packages come along.

Caveat for model.py authors: this server's stub (python_backend 24.10, pybind11 2.10) misreads
numpy 2 arrays: ``Tensor.as_numpy()`` returns zeros and ``pb_utils.Tensor(name, array)`` sends
0 bytes, both silently. Cross the boundary with DLPack instead (``np.from_dlpack(tensor)``,
``pb_utils.Tensor.from_dlpack(name, array)``); BYTES tensors have no such route.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from grc.build.lock import FileLock
from grc.errors import GrcError
from grc.serving.common.process import free_port, http_get, http_ok, kill_group

# nvidia-pytriton 0.7.0 ships tritonserver 2.51.0 (NGC 24.10) with the python backend only.
PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
HOME_ENV = "GRC_TRITON_HOME"
HOST = "127.0.0.1"
SERVICES = ("http", "grpc", "metrics")

_WHEEL_SERVER_DIR = Path("pytriton", "tritonserver")
_STUB = "triton_python_backend_stub"
_PIP_TIMEOUT_S = 600.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_RUNNING: weakref.WeakSet[TritonServer] = weakref.WeakSet()


class TritonServerError(GrcError):
    """tritonserver could not be installed or started, or it stopped serving."""


class TritonServerNotFound(TritonServerError):
    """No tritonserver on PATH nor in the dedicated install directory."""


class PortInUseError(TritonServerError):
    """A port asked for is already taken by another process."""


class ModelLoadError(TritonServerError):
    """Models failed to load (the server then exits); ``failures`` maps "model version N" to reason."""

    def __init__(self, message: str, failures: dict[str, str]):
        super().__init__(message)
        self.failures = failures


@dataclass(frozen=True)
class ServerInstall:
    """A usable tritonserver: its binary and the ``--backend-directory`` to give it."""

    binary: Path
    backend_dir: Path | None  # None: the binary's built-in default (/opt/tritonserver/backends)
    origin: str  # where it was found, for messages


# --------------------------------------------------------------------------- find / install


def triton_home() -> Path:
    """The dedicated directory the wheel is installed into (``$GRC_TRITON_HOME`` wins)."""
    if env := os.environ.get(HOME_ENV):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "grc" / "tritonserver"


def install_command(home: Path) -> list[str]:
    """The exact pip command that installs the server into ``home``."""
    return [
        sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
        "--target", str(home), PYTRITON_REQUIREMENT,
    ]  # fmt: skip


def find_tritonserver(home: Path | None = None) -> ServerInstall:
    """``tritonserver`` on PATH, else the wheel installed in ``home``; raises TritonServerNotFound."""
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        backends = binary.parent.parent / "backends"  # NGC layout: /opt/tritonserver/{bin,backends}
        return ServerInstall(binary, backends if backends.is_dir() else None, "PATH")
    home = home or triton_home()
    root = home / _WHEEL_SERVER_DIR
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonServerNotFound(
            f"tritonserver is not on PATH and not installed in {home}. Install it with:\n"
            f"  {shlex.join(install_command(home))}\n"
            "or call grc.serving.triton.server.ensure_tritonserver()"
        )
    return ServerInstall(binary, _python_backend_dir(root), f"{PYTRITON_REQUIREMENT} in {home}")


def ensure_tritonserver(home: Path | None = None) -> ServerInstall:
    """Like find_tritonserver, but pip-installs the wheel into ``home`` first when missing."""
    try:
        return find_tritonserver(home)
    except TritonServerNotFound:
        pass
    home = home or triton_home()
    home.parent.mkdir(parents=True, exist_ok=True)
    # One installer at a time (xdist workers, parallel deploys): the others wait, then find it.
    with FileLock(home.parent / f".{home.name}.lock"):
        try:
            return find_tritonserver(home)
        except TritonServerNotFound:
            _pip_install(home)
        return find_tritonserver(home)


def _pip_install(home: Path) -> None:
    # Install into a sibling staging dir and rename: a killed or failed pip never leaves a
    # half-installed home that find_tritonserver would later take for a good one.
    if home.exists() and any(home.iterdir()):
        raise TritonServerError(f"{home} is not empty but holds no tritonserver: remove it and retry")
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}-", dir=home.parent))
    try:
        command = install_command(staging)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise TritonServerError(f"pip did not finish in {_PIP_TIMEOUT_S:.0f} s: {shlex.join(command)}") from exc
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise TritonServerError(
                f"installing {PYTRITON_REQUIREMENT} failed (exit {done.returncode}):\n"
                f"  {shlex.join(install_command(home))}\n{tail}"
            )
        if home.exists():
            home.rmdir()  # empty, checked above
        staging.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _python_backend_dir(root: Path) -> Path:
    """A backend directory whose python/ holds the stub built for this Python's minor version.

    The wheel ships one stub per Python (python_backend_stubs/3.X/) but the backend only looks next
    to libtriton_python.so. backends-py3.X/ sits beside backends/ (same depth, so the libraries'
    $ORIGIN-relative RUNPATH still reaches nvidia_pytriton.libs/) and leaves backends/ untouched,
    so interpreters of several versions can share one install.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = root / f"backends-py{version}"
    if (target / "python" / _STUB).is_file():
        return target
    stub = root / "python_backend_stubs" / version / _STUB
    if not stub.is_file():
        raise TritonServerError(f"{PYTRITON_REQUIREMENT} ships no python backend stub for Python {version}")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        (staging / "python").mkdir()
        for item in (root / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, staging / "python" / item.name)
        shutil.copy2(stub, staging / "python" / _STUB)
        (staging / "python" / _STUB).chmod(0o755)
        with contextlib.suppress(OSError):  # a concurrent caller renamed its identical copy first
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- environment


def python_backend_env(workdir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment, arranged so python-backend stubs run *this* interpreter."""
    env = dict(os.environ if base is None else base)
    libdir = workdir / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    soname = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"  # what the stub links
    (libdir / soname).symlink_to(_libpython())
    env["LD_LIBRARY_PATH"] = _prepend(str(libdir), env.get("LD_LIBRARY_PATH"))
    env["PATH"] = _prepend(str(_interpreter_bin_dir(workdir)), env.get("PATH"))
    return env


def _prepend(entry: str, current: str | None) -> str:
    return f"{entry}{os.pathsep}{current}" if current else entry


def _libpython() -> Path:
    path = Path(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not path.is_file():
        raise TritonServerError(
            f"{sys.executable} has no shared libpython ({path} missing); the python backend stub "
            "must load this interpreter's libpython to see its packages. Use a Python built with "
            "--enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)."
        )
    return path


def _interpreter_bin_dir(workdir: Path) -> Path:
    # The stub resolves the name ``python3``; our own bin/ (kept unresolved so a venv's
    # pyvenv.cfg is found) serves when its python3 is this interpreter.
    executable = Path(sys.executable)
    bindir = executable.parent
    candidate = bindir / "python3"
    if candidate.exists() and candidate.resolve() == executable.resolve():
        return bindir
    if sys.prefix != sys.base_prefix:
        raise TritonServerError(f"venv {sys.prefix} has no bin/python3; the python backend cannot find it")
    linkdir = workdir / "bin"
    linkdir.mkdir(parents=True, exist_ok=True)
    (linkdir / "python3").symlink_to(executable.resolve())
    return linkdir


# --------------------------------------------------------------------------- ports


def _check_port_free(service: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise PortInUseError(
                f"{service} port {HOST}:{port} is already in use ({exc.strerror}); "
                f"pass another {service}_port, or None to pick a free one"
            ) from exc


# --------------------------------------------------------------------------- log reading

_MODEL_FAILURE = re.compile(r"failed to load '(?P<model>[^']+)' version (?P<version>\d+): (?P<reason>.*?)\"?$")
_PORT_TAKEN = re.compile(r"failed to start (?P<service>\w+) service: (?P<reason>.*already in use.*?)\"?$")
_TABLE_LINE = re.compile(r"^\s*[|+]")


def _model_failures(log: str) -> dict[str, str]:
    failures: dict[str, str] = {}
    for line in log.splitlines():
        if found := _MODEL_FAILURE.search(line):
            reason = found["reason"].replace("\\n", "\n").replace('\\"', '"').strip()
            failures[f"{found['model']} version {found['version']}"] = reason
    return failures


def _taken_service(log: str) -> tuple[str, str] | None:
    for line in log.splitlines():
        if found := _PORT_TAKEN.search(line):
            return found["service"].lower(), found["reason"].strip()
    return None


def _log_tail(log: str, lines: int = 25) -> str:
    kept = [line for line in log.splitlines() if line.strip() and not _TABLE_LINE.match(line)]
    return "\n".join(kept[-lines:])


# --------------------------------------------------------------------------- server


class _PortRace(Exception):
    """An auto-picked port was taken between picking and the server binding it."""


class _Endpoints:
    """Addresses in the form tritonclient takes them, from a ``ports`` map (live or detached server)."""

    ports: dict[str, int]

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports['metrics']}/metrics"


class TritonServer(_Endpoints):
    """A tritonserver process on 127.0.0.1; ``with TritonServer(repo) as server: ...``.

    Ports left as None are picked free. ``start()`` returns once every model is loaded
    (``--strict-readiness``), or raises with the server's own log lines on why not.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        install: ServerInstall | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        startup_timeout_s: float = 60.0,
        auto_complete_config: bool = False,
        extra_args: Sequence[str] = (),
        keep_alive: bool = False,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.install = install
        self.startup_timeout_s = startup_timeout_s
        self.auto_complete_config = auto_complete_config
        self.extra_args = list(extra_args)
        # keep_alive: no parent-death signal, so the server may outlive its caller after detach()
        self.keep_alive = keep_alive
        self._metrics_on = "--allow-metrics=false" not in self.extra_args
        self.ports: dict[str, int] = {}
        self.startup_s: float | None = None
        self._asked = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._shm_prefix = f"grc{os.getpid()}_{secrets.token_hex(4)}_"
        self._log_text = ""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def logs(self) -> str:
        """The server's stdout and stderr so far (kept after stop())."""
        if self._workdir is not None and (self._workdir / "server.log").is_file():
            return (self._workdir / "server.log").read_text(errors="replace")
        return self._log_text

    # ---- lifecycle
    def start(self) -> TritonServer:
        if self._proc is not None:
            raise TritonServerError("server already started")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        install = self.install or find_tritonserver()
        for _attempt in range(3):
            try:
                self._launch(install, self._choose_ports())
                self._wait_ready()
                return self
            except _PortRace:
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise PortInUseError("free ports picked for tritonserver were taken by others three times in a row")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Triton unloads models and ends its stubs), then SIGKILL what is left."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout_s)
            kill_group(proc.pid)  # stubs share the server's process group (start_new_session)
            proc.wait()
            _remove_shm(self._shm_prefix)
            _RUNNING.discard(self)
        if self._workdir is not None:
            self._log_text = self.logs()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def detach(self) -> DetachedServer:
        """Let the server outlive this process; ``stop_detached(record)`` stops it later.

        Start it with ``keep_alive=True``: otherwise Linux ends it with the thread that started it.
        """
        if not self.running or self._proc is None or self._workdir is None:
            raise TritonServerError("detach(): the server is not running")
        if not self.keep_alive:
            raise TritonServerError("detach(): start the server with keep_alive=True to let it outlive its caller")
        record = DetachedServer(
            pid=self._proc.pid,
            ports=dict(self.ports),
            shm_prefix=self._shm_prefix,
            workdir=str(self._workdir),
            log=str(self._workdir / "server.log"),
            model_repository=str(self.model_repository),
        )
        _DETACHED.append(self._proc)  # still our child while we live: keep the handle so it can be reaped
        _RUNNING.discard(self)
        self._proc, self._workdir = None, None
        return record

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- internals
    def _choose_ports(self) -> dict[str, int]:
        for service, port in self._asked.items():
            if port is not None:
                _check_port_free(service, port)
        return {s: p if p is not None else free_port(HOST) for s, p in self._asked.items()}

    def _command(self, install: ServerInstall) -> list[str]:
        command = [str(install.binary), f"--model-repository={self.model_repository}"]
        if install.backend_dir is not None:
            command.append(f"--backend-directory={install.backend_dir}")
        for service in SERVICES:
            command += [f"--{service}-address={HOST}", f"--{service}-port={self.ports[service]}"]
        if not self.auto_complete_config:
            # Our configs are complete; auto-complete costs one extra stub launch per python
            # model (startup 1.3 s instead of 3-4 s for three models on 2 cores).
            command.append("--disable-auto-complete-config")
        return [
            *command,
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=5",
            "--allow-gpu-metrics=false",  # no GPU here; spares the DCGM probe
            # Unique shared-memory names: two servers on one machine (xdist) cannot collide, and
            # stop() can remove the regions of stubs it had to SIGKILL.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self.extra_args,
        ]

    def _launch(self, install: ServerInstall, ports: dict[str, int]) -> None:
        self.ports = ports
        self._workdir = Path(tempfile.mkdtemp(prefix="grc-triton-"))
        env = python_backend_env(self._workdir)
        with open(self._workdir / "server.log", "wb") as log:
            self._proc = subprocess.Popen(
                self._command(install),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._workdir,
                start_new_session=True,
                preexec_fn=None if self.keep_alive else _parent_death_signal(),
            )
        _RUNNING.add(self)

    def _wait_ready(self) -> None:
        started = time.monotonic()
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() - started < self.startup_timeout_s:
            if self._proc is None or self._proc.poll() is not None:
                self._raise_exit_reason()
            # A taken metrics port is not fatal to Triton: it logs the failure (after a line
            # claiming the service started) and serves on. So the metrics port must answer too.
            self._raise_if_port_taken(self.logs())
            if http_ok(url) and (not self._metrics_on or _metrics_ok(self.metrics_url)):
                self.startup_s = time.monotonic() - started
                return
            time.sleep(0.1)
        raise TritonServerError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s; last log lines:\n{_log_tail(self.logs())}"
        )

    def _raise_if_port_taken(self, log: str) -> None:
        if taken := _taken_service(log):
            service, reason = taken
            if service in self._asked and self._asked[service] is None:
                raise _PortRace()
            raise PortInUseError(f"tritonserver could not bind its {service} port: {reason}")

    def _raise_exit_reason(self) -> None:
        log = self.logs()
        code = self._proc.returncode if self._proc is not None else None
        self._raise_if_port_taken(log)
        if failures := _model_failures(log):
            lines = "\n".join(f"  model '{name}': {reason}" for name, reason in failures.items())
            raise ModelLoadError(f"tritonserver failed to load models from {self.model_repository}:\n{lines}", failures)
        raise TritonServerError(f"tritonserver exited with code {code}; last log lines:\n{_log_tail(log)}")


@dataclass(frozen=True)
class DetachedServer(_Endpoints):
    """What stop_detached() needs to stop a server another process started (JSON-friendly)."""

    pid: int
    ports: dict[str, int]
    shm_prefix: str
    workdir: str
    log: str
    model_repository: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


_DETACHED: list[subprocess.Popen[bytes]] = []


def detached_alive(record: DetachedServer) -> bool:
    """Whether the recorded process still runs and is that tritonserver (pids get reused)."""
    _reap(record.pid)
    try:
        stat = Path(f"/proc/{record.pid}/stat").read_text()
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return (
        bool(cmdline)
        and cmdline[0].endswith(b"tritonserver")
        and f"--model-repository={record.model_repository}".encode() in cmdline
    )


def stop_detached(record: DetachedServer, timeout_s: float = 15.0) -> bool:
    """SIGTERM a detached server, SIGKILL its group if it lingers, remove its files.
    Returns whether it was still running."""
    alive = detached_alive(record)
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while detached_alive(record) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_group(record.pid)
        deadline = time.monotonic() + 5
        while detached_alive(record) and time.monotonic() < deadline:
            time.sleep(0.05)
    _remove_shm(record.shm_prefix)
    shutil.rmtree(record.workdir, ignore_errors=True)
    return alive


def _reap(pid: int) -> None:
    for proc in list(_DETACHED):
        if proc.pid == pid and proc.poll() is not None:
            _DETACHED.remove(proc)


def _metrics_ok(url: str) -> bool:
    # "nv_" metric names: the answer comes from Triton, not from whoever holds the port.
    body = http_get(url, timeout_s=0.5)
    return body is not None and b"nv_" in body


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the server when the thread that started it dies.

    So a crashed or SIGKILLed caller cannot leave a server and its stubs behind (the new session
    shields them from the terminal's signals); start servers from a long-lived thread. prctl is
    looked up here, in the parent: the child of a threaded parent must not dlopen after fork.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@atexit.register
def _stop_all() -> None:
    # A caller that exits without stop() (an exception outside a with-block) still cleans up.
    for server in list(_RUNNING):
        server.stop()


def _remove_shm(prefix: str) -> None:
    # Stubs that did not shut down cleanly leave their regions in /dev/shm (1 MiB or more each).
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        region.unlink(missing_ok=True)
