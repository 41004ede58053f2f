"""``grc deploy --target triton``: serve the triton bundle on a real tritonserver and prove it answers.

Finds a server (``tritonserver`` on PATH, else the nvidia-pytriton wheel's, installed on first use
into ~/.cache/grc/tritonserver; ``--docker``: the NGC container), starts it on 127.0.0.1 with free
ports (or the ones asked for), waits for readiness, sends the bundle's sample request over HTTP and
gRPC, checks every score against the PyTorch model, prints the endpoints and a curl example.
Without ``--detach`` the server is stopped afterwards; with it, it keeps running and
``grc deploy --target triton --stop`` stops it (the record is artifacts/<spec>/triton-server.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from grc.errors import GrcError
from grc.serving.common import request as rq
from grc.serving.common.process import http_ok, read_live_record
from grc.serving.triton import bundle as bd
from grc.serving.triton import check
from grc.spec.loader import LoadedSpec

STATE = "triton-server.json"
DOCKER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


class DeployError(GrcError):
    """The bundle could not be served, or it answered wrongly."""


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _bundle(loaded: LoadedSpec, root: Path) -> tuple[Path, dict[str, Any]]:
    spec = loaded.spec
    if not spec.bundles.triton.enabled:
        raise DeployError(f"bundles.triton.enabled is false in {loaded.path}: there is no triton bundle to serve")
    folder = root / "triton"
    if not (folder / "manifest.json").is_file():
        raise DeployError(
            f"no triton bundle at {folder}: build it first with\n  grc build {loaded.path}"
            + (f" --artifacts {root.parent}" if root.parent != Path("artifacts") else "")
        )
    try:
        return folder, bd.load_description(folder)
    except GrcError as exc:
        raise DeployError(str(exc)) from None


def _stale_reasons(loaded: LoadedSpec, root: Path) -> list[str]:
    """Why the built bundle no longer matches the spec and code (empty: up to date)."""
    from grc.build.runner import plan

    try:
        rows = {row.task: row for row in plan(loaded, root)}
    except Exception as exc:  # never "up to date" by default: serving a bundle nobody could check is refused
        raise DeployError(
            f"cannot tell whether the triton bundle is up to date: grc plan failed "
            f"({type(exc).__name__}: {exc}); see `grc plan {loaded.path}`, or rebuild with "
            f"`grc build {loaded.path}`"
        ) from exc
    row = rows.get("triton")
    return [] if row is None or row.state == "up to date" else row.reasons or [row.state]


# --------------------------------------------------------------------------- deploy


def deploy(loaded: LoadedSpec, root: Path, args: argparse.Namespace) -> int:
    console = _console()
    folder, description = _bundle(loaded, root)
    stale = _stale_reasons(loaded, root)
    if stale:
        console.print(
            f"[yellow]warning: the triton bundle is stale ({'; '.join(stale[:3])}); serving what was "
            f"built. Refresh it with: grc build {loaded.path}[/]"
        )
    config_name = checked_config_name(folder, getattr(args, "model_config_name", None))
    missing = check.clients_missing()
    if missing:
        raise DeployError(f"cannot smoke-test {folder}: {missing}")
    if getattr(args, "docker", False):
        return _docker(loaded, root, folder, description, args, config_name, console)
    from grc.serving.triton.fused_bundle import host_problem

    problem = host_problem(folder / bd.MODEL_REPOSITORY)  # no CPU fallback: say why before a server starts
    if problem:
        raise DeployError(f"cannot serve {folder}: {problem}")
    state = root / STATE
    running = _read_state(state)
    if running is not None:
        raise DeployError(
            f"a triton server for {loaded.spec.name} is already running (pid {running['pid']}, "
            f"http {running['ports']['http']}); stop it with\n"
            f"  grc deploy --target triton {loaded.path} --stop"
        )
    from grc.serving.triton.server import TritonServer, TritonServerNotFound, ensure_tritonserver, find_tritonserver

    try:
        install = find_tritonserver()
    except TritonServerNotFound:
        console.print(
            "tritonserver not found on PATH: installing nvidia-pytriton's server into the grc cache (once, ~150 MB)..."
        )
        install = ensure_tritonserver()
    console.print(f"tritonserver: {install.binary} ({install.origin})")
    server = TritonServer(
        folder / bd.MODEL_REPOSITORY,
        install=install,
        startup_timeout_s=float(args.timeout),
        http_port=getattr(args, "http_port", None),
        grpc_port=getattr(args, "grpc_port", None),
        metrics_port=getattr(args, "metrics_port", None),
        keep_alive=bool(args.detach),
        extra_args=[f"--model-config-name={config_name}"] if config_name else (),
    )
    started = time.monotonic()
    server.start()
    try:
        console.print(
            f"ready in {time.monotonic() - started:.1f} s: models "
            f"{', '.join(_models(folder))} loaded from {folder / bd.MODEL_REPOSITORY}"
        )
        ok = smoke_test(loaded, folder, description, server.http_url, server.grpc_url, console)
        _print_endpoints(console, description, folder, server.http_url, server.grpc_url, server.metrics_url)
        if not ok:
            console.print(f"[red]smoke test failed[/]; server log: {_save_log(root, server.logs())}")
            return 1
        if args.detach:
            record = server.detach()
            state.write_text(
                json.dumps(
                    {**record.as_dict(), "spec": loaded.spec.name, "ensemble": description["ensemble"]}, indent=1
                )
                + "\n"
            )
            console.print(
                f"\nleft running (pid {record.pid}, log {record.log}); stop it with\n"
                f"  grc deploy --target triton {loaded.path} --stop"
            )
        else:
            console.print("\nstopping the server (pass --detach to leave it running)")
        return 0
    finally:
        server.stop()  # a no-op after detach()


def custom_configs(folder: Path) -> list[str]:
    """Names of the bundle's custom configs (model_repository/<model>/configs/<name>.pbtxt)."""
    from grc.serving.triton.model_config import CUSTOM_CONFIGS

    return sorted({p.stem for p in (folder / bd.MODEL_REPOSITORY).glob(f"*/{CUSTOM_CONFIGS}/*.pbtxt")})


def checked_config_name(folder: Path, name: str | None) -> str | None:
    if name is None or name in custom_configs(folder):
        return name
    have = ", ".join(custom_configs(folder)) or "none (every GPU is told apart by its compute capability)"
    raise DeployError(
        f"--model-config-name {name}: no model of the bundle has configs/{name}.pbtxt; "
        f"custom configs in {folder}: {have}"
    )


def _models(folder: Path) -> list[str]:
    return list(json.loads((folder / "manifest.json").read_text())["models"])


def smoke_test(
    loaded: LoadedSpec, folder: Path, description: dict[str, Any], http_url: str, grpc_url: str, console: Console
) -> bool:
    """The sample request over HTTP and gRPC, every score against PyTorch float64; prints a table."""
    spec = loaded.spec
    model, weights = bd.bundle_model(folder)  # what was built, even if the spec changed since
    arrays = bd.sample_arrays(description)
    expected = check.Reference(model, weights, description["limits"]["truncate_history"]).scores(arrays)
    table = Table(title=f"smoke test: {description['ensemble']} vs PyTorch (float64)", show_edge=False)
    for col in ("protocol", "candidates", "max_abs", "max_rel", "tolerance (abs/rel)", "ranking", "ms"):
        table.add_column(col, justify="left" if col in ("protocol", "ranking") else "right")
    ok = True
    response: dict[str, Any] = {}
    tol = bd.served_tolerance(description, spec)  # a 16-bit dense step on a GPU: its dtype's tolerance
    for protocol, url in (("http", http_url), ("grpc", grpc_url)):
        t0 = time.perf_counter()
        response = check.infer(url, protocol, description["ensemble"], arrays)
        ms = (time.perf_counter() - t0) * 1000
        # the bundle's own ranking settings: a stale bundle is checked for what it was built with
        rank_w = np.array([description["rank_weights"][t] for t in model.tasks], np.float32)
        result = check.check_response(response, expected, arrays, model, rank_w, description["top_k"], tol)
        ok &= result.ok
        table.add_row(
            protocol,
            str(expected.shape[1]),
            f"{result.max_abs:.2e}",
            f"{result.max_rel:.2e}",
            f"{tol.max_abs:.0e}/{tol.max_rel:.0e}",
            "ok" if result.ok else "; ".join(result.problems),
            f"{ms:.1f}",
            style=None if result.ok else "red",
        )
    console.print(table)
    top = Table(title=f"top {response['ranked_items'].shape[1]} of the sample request", show_edge=False)
    for col in ("rank", "candidate", rq.candidate_input(model.candidate[0]), "ranking score", *model.tasks):
        top.add_column(col, justify="right")
    for i, (pos, item, score) in enumerate(
        zip(response["ranked_candidates"][0], response["ranked_items"][0], response["ranked_scores"][0], strict=True)
    ):
        top.add_row(
            str(i + 1), str(pos), str(item), f"{score:.5f}", *(f"{s:.5f}" for s in response["ranked_task_scores"][0][i])
        )
    console.print(top)
    return ok


def curl_example(http_url: str, ensemble: str, folder: Path) -> str:
    return (
        f"curl -s -X POST http://{http_url}/v2/models/{ensemble}/infer "
        f"-H 'Content-Type: application/json' -d @{shlex.quote(str((folder / bd.SAMPLE_JSON).resolve()))}"
    )


def _print_endpoints(
    console: Console, description: dict[str, Any], folder: Path, http_url: str, grpc_url: str, metrics_url: str
) -> None:
    ens = description["ensemble"]
    console.print(
        f"\nendpoints of {ens}:\n"
        f"  HTTP/REST  http://{http_url}/v2/models/{ens}/infer\n"
        f"  gRPC       {grpc_url}  (tritonclient.grpc, model {ens!r})\n"
        f"  metrics    {metrics_url}  (Prometheus)\n"
        f"  schema     {folder / bd.BUNDLE_JSON}\n"
        f"try it:\n  {curl_example(http_url, ens, folder)}"
    )


def _save_log(root: Path, text: str) -> Path:
    path = root / "triton-server.log"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- stop


def _read_state(path: Path) -> dict[str, Any] | None:
    """The recorded detached server (a container, or a tritonserver that is still the one we started)."""
    from grc.serving.triton.server import DetachedServer, detached_alive

    def alive(data: dict[str, Any]) -> bool:
        return "docker" in data or detached_alive(
            DetachedServer(**{k: data[k] for k in DetachedServer.__dataclass_fields__})
        )

    return read_live_record(path, alive)


def stop(loaded: LoadedSpec, root: Path, args: argparse.Namespace) -> int:
    from grc.serving.triton.server import DetachedServer, stop_detached

    console = _console()
    state = root / STATE
    if not state.is_file():
        console.print(f"no detached triton server recorded for {loaded.spec.name} ({state}): nothing to stop")
        return 0
    data = json.loads(state.read_text())
    if "docker" in data:
        subprocess.run(["docker", "stop", data["docker"]], check=False)
        state.unlink(missing_ok=True)
        console.print(f"stopped container {data['docker']}")
        return 0
    record = DetachedServer(**{k: data[k] for k in DetachedServer.__dataclass_fields__})
    was_running = stop_detached(record)
    state.unlink(missing_ok=True)
    console.print(
        f"stopped the triton server of {loaded.spec.name} (pid {record.pid})"
        if was_running
        else f"the triton server of {loaded.spec.name} (pid {record.pid}) was no longer running; record removed"
    )
    return 0


# --------------------------------------------------------------------------- docker


def grc_source() -> Path | None:
    """The checkout grc runs from (to pip-install it inside the container), if it is one."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "grc").is_dir() else None


def docker_command(
    spec_name: str, folder: Path, gpu: bool, detach: bool = False, config_name: str | None = None
) -> list[str]:
    """The NGC container serving the bundle: the repository mounted read-only, grc installed first
    (the python models import it), ports 8000-8002 on 127.0.0.1."""
    repo = (folder / bd.MODEL_REPOSITORY).resolve()
    source = grc_source()
    mounts = ["-v", f"{repo}:/models:ro"]
    if source is not None:
        mounts += ["-v", f"{source}:/opt/grc-src:ro"]
        install = (
            "mkdir -p /tmp/grc && cp -r /opt/grc-src/pyproject.toml /opt/grc-src/README.md /opt/grc-src/grc "
            "/opt/grc-src/kernels /tmp/grc/ && pip install -q /tmp/grc"
        )
    else:
        from grc import __version__

        install = f"pip install -q grc=={__version__}"
    ports = [x for s, p in DOCKER_PORTS.items() for x in ("-p", f"127.0.0.1:{p}:{p}")]
    serve = "tritonserver --model-repository=/models --strict-readiness=true"
    if config_name:
        serve += f" --model-config-name={config_name}"
    return [
        "docker",
        "run",
        *(["-d"] if detach else []),
        "--rm",
        "--name",
        f"grc-triton-{spec_name}",
        "--shm-size=1g",
        *(["--gpus", "all"] if gpu else []),
        *ports,
        *mounts,
        bd.NGC_IMAGE,
        "bash",
        "-c",
        f"{install} && {serve}",
    ]


def _docker_works() -> tuple[bool, str]:
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return done.returncode == 0, (done.stderr or done.stdout).strip().splitlines()[-1:][0] if (
        done.stderr or done.stdout
    ).strip() else f"exit {done.returncode}"


def _docker(
    loaded: LoadedSpec,
    root: Path,
    folder: Path,
    description: dict[str, Any],
    args: argparse.Namespace,
    config_name: str | None,
    console: Console,
) -> int:
    cfg = loaded.spec.bundles.triton
    gpu = cfg.instance_kind == "KIND_GPU" or "tensorrt_plan" in (cfg.backend, *cfg.extra_backends)
    command = docker_command(loaded.spec.name, folder, gpu, detach=True, config_name=config_name)
    console.print("NGC container command (the bundle mounted at /models):\n  " + shlex.join(command))
    works, why = _docker_works()
    if not works:
        console.print(f"docker is not usable here ({why}): the command is printed, not run")
        return 0
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    name = command[command.index("--name") + 1]
    http, grpc_url = f"127.0.0.1:{DOCKER_PORTS['http']}", f"127.0.0.1:{DOCKER_PORTS['grpc']}"
    try:
        _wait_http(f"http://{http}/v2/health/ready", float(args.timeout), name)
        ok = smoke_test(loaded, folder, description, http, grpc_url, console)
        _print_endpoints(
            console, description, folder, http, grpc_url, f"http://127.0.0.1:{DOCKER_PORTS['metrics']}/metrics"
        )
        if ok and args.detach:
            (root / STATE).write_text(json.dumps({"docker": name, "spec": loaded.spec.name}) + "\n")
            console.print(f"container {name} left running; stop it with grc deploy --target triton --stop")
            return 0
        return 0 if ok else 1
    finally:
        if not (args.detach and (root / STATE).is_file()):
            subprocess.run(["docker", "stop", name], check=False, capture_output=True)


def _wait_http(url: str, timeout_s: float, container: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        time.sleep(1)
    logs = subprocess.run(["docker", "logs", "--tail", "30", container], capture_output=True, text=True)
    raise DeployError(f"container {container} not ready after {timeout_s:.0f} s:\n{logs.stdout}{logs.stderr}")
