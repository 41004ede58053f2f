"""The fused request path in-process on CPU (grc.serving.ranker): the bucket plan and padding, the
tables on a device, and Ranker against the PyTorch float64 reference, per backend.

Reference ops run here, in float64; grc's Triton kernels run in a subprocess under the Triton
interpreter (fused_interp_worker.py: TRITON_INTERPRET must be set before triton decorates them), in
float32 (the kernels take float32 / 16-bit inputs). Each run draws a fresh seed, printed on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from grc.serving.ranker import buckets as bk
from tests.conftest import TEST_SPECS, run_build, write_spec
from tests.serving import fused_checks as fc

WORKER = Path(__file__).with_name("fused_interp_worker.py")
PAD_TOL = fc.PAD_TOL


def run_worker(job: str, *args: str) -> tuple[Any, int]:
    seed = secrets.randbits(31)
    path = os.pathsep.join(filter(None, [str(fc.REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(WORKER), job, str(seed), *args],
        cwd=fc.REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path},
    )
    assert proc.returncode == 0, f"worker {job} seed={seed} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), seed


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """mtgr-tiny weights: float tables (bf16 by the spec's default), int8 and fp8 tables."""
    out = {}
    for kind in ("float", "int8", "fp8_e4m3"):
        folder = tmp_path_factory.mktemp(f"w-{kind}")
        over = {} if kind == "float" else {"weights.init": {"seed": 3, "embedding_dtype": kind}}
        spec = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml", over)
        run_build(spec, only=["weights"])
        out[kind] = (spec, folder / "artifacts" / "mtgr-tiny" / "weights")
    return out


# --------------------------------------------------------------------------- the bucket plan


def test_default_plan_holds_every_batch_the_server_takes() -> None:
    gen = torch.Generator().manual_seed(secrets.randbits(31))
    for max_users, seq in ((1, 64), (8, 96), (32, 2048), (5, 7)):
        plan = bk.default_plan(max_users, seq)
        assert plan == sorted(plan) and plan[-1].tokens == max_users * seq
        assert all(b.users <= bk.most_users(max_users, b.tokens, seq) for b in plan)
        for _ in range(200):
            users = int(torch.randint(1, max_users + 1, (1,), generator=gen))
            tokens = int(torch.randint(2 * users, users * seq + 1, (1,), generator=gen)) if seq > 1 else users
            bucket = bk.choose(plan, users, tokens, seq)
            assert bucket is not None, (max_users, seq, users, tokens)
            assert bucket.tokens >= tokens and bucket.users >= users + bk.pad_users(bucket, tokens, seq)
            smaller = [b for b in plan if b < bucket]
            assert all(bk.choose(smaller, users, tokens, seq) is None for _ in [0])  # it is the smallest that fits


def test_pad_layout_pad_users_are_all_candidates_and_the_rest_empty() -> None:
    tokens = torch.randn(10, 4)
    offsets, cands, stamps = torch.tensor([0, 6, 10]), torch.tensor([2, 1]), torch.arange(10)
    bucket = bk.Bucket(tokens=10 + 7 + 7 + 3, users=6)
    t, o, c, s = bk.pad(bucket, 7, tokens, offsets, cands, stamps)
    assert t.shape == (27, 4) and torch.equal(t[:10], tokens) and not t[10:].any()
    assert o.tolist() == [0, 6, 10, 17, 24, 27, 27] and torch.equal(s[:10], stamps) and not s[10:].any()
    lengths = (o[1:] - o[:-1]).tolist()
    assert c.tolist() == [2, 1, *lengths[2:]]  # pad users: every token a candidate; the empty user: 0 and 0
    with pytest.raises(ValueError, match="cannot hold"):
        bk.pad(bk.Bucket(tokens=30, users=3), 7, tokens, offsets, cands, stamps)
    assert bk.choose([bk.Bucket(tokens=30, users=3)], 2, 10, 7) is None  # 20 padding tokens need 3 pad users


def test_host_padding_is_what_the_device_padding_makes() -> None:
    """buckets.padded_ints (the layout's host-side padding, read by a bucket's graph as uploaded) equals bk.pad's
    offsets, num_candidates and timestamps back to back, for random batches in every bucket that holds them (pad
    users of max_seq_len, a partial one, empty slots)."""
    import numpy as np

    gen = torch.Generator().manual_seed(secrets.randbits(31))
    for max_users, seq in ((8, 96), (4, 7), (32, 2048)):
        plan = bk.default_plan(max_users, seq)
        for _ in range(50):
            users = int(torch.randint(1, max_users + 1, (1,), generator=gen))
            lengths = torch.randint(1, seq + 1, (users,), generator=gen)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            cands = (torch.rand(users, generator=gen) * lengths).long()
            total = int(offsets[-1])
            stamps = torch.randint(-(2**40), 2**40, (total,), generator=gen)
            for bucket in [b for b in plan if b.tokens >= total and b.users >= users + bk.pad_users(b, total, seq)]:
                _, o, c, t = bk.pad(bucket, seq, torch.zeros(total, 1), offsets, cands, stamps)
                host = bk.padded_ints(bucket, seq, offsets.numpy(), cands.numpy(), stamps.numpy())
                assert host.dtype == np.int64 and host.shape == (bk.ints_length(bucket),)
                spans = bk.ints_spans(bucket)
                for (start, n), made in zip(spans, (o, c, t), strict=True):
                    assert start % 2 == 0 and np.array_equal(host[start : start + n], made.numpy()), (bucket, users)
                ends = [s + n for s, n in spans]
                assert ends[0] <= spans[1][0] and ends[1] <= spans[2][0] and ends[2] == host.size


def test_padding_changes_no_score_reference_ops_float64() -> None:
    seed = secrets.randbits(31)
    fc.assert_padding_exact(fc.padding_errors("pytorch", torch.float64, seed), PAD_TOL["float64"], seed)


def test_padding_changes_no_score_triton_kernels_interpreted() -> None:
    result, seed = run_worker("padding")
    fc.assert_padding_exact(result, PAD_TOL["float32"], seed)


# --------------------------------------------------------------------------- tables on a device


def test_gather_kernel_is_bit_exact_for_every_table_dtype() -> None:
    result, seed = run_worker("gather")
    assert all(result.values()), f"seed={seed}: {result}"


def test_gather_concat_kernel_is_bit_exact() -> None:
    """A kind's lookups in one kernel (DeviceTables.lookup_concat): the same bits as torch.cat of the gathers, cast."""
    result, seed = run_worker("gather_concat")
    assert result and all(result.values()), f"seed={seed}: {[k for k, v in result.items() if not v]}"


@pytest.mark.parametrize("kind", ["float", "int8", "fp8_e4m3"])
def test_device_tables_equal_the_memory_mapped_lookups(weights: dict[str, tuple[Path, Path]], kind: str) -> None:
    from grc.spec.loader import load_spec

    spec, wdir = weights[kind]
    cfg = load_spec(spec).spec.model
    result = fc.table_matches(wdir, cfg, "device", secrets.randbits(31))
    assert result and all(result.values()), result
    pinned, seed = run_worker("pinned_tables", str(spec), str(wdir))
    assert pinned == result, f"seed={seed}: pinned_host gather {pinned}"


def test_auto_placement_follows_the_budget(weights: dict[str, tuple[Path, Path]]) -> None:
    from grc.serving.ranker.tables import choose_placement, table_bytes

    _, wdir = weights["float"]
    size = table_bytes(wdir)
    assert 0 < size < 1 << 20  # mtgr-tiny: well under a MiB
    said: list[str] = []
    assert choose_placement("auto", wdir, 1, said.append) == "device" and "device" in said[-1]
    assert choose_placement("pinned_host", wdir, 1, said.append) == "pinned_host"
    with pytest.raises(ValueError, match=r"gpu\.tables: expected one of auto, device, pinned_host"):
        choose_placement("gpu", wdir, 1, said.append)


# --------------------------------------------------------------------------- Ranker


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_ranker_pytorch_matches_the_float64_reference(
    weights: dict[str, tuple[Path, Path]], kind: str, tmp_path: Path
) -> None:
    spec, wdir = weights[kind]
    seed = secrets.randbits(31)
    fc.assert_ranker(fc.ranker_errors(spec, wdir, "pytorch", seed, tmp_path / "m"), 1e-4, seed)


def test_ranker_pytorch_kernels_interpreted_matches_the_float64_reference(
    weights: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    spec, wdir = weights["float"]
    result, seed = run_worker("ranker", str(spec), str(wdir), str(tmp_path / "m"))
    fc.assert_ranker(result, 1e-4, seed)


def test_ranker_pads_a_graphed_batch_on_the_host(weights: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """With its dense step bucketed (as on a GPU with CUDA graphs: Bucketed, here without graphs), the Ranker lays
    each batch out padded to its bucket on the host (layout.bucket, one "padded" field read where it is uploaded):
    the same scores as the unbucketed Ranker, batch after batch in the shared buffers (stale rows from a larger batch
    under a smaller one), the padding counted, no miss; a batch no bucket holds runs unpadded."""
    from grc.serving.ranker import dense as dn
    from grc.serving.ranker.ranker import Ranker
    from grc.serving.triton import load
    from grc.spec.loader import load_spec

    spec_path, wdir = weights["float"]
    spec = load_spec(spec_path).spec
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights").symlink_to(wdir)
    ranker = Ranker.from_model_dir(tmp_path / "m", "cpu", fc.fused_params(spec, "pytorch_kernels"), log=lambda m: None)
    pool = load.request_pool(spec.model, 7, seed=secrets.randbits(31))
    batches = [pool[:4], pool[4:5], [pool[5], pool[6]]]  # a larger batch first: its rows stay under the smaller ones
    plain = [ranker.rank([ranker.check(dict(r)) for r in b]) for b in batches]
    cfg, stats = spec.model, dn.GraphStats()
    seq = cfg.hstu.max_seq_len
    plan = bk.default_plan(4, seq)
    bucketed = dn.Bucketed(ranker.dense, plan, seq, cfg.d_model, ranker.dense_dtype, torch.device("cpu"), False,
                           stats)  # fmt: skip
    padded_runs: list[bk.Bucket] = []
    run_padded = bucketed.run_padded

    def counted(bucket: bk.Bucket, padded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        padded_runs.append(bucket)
        return run_padded(bucket, padded, tokens)

    bucketed.run_padded = counted  # type: ignore[method-assign]
    ranker.dense = bucketed
    for batch, expected in zip(batches, plain, strict=True):
        got = ranker.rank([ranker.check(dict(r)) for r in batch])
        for g, e in zip(got, expected, strict=True):
            assert set(g) == set(e)
            torch.testing.assert_close(torch.from_numpy(g["scores"]), torch.from_numpy(e["scores"]), rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
            assert (g["ranked_items"] == e["ranked_items"]).all()
    assert stats.padded_tokens > 0 and stats.graph_misses == 0 and len(padded_runs) == len(batches)
    ranker.dense = dn.Bucketed(bucketed.fn, [bk.Bucket(tokens=8, users=1)], seq, cfg.d_model, ranker.dense_dtype,
                               torch.device("cpu"), False, stats)  # fmt: skip
    got = ranker.rank([ranker.check(dict(pool[0]))])  # no bucket holds it: unpadded, counted as a miss
    torch.testing.assert_close(torch.from_numpy(got[0]["scores"]), torch.from_numpy(plain[0][0]["scores"]))
    assert stats.graph_misses == 1


def test_ranker_refuses_a_bad_request_and_a_cuda_device_without_cuda(
    weights: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    from grc.serving.common.validate import RequestError
    from grc.serving.ranker.ranker import Ranker
    from grc.serving.triton import load
    from grc.spec.loader import load_spec

    spec_path, wdir = weights["float"]
    spec = load_spec(spec_path).spec
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights").symlink_to(wdir)
    ranker = Ranker.from_model_dir(tmp_path / "m", "cpu", fc.fused_params(spec, "pytorch"), log=lambda m: None)
    bad: dict[str, Any] = dict(load.request_pool(spec.model, 1, seed=1)[0])
    bad["candidate_item"] = bad["candidate_item"] + 10**9
    with pytest.raises(RequestError, match=r"candidate_item: unknown id .* the item table has ids 0..1999"):
        ranker.check(bad)
    if not torch.cuda.is_available():
        no_cuda = r"device cuda:0 needs a CUDA GPU \(torch.cuda.is_available\(\) is False"
        with pytest.raises(RuntimeError, match=no_cuda):
            Ranker.from_model_dir(tmp_path / "m", "cuda:0", fc.fused_params(spec, "pytorch"))
