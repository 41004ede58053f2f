"""The history-cached model on a device: K/V in device memory, attention through grc's Triton kernels.

- A KIND_GPU instance on a host whose torch sees no CUDA fails at load, naming why (no silent CPU run).
- The kernel path (impl "triton") scores hits, misses and uncached requests like the PyTorch path: on
  the CPU through Triton's interpreter (a subprocess: TRITON_INTERPRET is read at import).
- On a CUDA GPU (skipped elsewhere, saying so): K/V live in device memory, the budget counts them,
  and hit == miss == the float64 PyTorch model within the dtype's tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grc.serving.triton import history_bundle as hb
from grc.serving.triton.model_config import render_config
from grc.serving.triton.models.history_cached import TritonPythonModel, instance_device
from grc.spec.loader import load_spec
from grc.spec.schema import Spec
from kernels.hstu_attention import tuning_buckets
from tests.conftest import TEST_SPECS, run_build, write_spec

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False on this host"
# float32 kernels run IEEE dots (kernels/hstu_attention.py); bf16: 8 mantissa bits through 2 layers
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Spec, Path]:
    """mtgr-tiny with the cache on, GPU instances: (spec path, spec, weights folder)."""
    folder = tmp_path_factory.mktemp("history_device")
    overrides = {"bundles.triton.history_cache": {"enabled": True}, "bundles.triton.instance_kind": "KIND_GPU"}
    path = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", overrides)
    run_build(path, only=["weights"])
    spec = load_spec(path).spec
    return path, spec, folder / "artifacts" / spec.name / "weights"


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: the refusal is for hosts without it")
def test_a_gpu_instance_without_cuda_fails_at_load_naming_why(weights: tuple[Path, Spec, Path]) -> None:
    _, spec, weights_dir = weights
    config = hb.cached_model_config(spec, weights_dir)
    args = {
        "model_config": json.dumps(
            {"parameters": {k: {"string_value": v.string_value} for k, v in config.parameters.items()}}
        ),
        "model_name": config.name,
        "model_instance_kind": "GPU",
        "model_instance_device_id": "0",
        "model_repository": str(weights_dir.parent),
        "model_version": "1",
    }
    assert "KIND_GPU" in render_config(config)
    with pytest.raises(RuntimeError, match=r"a KIND_GPU instance needs CUDA.*sees no CUDA device"):
        TritonPythonModel().initialize(args)
    assert instance_device(False, 0) == "cpu"


# Triton 3.6's interpreter (the device image's) cannot run the kernel (a loop bound read from a scalar argument:
# "only 0-dimensional arrays can be converted to Python scalars"); on a CUDA host the GPU tests below run the same
# path compiled, and CPU CI runs this one
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA host the GPU tests below run the kernel path compiled")
def test_the_kernel_path_scores_like_the_reference(weights: tuple[Path, Spec, Path]) -> None:
    path, _, weights_dir = weights
    seed = int(torch.randint(0, 1 << 30, ()).item())
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    worker = Path(__file__).with_name("history_kernel_worker.py")
    out = subprocess.run(
        [sys.executable, str(worker), str(path), str(weights_dir), str(seed)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    scores = {k: np.array(v) for k, v in result["scores"].items()}
    assert result["stats"]["triton"] == {"hits": 1, "misses": 1}
    assert np.abs(scores["pytorch_hit"]).max() > 0.01
    assert result["stats"]["padded"]["padded_tokens"] > 0  # the graph layout's pad users were in the step
    # the warm-up tuned every autotuning key the steps can meet, one part and split, before the scores below
    buckets = tuning_buckets(load_spec(path).spec.model.hstu.max_seq_len)
    assert result["stats"]["after_warm_up"] == {"graph_hits": 0, "padded_tokens": 0}  # its step is not counted
    assert result["tuned"] == [[b, split] for b in buckets for split in (False, True)]
    for visit in ("miss", "hit", "uncached"):
        assert relative_error(scores[f"triton_{visit}"], scores[f"pytorch_{visit}"]) < 1e-5, (visit, seed)
        assert relative_error(scores[f"padded_{visit}"], scores[f"pytorch_{visit}"]) < 1e-5, (visit, seed)
    assert relative_error(scores["triton_hit"], scores["triton_uncached"]) < 1e-5, seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gpu_instance_keeps_kv_in_device_memory_and_scores_exactly(
    weights: tuple[Path, Spec, Path], dtype: str
) -> None:
    """bench/history_cache_device.py's served_check (what the device run records), asserted here."""
    from bench.history_cache_device import served_check

    _, spec, weights_dir = weights
    seed = int(torch.randint(0, 1 << 30, ()).item())
    result = served_check(spec.model, weights_dir, dtype, seed)
    assert result["ok"] and result["kv_devices"] == ["cuda:0"] and result["dtype"] == f"torch.{dtype}", (result, seed)
