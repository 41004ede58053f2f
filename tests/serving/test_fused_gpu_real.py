"""The fused pipeline on a CUDA GPU (skipped elsewhere; the lead runs these on the device machine,
bench/gpu_run_fused.sh runs the same checks without pytest).

Padding into CUDA-graph buckets changes no real user's score (grc's kernels, float32 and bfloat16,
graphs captured before the batch and replayed twice); the gather kernel reads pinned host memory
bit-exactly; device and pinned_host tables equal the memory-mapped lookups; and mtgr-tiny-gpu
(tests/specs) built, run in-process on cuda:0, deployed with ``grc deploy`` and served by a real
tritonserver on KIND_GPU instances: every score within the served tolerance of PyTorch float64,
graph hits counted (in the Ranker and in the server's metrics), no misses. The history cache's graphed score step
(ScoreGraphs) replays exactly across shapes, the shared key buffer's growth and LRU eviction.
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


def test_gather_concat_reads_device_and_pinned_tables_bit_exactly() -> None:
    seed = secrets.randbits(31)
    result = fc.gather_concat_errors(seed, device="cuda")
    assert result and all(result.values()), f"seed={seed}: {[k for k, v in result.items() if not v]}"


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


# (dtype, spec overrides, bound on the max relative score difference): float32 at mtgr-tiny's head dim 16 (the
# Triton attention kernel), bfloat16 at head dim 128 (on an sm90 GPU the eager ops' Gluon kernel, inside the graphs)
GRAPH_CASES = {
    "float32": (torch.float32, {}, 1e-5),
    "bfloat16-d128": (torch.bfloat16, {"model.hstu.attention_dim": 256, "model.hstu.linear_dim": 256}, 2e-2),
}


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_cached_score_graphs_exact_across_shapes_growth_and_eviction(case: str, tmp_path: Path) -> None:
    """The history cache's graphed score step (ScoreGraphs, CUDA graphs) against GRDense.score run eagerly on the
    same inputs (grc's kernels): steps of 1, 2 and 4 users (hits, a miss), the shared key buffer grown by the 4-user
    step (every kept graph dropped, the small shapes recaptured against the new buffer), and a one-graph LRU beside
    it. Every step's scores within the case's bound (float32 1e-5 relative; bfloat16, where the graphed and the eager
    step batch users differently, 2e-2), every grown entry's stamps the same and its rows within that bound of their
    largest value; the second round of the same steps captures nothing new. (Session 12: a capture path that failed
    every served step on the device had passed the whole CPU suite, which cannot capture graphs.)"""
    from grc.model.kv_cache import UserKV
    from grc.serving.common.score_graphs import ScoreGraphs
    from grc.serving.ranker.dense import GraphStats
    from kernels import hstu_hopper
    from tests.serving.test_score_graphs import score, visits
    from tests.test_model import _model

    dtype, overrides, bound = GRAPH_CASES[case]
    seed = secrets.randbits(31)
    _, model, tables = _model(write_spec(tmp_path, TEST_SPECS / "mtgr-tiny.yaml", overrides), seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = ([(30, 3, 0)], [(12, 5, 12), (20, 2, 4)], [(85, 3, 2), (84, 2, 84), (83, 3, 5), (80, 4, 1)])
    groups = [visits(model, tables, gen, s) for s in shapes]  # float64 on the CPU, then moved
    dev = torch.device("cuda")
    dense = model.dense.to(dev, dtype)
    probe = torch.empty(1, model.cfg.hstu.num_heads, model.cfg.hstu.head_qk, device=dev, dtype=dtype)
    gluon = hstu_hopper.runs(probe, probe, probe)
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability(dev)[0] == 9:
        assert gluon, "on sm90 the bf16 head-dim-128 case is the Gluon kernel's"

    def moved(users):  # type: ignore[no-untyped-def]
        return [
            (UserKV(c.rows.to(dev, dtype), c.timestamps, c.profile, c.layout), t.to(dev, dtype), s.to(dev), n, now)
            for c, t, s, n, now in users
        ]

    groups = [moved(g) for g in groups]
    # warmed: warmed up as a server does at load, and run first in every round (kernel variants are compiled once per
    # process): its captures compile and tune nothing (session 14: a 1-user step's layout fields sat at other
    # alignments than the warm-up's, and the compile of that variant stalled a served step 2.7 s)
    warmed = ScoreGraphs(dense, "triton", GraphStats(), max_users=4)
    warmed.warm_up(torch.empty(0, device=dev, dtype=dtype))
    graphs = ScoreGraphs(dense, "triton", GraphStats(), max_users=4)
    bounded = ScoreGraphs(dense, "triton", GraphStats(), max_users=4, max_graphs=1)
    order = [0, 1, 2, 0, 1]  # the 4-user step grows the shared key rows: 0 and 1 are recaptured after it
    for rnd in range(2):
        captured = graphs.stats.captures
        held = None if graphs.rows is None else graphs.rows.shape[0]
        for g in order:
            expected, expected_kv = score(dense.score, groups[g], "triton")
            for name, step in (("warmed", warmed), ("graphs", graphs), ("bounded", bounded)):
                got, got_kv = score(step.score, groups[g], "triton")
                rel = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
                assert rel < bound, (seed, rnd, g, name, rel, f"Gluon attention kernel: {gluon}")
                for u, (a, b) in enumerate(zip(got_kv, expected_kv, strict=True)):
                    assert a.length == b.length and torch.equal(a.timestamps, b.timestamps), (seed, g)
                    # relative to the rows' largest value, as the scores: a layer's K/V come through the layers
                    # before it, whose bf16 roundings differ between the eager unfused and the graphed fused step
                    # (session 21: elementwise, |diff| reached 0.03-0.04 on values under 0.6 in 3 of 4 runs)
                    rows_rel = float((a.rows.float() - b.rows.float()).abs().max() / b.rows.float().abs().max())
                    assert rows_rel < bound, f"seed {seed} round {rnd} group {g} step {name} user {u}: rows {rows_rel}"
        if rnd == 0:
            assert graphs.rows is not None and graphs.rows.shape[0] > 256, "the 4-user step grew the key rows"
            assert graphs.stats.captures >= len(set(order)) + 2, graphs.stats.captures  # 0 and 1 again after the growth
        else:
            assert graphs.rows is not None and held == graphs.rows.shape[0], "no growth in the second round"
            assert graphs.stats.captures == captured, "nothing captured in the second round"
    assert len(bounded.steps) == 1 and bounded.stats.captures >= 2 * len(order) - 1
    assert len(graphs.capture_log) == graphs.stats.captures and all(c["first_run"] > 0 for c in graphs.capture_log)
    after = [(c["shape"], c["compiles"], c["tunings"]) for c in warmed.capture_log]
    assert warmed.stats.captures >= len(set(order)) and all(n == t == 0 for _, n, t in after), after
