"""bench/serve.py's measurements: a served model under closed-loop gRPC load (grc, eager, kernels), and the
grc model's Ranker called in the bench process on batches of the same requests (in_process: no server)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from serve_pool import Sampler, answer_problems

from grc.serving.common import request as rq
from grc.serving.common.loop import closed_loop
from grc.spec.schema import Spec

# mode -> the backend it serves (None: the spec's own backend, grc's path)
MODES: dict[str, str | None] = {"grc": None, "eager": "pytorch", "kernels": "pytorch_kernels", "in_process": None}
SERVER_MODES = ("grc", "eager", "kernels")


def served_model(spec: Spec, mode: str) -> str | None:
    """The model name a mode sends to, None when the bundle serves no such backend."""
    from grc.serving.triton.bundle import ensemble_names

    names = ensemble_names(spec)
    backend = MODES[mode] or spec.bundles.triton.backend
    return names.get(backend)


@dataclass
class Row:
    """One (spec, mode, concurrency) measurement; ``skipped`` or ``failed`` say why a row has no figures."""

    spec: str
    mode: str
    concurrency: int
    model: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    failed: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "mode": self.mode, "concurrency": self.concurrency}
        if self.model:
            out["model"] = self.model
        if self.skipped:
            out["skipped"] = self.skipped
        if self.failed:
            out["failed"] = self.failed
        return out | self.figures


def latency_figures(latencies_ms: list[float], users: int, seconds: float, errors: int, issued: int) -> dict:
    return {
        "users_per_s": round(users / seconds, 1) if seconds else 0.0,
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 3) if latencies_ms else None,
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 3) if latencies_ms else None,
        "errors": errors,
        "requests": issued,
        "seconds": round(seconds, 2),
    }


class AnswerCheck:
    """The ``validate`` hook of a load: every answer's form checked (a bad one raises: the loop counts it as an
    error), the first answers to the sampled pool requests kept for the float64 check after the row."""

    def __init__(self, spec: Spec, pool: list[dict[str, np.ndarray]], sample: int):
        self.spec, self.pool, self.sample = spec, pool, sample
        self.kept: dict[int, dict[str, np.ndarray]] = {}
        self.lock = threading.Lock()

    def __call__(self, index: int, answer: dict[str, np.ndarray]) -> None:
        problems = answer_problems(answer, self.pool[index], self.spec.model, self.spec.bundles.triton.top_k)
        if problems:
            raise ValueError(f"pool request {index}: " + "; ".join(problems))
        if index < self.sample:
            with self.lock:
                self.kept.setdefault(index, answer)

    def grpc(self, index: int, result: Any) -> None:
        self(index, {name: result.as_numpy(name) for name in rq.OUTPUTS})


# --------------------------------------------------------------------------- served modes


@dataclass(frozen=True)
class Clients:
    """How a served row's connections are spread over processes (the first is the bench's own), and what an
    extra process needs to rebuild the same pool."""

    processes: int
    spec_file: Path
    pool: int
    seed: int
    start_timeout_s: float = 90.0  # an extra process's start-up (imports, pool) before the row's load begins

    def shares(self, concurrency: int) -> list[int]:
        n = max(1, min(self.processes, concurrency))
        return [concurrency // n + (i < concurrency % n) for i in range(n)]


def run_served(
    row: Row, server: Any, pool: list, sampler: Sampler, seconds: float, max_requests: int, clients: Clients
) -> None:
    """Warm the model up at this concurrency, then load it for ``seconds`` from ``clients.shares`` connections
    per process; fills ``row.figures`` (the sampled answers come from the bench's own process)."""
    import subprocess
    import sys
    import tempfile

    from grc.serving.triton import load

    assert row.model is not None
    warm = load.run_load(
        server.grpc_url,
        None,
        row.model,
        pool,
        requests=4 * row.concurrency,
        concurrency=row.concurrency,
        time_limit_s=min(30.0, seconds),
    )
    if warm.completed == 0:
        row.failed = f"no answer in warm-up: {warm.first_error}"
        return
    shares = clients.shares(row.concurrency)
    cap = max(1, max_requests // len(shares))
    with tempfile.TemporaryDirectory(prefix="grc-serve-clients-") as tmp:
        extra = [
            subprocess.Popen([
                sys.executable, str(Path(__file__).with_name("serve_client.py")), "--grpc-url", server.grpc_url,
                "--model", row.model, "--spec", str(clients.spec_file), "--out", f"{tmp}/{i}.json",
                "--pool", str(clients.pool), "--seed", str(clients.seed), "--concurrency", str(share),
                "--max-requests", str(cap), "--seconds", str(seconds), "--go", f"{tmp}/go",
            ])
            for i, share in enumerate(shares[1:])
        ]  # fmt: skip
        checker = AnswerCheck(sampler.spec, pool, sampler.size)
        try:
            wait_ready(extra, [Path(tmp, f"{i}.json.ready") for i in range(len(extra))], clients.start_timeout_s)
            Path(tmp, "go").touch()
            result = load.run_load(
                server.grpc_url,
                server.metrics_url,
                row.model,
                pool,
                requests=cap,
                concurrency=shares[0],
                time_limit_s=seconds,
                validate=checker.grpc,
            )
            latencies, errors = list(result.latencies_ms), result.errors
            spans, first = [result.seconds], [result.first_error]
            for i, proc in enumerate(extra):
                code = proc.wait(seconds + 120)
                out = Path(tmp, f"{i}.json")
                if code != 0 or not out.is_file():
                    raise RuntimeError(f"client process {i + 2} of {len(shares)} ended with exit {code}, no result")
                got = json.loads(out.read_text())
                latencies += got["latencies_ms"]
                errors += got["errors"]
                spans.append(got["seconds"])
                first.append(got["first_error"])
        finally:  # a row that broke leaves no client behind
            for proc in extra:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    timing = result.timing.get(row.model, {})
    grc_metrics = {k: v for k, v in result.metrics.get(row.model, {}).items() if k.startswith("grc_")}
    row.figures = latency_figures(latencies, len(latencies), max(spans), errors, len(latencies) + errors)
    row.figures |= {
        "client_processes": len(shares),
        "mean_batch": timing.get("mean_batch"),
        "server_ms": {k: v for k, v in timing.items() if k.endswith("_ms")},
        "grc_metrics": grc_metrics,
        **phase_split(grc_metrics, timing),
        "first_error": next((e for e in first if e), None),
        "checked": sampler.check(checker.kept),
    }


def phase_split(grc_metrics: dict[str, float], timing: dict[str, Any]) -> dict[str, Any]:
    """A fused model's grc_phase_* counters as milliseconds per execute() (the executes they cover: they are
    sent together, every PHASE_EVERY_S), and ``backend_ms_per_batch``: Triton's compute_infer per execute minus
    their sum, what the python backend spends around execute() (requests in, responses out). Empty for a model
    without them."""
    executes = grc_metrics.get("grc_phase_executes_total")
    if not executes:
        return {}
    phases = {
        k.removeprefix("grc_phase_").removesuffix("_seconds_total"): v
        for k, v in grc_metrics.items()
        if k.startswith("grc_phase_") and k.endswith("_seconds_total")
    }
    per_batch = {k: round(v * 1000 / executes, 3) for k, v in phases.items()}
    out: dict[str, Any] = {"phase_ms_per_batch": per_batch}
    if timing.get("compute_infer_ms"):  # Triton gives each request of a batch the batch's compute_infer
        out["backend_ms_per_batch"] = round(timing["compute_infer_ms"] - sum(per_batch.values()), 3)
    return out


def wait_ready(procs: list[Any], flags: list[Path], timeout_s: float) -> None:
    """Until every extra client process has flagged ready; one that ended or is late fails the row."""
    deadline = time.monotonic() + timeout_s
    while not all(f.exists() for f in flags):
        ended = [i for i, p in enumerate(procs) if p.poll() is not None]
        if ended or time.monotonic() > deadline:  # run_served's cleanup ends the others
            why = f"ended with exit {procs[ended[0]].returncode}" if ended else f"not ready in {timeout_s:.0f} s"
            raise RuntimeError(f"client process {(ended or [0])[0] + 2} of {len(procs) + 1}: {why}")
        time.sleep(0.01)


def start_server(repository: Path, models: list[str], timeout_s: float) -> tuple[Any, dict[str, str]]:
    """A tritonserver serving ``models`` (explicit model control: only what is measured is loaded). A model that
    fails to load is left out and the server started again with the others: (server or None, model -> reason)."""
    from grc.serving.triton.server import ModelLoadError, TritonServer, TritonServerError, ensure_tritonserver

    failed: dict[str, str] = {}
    while models:
        args = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
        server = TritonServer(repository, install=ensure_tritonserver(), startup_timeout_s=timeout_s, extra_args=args)
        try:
            return server.start(), failed
        except ModelLoadError as exc:
            named = {key.rsplit(" version ", 1)[0]: reason for key, reason in exc.failures.items()}
            if not set(named) & set(models):
                failed |= dict.fromkeys(models, str(exc))
                break
            failed |= {m: f"failed to load: {named[m]}" for m in models if m in named}
            models = [m for m in models if m not in named]
        except TritonServerError as exc:
            failed |= dict.fromkeys(models, f"tritonserver did not start: {exc}")
            break
    return None, failed


# --------------------------------------------------------------------------- in process


def ranker_class() -> Any:
    from grc.serving.ranker.ranker import Ranker  # gpuserve's; ImportError where it has not landed

    return Ranker


class InProcess:
    """The grc model's Ranker (grc.serving.ranker) loaded in this process, as the python backend loads it."""

    def __init__(self, model_dir: Path):
        from grc.serving.triton.model_config import load_config

        Ranker = ranker_class()

        config = load_config(model_dir.parent)
        params = {key: value.string_value for key, value in config.parameters.items()}
        # the device the model's instances use: its config's instance_group kind
        on_gpu = any(group.kind == group.KIND_GPU for group in config.instance_group)
        self.device = "cuda" if on_gpu else "cpu"
        threads = int(params.get("intra_op_threads", "1"))
        if threads > 0 and not on_gpu:  # as the served CPU instance runs (models/fused.py): same torch threads
            import torch

            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.ranker = Ranker.from_model_dir(model_dir, self.device, params, log=lambda line: print(f"  {line}"))
        self.load_s = time.perf_counter() - started

    def stats(self) -> dict[str, Any]:
        return dict(self.ranker.stats())


def as_numpy(answer: Any) -> dict[str, np.ndarray]:
    """A Ranker answer (numpy or torch tensors per output name) as numpy."""
    return {name: np.asarray(value.cpu() if hasattr(value, "cpu") else value) for name, value in answer.items()}


def run_in_process(
    row: Row, ranker: InProcess, pool: list, sampler: Sampler, seconds: float, max_requests: int
) -> None:
    """Batches of ``concurrency`` pool requests, back to back on one thread (the loop the servers' load uses):
    check (parse) then rank, timed apart; every answer checked for form, the sampled ones against float64."""
    users = row.concurrency
    checker = AnswerCheck(sampler.spec, pool, sampler.size)
    spent = {"check_ms": 0.0, "rank_ms": 0.0}

    class Direct:
        def send(self, index: int) -> Any:
            picked = [(index * users + j) % len(pool) for j in range(users)]
            t0 = time.perf_counter()
            checked = [ranker.ranker.check(pool[i]) for i in picked]
            t1 = time.perf_counter()
            answers = [as_numpy(a) for a in ranker.ranker.rank(checked)]
            spent["check_ms"] += (t1 - t0) * 1000
            spent["rank_ms"] += (time.perf_counter() - t1) * 1000
            for i, answer in zip(picked, answers, strict=True):
                checker(i, answer)
            return None

        def close(self) -> None:
            pass

    closed_loop(Direct, 4, 1, min(30.0, seconds))  # warm-up, not measured
    spent.update(check_ms=0.0, rank_ms=0.0)
    checker.kept.clear()
    before, phases_before = ranker.stats(), dict(ranker.ranker.clock.seconds)
    loop = closed_loop(Direct, max(1, max_requests // users), 1, seconds)
    batches = len(loop.latencies_ms)
    row.figures = latency_figures(
        loop.latencies_ms, batches * users, loop.seconds, len(loop.errors) * users, loop.issued * users
    )
    after = ranker.stats()
    row.figures |= {
        "mean_batch": float(users),
        "latency_is": "per batch of `concurrency` requests",
        "ranker_ms_per_batch": {k: round(v / batches, 3) for k, v in spent.items()} if batches else {},
        # the Ranker's own phases (grc/serving/ranker/phases.py), named as the served model's grc_phase_* metrics
        "phase_ms_per_batch": {
            k: round((v - phases_before[k]) * 1000 / batches, 3)
            for k, v in ranker.ranker.clock.seconds.items()
            if v > phases_before[k]
        }
        if batches
        else {},
        "ranker_stats": {
            k: (v - before[k] if isinstance(v, int | float) and k in before else v) for k, v in after.items()
        },
        "first_error": loop.errors[0] if loop.errors else None,
        "checked": sampler.check(checker.kept),
    }
    if ranker.device == "cuda":
        try:
            row.figures["profile"] = profile_batches(Direct(), 3)
        except Exception as exc:  # the figures above stand; the profile says why it is missing
            row.figures["profile"] = {"failed": f"{type(exc).__name__}: {exc}"}


def profile_batches(connection: Any, batches: int) -> dict[str, Any]:
    """Where one batch's time goes on the GPU, read from outside the Ranker (torch.profiler over a few batches):
    wall time, GPU kernel time, host<->device copies, and the heaviest kernels and host ops, per batch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for index in range(batches):
            connection.send(index)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1000 / batches
    kernels: dict[str, float] = {}
    copies = {"HtoD": 0.0, "DtoH": 0.0, "DtoD": 0.0}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.time_range.elapsed_us() / 1000 / batches
        kind = next((k for k in copies if k in event.name), None)
        if kind:
            copies[kind] += ms
        else:
            kernels[event.name[:80]] = kernels.get(event.name[:80], 0.0) + ms
    host = sorted(((e.key, e.self_cpu_time_total / 1000 / batches) for e in prof.key_averages()), key=lambda x: -x[1])
    top = sorted(kernels.items(), key=lambda x: -x[1])
    return {
        "batches": batches,
        "wall_ms": round(wall_ms, 3),
        "gpu_kernels_ms": round(sum(kernels.values()), 3),
        "copies_ms": {k: round(v, 3) for k, v in copies.items()},
        "top_kernels_ms": {name: round(ms, 3) for name, ms in top[:8]},
        "top_host_ops_ms": {name[:80]: round(ms, 3) for name, ms in host[:8]},
    }
