"""The Gluon sm90 attention kernel (kernels/hstu_hopper.py).

On this CPU host: it compiles for sm_90a through Triton's own ptxas into the pipeline it was written
for (TMA loads, asynchronous wgmma with one group left in flight, no serialised wgmma), and its
launcher refuses what it cannot run, naming the setting. On an sm90 GPU: exact against the float64
reference on fresh inputs, NaN-poisoned outputs (jagged users, candidates, cached suffixes, key
splits, the int64 time path, every listed config). Gluon has no interpreter: without a GPU those
cases skip, saying so.
"""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
import torch

from kernels import hstu_hopper, ops, reference
from kernels.hstu_attention import hstu_attention_cached_triton
from kernels.hstu_hopper import HOPPER_CONFIGS, KERNEL_ENV, check_hopper, hstu_attention_hopper
from tests.kernels.arena import arena
from tests.kernels.test_hopper_compile import compile_kernel, ptxas_report

pytestmark = pytest.mark.skipif(bool(hstu_hopper.GLUON_ERROR), reason=hstu_hopper.GLUON_ERROR or "")


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "q_offsets": "*i64", "kv_offsets": "*i64",
        "ts": "*i64", "ncand": "*i64", "time_tab": "*fp32", "pos_tab": "*fp32", "far_tab": "*fp32"}  # fmt: skip


def compile_hopper(config: tuple[int, ...], head_dim: int, positions: int = 512, causal: bool = True,
                   maxnreg: int | None = None, kv_stride: int = 1, ts_scan: int = 256) -> Any:  # fmt: skip
    """The Gluon kernel compiled for sm_90a as a launch would specialise it (also bench/kernel_sass.py's)."""
    from triton.runtime.jit import mangle_type

    block_m, block_n, warps, k_stages, v_stages, q_regs, *cap = config
    maxnreg = maxnreg or (cap[0] if cap else None)
    tokens = torch.empty(64, 2, head_dim, dtype=torch.bfloat16)
    descs = {name: mangle_type(hstu_hopper.descriptor(tokens, rows))
             for name, rows in (("q_desc", block_m), ("k_desc", block_n), ("v_desc", block_n))}  # fmt: skip
    const = {"CAUSAL": causal, "FAST_SILU": True, "ALLOW_TS_FAST": True, "P": positions, "D": head_dim,
             "BLOCK_M": block_m, "BLOCK_N": block_n, "KS": k_stages, "VS": v_stages, "Q_REGS": bool(q_regs),
             "PARTIAL": False, "KV_STRIDE": kv_stride, "TS_SCAN": ts_scan, "num_warps": warps}  # fmt: skip
    options: dict[str, Any] = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return compile_kernel(hstu_hopper._hstu_hopper_kernel, PTRS, const, ("alpha", "inv_norm"), "fp32", options,
                          descs)  # fmt: skip


@pytest.mark.parametrize("head_dim, config", [(d, c) for d, configs in sorted(HOPPER_CONFIGS.items()) for c in configs])
def test_compiles_into_the_overlapped_pipeline(head_dim: int, config: tuple[int, ...]) -> None:
    """Every listed config (the explore bench times them all): TMA tile loads, wgmma issued asynchronously and waited
    with one group still running (S(j+1) and PV(j) in flight while block j's scores are computed), the GPU variant's
    PTX, within Hopper's shared memory, and ptxas keeping the wgmmas asynchronous (no C7515)."""
    compiled = compile_hopper(config, head_dim)
    ptx = compiled.asm["ptx"]
    assert ".target sm_90a" in ptx
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.try_wait" in ptx
    assert "wgmma.mma_async" in ptx and re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)
    assert "tanh.approx.f32" in ptx and "cvt.rz.f32.s32" in ptx and "shfl.sync.idx.b32" in ptx
    assert compiled.metadata.shared <= 227 * 1024
    assert "C7515" not in ptxas_report(ptx)


def test_compiles_for_key_ranges() -> None:
    """Keys as ranges of an arena (KV_STRIDE 2: kv_offsets [B, 2]) compile into the same pipeline on any host (the
    interpreter cannot run Gluon; test_key_ranges_on_the_gpu runs the variant on an sm90 GPU)."""
    ptx = compile_hopper(HOPPER_CONFIGS[256][0], 256, kv_stride=2).asm["ptx"]
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)
    assert "C7515" not in ptxas_report(ptx)


@pytest.mark.parametrize("ts_scan", [1024, 2048])
def test_compiles_with_longer_timestamp_scans(ts_scan: int) -> None:
    """The int32-path check reading ts_scan timestamps a step (bench/kernels_explore.py times it at one user, where a
    program's dependent loads are the call's latency): the same overlapped pipeline, no serialised wgmma."""
    for head_dim, configs in HOPPER_CONFIGS.items():
        ptx = compile_hopper(configs[0], head_dim, ts_scan=ts_scan).asm["ptx"]
        assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx), head_dim
        assert "C7515" not in ptxas_report(ptx), head_dim


@pytest.mark.skipif(not _sm90(), reason="needs a CUDA GPU of compute capability 9.x (sm90: wgmma, TMA)")
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kernel", ["hopper", "triton"])
def test_key_ranges_on_the_gpu(kernel: str, splits: int) -> None:
    """Keys as ranges of an arena (users shuffled, NaN keys and values between them): bit-identical to the contiguous
    launch over the same data (same key parts), within the bf16 bound of the float64 reference."""
    seed = random.getrandbits(31)
    tensors, alpha, norm = _case(*JAGGED, [1, 64, 0, 300, 64, 1], 4, 128, (512, 32), 20_000, seed=seed)
    q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w = tensors
    k_a, v_a, ts_a, ranges = arena(torch.Generator().manual_seed(seed), k, v, ts, kv_off)
    ref = reference.hstu_attention_cached(q.double(), k.double(), v.double(), q_off, kv_off, ts, nc, pos_w.double(),
                                          ts_w.double(), alpha, norm, True)  # fmt: skip
    launch = hstu_attention_hopper if kernel == "hopper" else hstu_attention_cached_triton
    q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w, k_a, v_a, ts_a, ranges = (
        x.cuda() for x in (q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w, k_a, v_a, ts_a, ranges)
    )
    outs = []
    for keys, values, stamps, layout, bound in ((k, v, ts, kv_off, None), (k_a, v_a, ts_a, ranges, 777)):
        out = torch.full((q.shape[0], *q.shape[1:]), float("nan"), dtype=torch.bfloat16, device="cuda")
        outs.append(launch(q, keys, values, q_off, layout, stamps, nc, pos_w, ts_w, alpha, norm, True, out=out,
                           splits=splits, max_user_keys=bound))  # fmt: skip
    assert torch.equal(outs[1], outs[0]), f"seed={seed}"
    err = float((outs[1].double().cpu() - ref).norm() / ref.norm())
    assert err <= 1e-2, f"seed={seed}: rel. error {err}"


def _tokens(n: int, heads: int, d: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(n, heads, d).to(dtype)


def test_refuses_what_it_cannot_run() -> None:
    pos_w, ts_w = torch.randn(2, 63), torch.randn(2, 32)
    q = _tokens(10, 2, 64)
    with pytest.raises(ValueError, match="16-bit"):
        check_hopper(q.float(), q.float(), q.float(), pos_w)
    with pytest.raises(ValueError, match="one head dim"):
        check_hopper(_tokens(10, 2, 32), _tokens(10, 2, 32), _tokens(10, 2, 32), pos_w)
    with pytest.raises(ValueError, match="one head dim"):
        check_hopper(q, q, _tokens(10, 2, 128), pos_w)
    wide = torch.randn(10, 4, 64).to(torch.bfloat16)[:, ::2]  # heads not contiguous within a row
    with pytest.raises(ValueError, match="heads contiguously"):
        check_hopper(wide, q, q, pos_w)
    if not _sm90():
        with pytest.raises(ValueError, match="sm90"):
            check_hopper(q, q, q, pos_w)
        offsets = torch.tensor([0, 10])
        with pytest.raises(ValueError, match="sm90"):
            hstu_attention_hopper(q, q, q, offsets, offsets, torch.arange(10), torch.tensor([2]), pos_w, ts_w,
                                  0.1, 10.0, True)  # fmt: skip


def test_refuses_the_config_that_measured_wrong() -> None:
    q, pos_w, ts_w, offsets = _tokens(10, 2, 128), torch.randn(2, 63), torch.randn(2, 32), torch.tensor([0, 10])
    with pytest.raises(ValueError, match="NaN rows on the H200"):
        hstu_attention_hopper(q, q, q, offsets, offsets, torch.arange(10), torch.tensor([2]), pos_w, ts_w, 0.1, 10.0,
                              True, config=(64, 64, 4, 2, 3, 0))  # fmt: skip


def test_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """GRC_ATTENTION_KERNEL: auto launches this kernel only where it can run and measured faster; triton never;
    hopper always, or an error naming why it cannot (never the other kernel in its place)."""
    q = _tokens(10, 2, 128)
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="expected one of"):
        hstu_hopper.runs(q, q, q)
    monkeypatch.setenv(KERNEL_ENV, "triton")
    assert not hstu_hopper.runs(q, q, q)
    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert not hstu_hopper.runs(q, q, q)  # CPU tensors
    if _sm90():
        dev = q.cuda()
        assert hstu_hopper.runs(dev, dev, dev)
        small = _tokens(10, 2, 64).cuda()
        assert not hstu_hopper.runs(small, small, small)  # d 64: the Triton kernel measured faster
        assert not hstu_hopper.runs(dev.float(), dev.float(), dev.float())
        monkeypatch.setenv(KERNEL_ENV, "hopper")
        assert hstu_hopper.runs(small, small, small)
        with pytest.raises(ValueError, match="16-bit"):
            hstu_hopper.runs(dev.float(), dev.float(), dev.float())
    else:
        monkeypatch.setenv(KERNEL_ENV, "hopper")
        with pytest.raises(ValueError, match="sm90"):
            hstu_hopper.runs(q, q, q)


def test_describe_names_the_kernel_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a server logs at load: the Triton kernel on this host (no sm90 GPU), the Gluon one on sm90 at d 128; with
    GRC_ATTENTION_KERNEL=hopper where it cannot run, the error naming why (at load, not at the first request)."""
    cpu = torch.device("cpu")
    monkeypatch.setenv(KERNEL_ENV, "auto")
    if _sm90():
        assert "Gluon" in hstu_hopper.describe(128, 128, torch.bfloat16, torch.device("cuda"))
        assert "Triton" in hstu_hopper.describe(64, 64, torch.bfloat16, torch.device("cuda"))
    assert "Triton" in hstu_hopper.describe(128, 128, torch.bfloat16, cpu)
    monkeypatch.setenv(KERNEL_ENV, "hopper")
    with pytest.raises(ValueError, match="cannot run"):
        hstu_hopper.describe(128, 128, torch.float32, cpu)


def _case(lengths: list[int], ncands: list[int], queries: list[int] | None, heads: int, d: int,
          tables: tuple[int, int], ts_gap: int, seed: int) -> tuple[list[torch.Tensor], float, float]:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    kv_off = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = (torch.randn(total, heads, d, generator=gen).to(torch.bfloat16) for _ in range(3))
    steps = torch.randint(0, ts_gap, (total,), generator=gen)
    ts = 1_700_000_000 + steps.cumsum(0)
    pos_w = torch.randn(heads, 2 * tables[0] - 1, generator=gen) * 0.3
    ts_w = torch.randn(heads, tables[1], generator=gen) * 0.3
    if queries is None:
        q_off = kv_off
    else:
        keep = torch.cat([torch.arange(int(kv_off[b + 1]) - n, int(kv_off[b + 1])) for b, n in enumerate(queries)])
        q, q_off = q[keep], torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()])
    return [q, k, v, q_off, kv_off, ts, torch.tensor(ncands), pos_w, ts_w], 1.0 / d**0.5, float(max(lengths))


JAGGED = ([1, 300, 0, 777, 64, 65], [1, 0, 0, 100, 64, 3])
# fmt: off
CASES: dict[str, tuple[list[int], list[int], list[int] | None, int, tuple[int, int], int, dict[str, Any]]] = {
    # name: (lengths, candidates, queries (None: full), head dim, tables (P, NB), timestamp step, options)
    "full causal, d 128": (*JAGGED, None, 128, (512, 32), 20_000, {}),
    "cached suffixes, d 128": (*JAGGED, [1, 64, 0, 300, 64, 1], 128, (512, 32), 20_000, {}),
    "cached, keys split in 3": ([900, 1300], [20, 0], [256, 5], 128, (64, 32), 20_000, {"splits": 3}),
    "full non-causal, d 64": ([300, 513, 40], [10, 0, 40], None, 64, (256, 24), 20_000, {"causal": False}),
    "full d 256": ([300, 513, 40], [10, 0, 40], None, 256, (256, 32), 20_000, {}),
    "int64 gaps (spans past 2**29 s)": ([700, 300], [5, 0], None, 128, (64, 64), 1 << 28, {}),
    "int64 path forced, exact SiLU": ([700, 300], [5, 0], None, 128, (64, 32), 20_000,
                                      {"allow_ts_fast": False, "fast_silu": False}),
}
# fmt: on


@pytest.mark.skipif(not _sm90(), reason="needs a CUDA GPU of compute capability 9.x (sm90: wgmma, TMA)")
@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_on_the_gpu(name: str) -> None:
    lengths, ncands, queries, d, tables, gap, options = CASES[name]
    options = dict(options)
    causal = options.pop("causal", True)
    heads = 2 if d == 256 else 4
    tensors, alpha, norm = _case(lengths, ncands, queries, heads, d, tables, gap, seed=random.getrandbits(31))
    q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w = (x.double() if x.is_floating_point() else x for x in tensors)
    ref = reference.hstu_attention_cached(q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w, alpha, norm, causal)
    # every listed config where it matters most (mtgr-base's full attention, the other head dims)
    configs = HOPPER_CONFIGS[d] if name.startswith("full causal") or d != 128 else HOPPER_CONFIGS[d][:1]
    q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w = (x.cuda() for x in tensors)
    for config in configs:
        out = torch.full((q.shape[0], heads, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        got = hstu_attention_hopper(q, k, v, q_off, kv_off, ts, nc, pos_w, ts_w, alpha, norm, causal, out=out,
                                    config=config, **options)  # fmt: skip
        err = float((got.double().cpu() - ref).norm() / ref.norm())
        assert err < 1e-2, (name, config, err)  # bf16 inputs and SiLU weights: the Triton kernel's bound


@pytest.mark.skipif(not _sm90(), reason="needs a CUDA GPU of compute capability 9.x (sm90: wgmma, TMA)")
def test_ops_launch_it_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels.ops' eager path on mtgr-base's head dim runs this kernel (auto) and matches the Triton kernel's
    result (triton) and the float64 reference."""
    tensors, alpha, norm = _case(*JAGGED, None, 4, 128, (512, 32), 20_000, seed=random.getrandbits(31))
    q, k, v, offsets, _, ts, nc, pos_w, ts_w = (x.cuda() for x in tensors)
    outs = {}
    for choice in ("auto", "triton"):
        monkeypatch.setenv(KERNEL_ENV, choice)
        assert hstu_hopper.runs(q, k, v) == (choice == "auto")
        outs[choice] = ops.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, alpha, norm, True).double()
    ref = reference.hstu_attention(q.double(), k.double(), v.double(), offsets, ts, nc, pos_w.double(),
                                   ts_w.double(), alpha, norm, True).cpu()  # fmt: skip
    for choice, out in outs.items():
        assert float((out.cpu() - ref).norm() / ref.norm()) < 1e-2, choice


@pytest.mark.skipif(not _sm90(), reason="needs a CUDA GPU of compute capability 9.x (sm90: wgmma, TMA)")
def test_the_gate_op_adds_the_key_parts_in_the_norm_gate_on_the_gpu() -> None:
    """grc::hstu_attention_gate_hopper_vqk (grc.model.hstu.ATTENTION_GATE) at mtgr-small's latency shape (one user,
    2 heads of d 256, the keys cut into parts): bit for bit the Gluon kernel's finished output then the norm-gate
    kernel, and the eager public call; within the bf16 bound of the float64 reference."""
    from kernels.hstu_attention import key_splits
    from kernels.norm_gate import norm_gate_triton

    seed = random.getrandbits(31)
    (q, k, v, offsets, _, ts, nc, pos_w, ts_w), alpha, norm = _case([1515], [24], None, 2, 256, (256, 32), 20_000,
                                                                    seed)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    vqk = torch.cat([v.flatten(1), q.flatten(1), k.flatten(1)], dim=1).cuda()  # columns v, q, k: vqk_views' cut
    u = (torch.randn(1515, 512, generator=gen) * 2).to(torch.bfloat16).cuda()
    w, b = torch.randn(512, generator=gen).cuda(), torch.randn(512, generator=gen).cuda()
    rest = [x.cuda() for x in (offsets, ts, nc, pos_w, ts_w)]
    q, k, v = ops.vqk_views(vqk, 2, 256, 256)
    assert key_splits(q, k.shape[0]) > 1, "the shape no longer splits its keys: pick one that does"
    got = torch.ops.grc.hstu_attention_gate_hopper_vqk(vqk, u, w, b, 1e-5, 2, 256, 256, *rest, alpha, norm, True)
    offsets, ts, nc, pos_w, ts_w = rest
    attn = hstu_attention_hopper(q, k, v, offsets, offsets, ts, nc, pos_w, ts_w, alpha, norm, True)
    want = norm_gate_triton(attn.reshape(1515, 512), u, w, b, 1e-5, silu_u=True)
    assert torch.equal(got, want), f"seed={seed}"
    with torch.no_grad():  # the public call, eager on plain tensors: the same kernels without the op's dispatch
        eager = ops.hstu_attention_gate_vqk(vqk, u, w, b, 1e-5, 2, 256, 256, offsets, ts, nc, pos_w, ts_w, alpha, norm,
                                            True)  # fmt: skip
    assert torch.equal(eager, got), f"seed={seed}"
    ref_attn = reference.hstu_attention(
        q.double().cpu(),
        k.double().cpu(),
        v.double().cpu(),
        offsets.cpu(),
        ts.cpu(),
        nc.cpu(),
        pos_w.double().cpu(),
        ts_w.double().cpu(),
        alpha,
        norm,
        True,
    )
    ref = reference.norm_gate(ref_attn.reshape(1515, 512), torch.nn.functional.silu(u.double().cpu()),
                              w.double().cpu(), b.double().cpu(), 1e-5)  # fmt: skip
    err = float((got.double().cpu() - ref).norm() / ref.norm())
    assert err <= 2e-2, f"seed={seed}: rel. error {err}"
