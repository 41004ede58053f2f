"""What the vLLM model runs per step: the real ``grc.serving.vllm.model.GrcRankingModel`` (in the vLLM venv, from
vLLM's own config of the bundle) scores a step of flattened prompts like the PyTorch reference, the same whatever
else the step holds, and refuses a bad prompt in the step without failing the others."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from grc.deploy import vllm as dv
from grc.serving.vllm import env as vllm_env
from tests.vllm.conftest import require_vllm_venv

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("vllm")]
TOLERANCE = 1e-5  # float32 in the vLLM model vs float64 PyTorch (the specs' verify.export)
SCRIPT = Path(__file__).with_name("model_step.py")


def _run_steps(venv: vllm_env.VllmEnv, bundle: Path, steps: list[list[list[int]]], tmp: Path) -> list[list[dict]]:
    vllm_env.install_plugin(venv, bundle / "plugin", log=lambda _: None)
    (tmp / "steps.json").write_text(json.dumps(steps))
    done = subprocess.run(
        [str(venv.python), str(SCRIPT), str(bundle / "model"), str(tmp / "steps.json"), str(tmp / "out.json")],
        capture_output=True,
        text=True,
        env=vllm_env.grc_environ(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: list[list[dict]] = json.loads((tmp / "out.json").read_text())
    return result


def test_the_vllm_model_scores_a_step_like_pytorch_whatever_the_step_holds(
    built_mtgr_tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    venv = require_vllm_venv()
    bundle = built_mtgr_tiny[1] / "mtgr-tiny" / "bundles" / "vllm"
    prompts = dv.random_prompts(bundle, 8, seed=2)
    bad = prompts[5][:-1]  # one id short: decode refuses it
    steps = [prompts, [prompts[0]], [prompts[3]], [prompts[7]], prompts[::-1], [prompts[1], bad, prompts[2]]]
    together, alone0, alone3, alone7, reversed_, with_bad = _run_steps(venv, bundle, steps, tmp_path)
    expected = dv.Reference(bundle).scores(prompts)
    for got, want in zip(together, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got["scores"]), want, rtol=0, atol=TOLERANCE)
    for i, alone in ((0, alone0), (3, alone3), (7, alone7)):
        np.testing.assert_allclose(np.asarray(alone[0]["scores"]), np.asarray(together[i]["scores"]), atol=TOLERANCE)
    for a, b in zip(together, reversed_[::-1], strict=True):
        np.testing.assert_allclose(np.asarray(a["scores"]), np.asarray(b["scores"]), atol=TOLERANCE)
    assert with_bad[1].keys() == {"code", "position"} and with_bad[1]["code"] > 0, with_bad[1]
    for got, i in ((with_bad[0], 1), (with_bad[2], 2)):  # its neighbours in the step are scored all the same
        np.testing.assert_allclose(np.asarray(got["scores"]), expected[i], rtol=0, atol=TOLERANCE)
