"""The fused pipeline on a CUDA GPU (skipped elsewhere; the lead runs these on the device machine,
bench/gpu_run_fused.sh runs the same checks without pytest).

Padding into CUDA-graph buckets changes no real user's score (grc's kernels, float32 and bfloat16,
graphs captured before the batch and replayed twice); the gather kernel reads pinned host memory
bit-exactly; device and pinned_host tables equal the memory-mapped lookups; and mtgr-tiny-gpu
(tests/specs) built, run in-process on cuda:0, deployed with ``grc deploy`` and served by a real
tritonserver on KIND_GPU instances: every score within the served tolerance of PyTorch float64,
graph hits counted (in the Ranker and in the server's metrics), no misses.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import torch

from tests.conftest import TEST_SPECS, run_build, write_spec
from tests.serving import fused_checks as fc
from tests.serving import fused_gpu_checks as gc

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_exact_on_cuda_graph_replays(dtype: torch.dtype) -> None:
    seed = secrets.randbits(31)
    result = fc.padding_errors("triton", dtype, seed, device="cuda", graphs=True)
    fc.assert_padding_exact(result, fc.PAD_TOL[str(dtype).removeprefix("torch.")], seed, graphs=True)


def test_gather_reads_pinned_host_memory_bit_exactly() -> None:
    seed = secrets.randbits(31)
    result = fc.gather_errors(seed, device="cuda")
    assert all(result.values()), f"seed={seed}: {result}"


@pytest.mark.parametrize("kind", ["float", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("placement", ["device", "pinned_host"])
def test_tables_on_the_gpu_equal_the_memory_mapped_lookups(tmp_path: Path, kind: str, placement: str) -> None:
    from grc.spec.loader import load_spec

    over = {} if kind == "float" else {"weights.init": {"seed": 3, "embedding_dtype": kind}}
    spec = write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", over)
    run_build(spec, only=["weights"])
    result = fc.table_matches(
        tmp_path / "artifacts" / "mtgr-tiny" / "weights",
        load_spec(spec).spec.model,
        placement,
        secrets.randbits(31),
        device="cuda:0",
    )
    assert result and all(result.values()), result


@pytest.mark.slow
def test_mtgr_tiny_gpu_in_process_deployed_and_served(tmp_path: Path) -> None:
    seed = secrets.randbits(31)
    gc.assert_served(gc.served_on_gpu(tmp_path, seed), seed)
