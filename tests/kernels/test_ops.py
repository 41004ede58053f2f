"""The custom ops and the reference, in-process (no Triton launch: on CPU the ops run the reference)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from kernels import ops, reference


def make_inputs(
    gen: torch.Generator,
    lengths: list[int],
    ncands: list[int],
    heads: int = 2,
    d: int = 8,
    dtype: torch.dtype = torch.float64,
) -> tuple:
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    total = int(offsets[-1])
    q, k, v = (torch.randn(total, heads, d, generator=gen, dtype=dtype) for _ in range(3))
    ts = torch.randint(0, 5000, (total,), generator=gen, dtype=torch.int64)
    pos_w = torch.randn(heads, 7, generator=gen, dtype=dtype)  # P = 4
    ts_w = torch.randn(heads, 9, generator=gen, dtype=dtype)  # NB = 9
    return q, k, v, offsets, ts, torch.tensor(ncands, dtype=torch.int64), pos_w, ts_w


def scalar_oracle(q, k, v, offsets, ts, nc, pos_w, ts_w, alpha, norm, causal):
    """The contract, one score at a time in Python floats: independent of reference.py."""
    num_pos, num_buckets = (pos_w.shape[1] + 1) // 2, ts_w.shape[1]
    out = torch.zeros(v.shape, dtype=torch.float64)
    for b in range(len(offsets) - 1):
        lo, length = int(offsets[b]), int(offsets[b + 1] - offsets[b])
        n_ctx = length - int(nc[b])
        for i in range(length):
            for j in range(length):
                ok = ((j <= i) if causal else (j < n_ctx)) if i < n_ctx else (j < n_ctx or j == i)
                if not ok:
                    continue
                rp = max(-(num_pos - 1), min(num_pos - 1, min(i, n_ctx) - min(j, n_ctx))) + num_pos - 1
                dt = abs(int(ts[lo + i]) - int(ts[lo + j]))
                bucket = min(math.floor(math.log2(1 + dt) + 1e-12), num_buckets - 1) if dt < 2**40 else num_buckets - 1
                for h in range(q.shape[1]):
                    s = alpha * float(q[lo + i, h] @ k[lo + j, h]) + float(pos_w[h, rp]) + float(ts_w[h, bucket])
                    out[lo + i, h] += (s / (1 + math.exp(-s)) / norm) * v[lo + j, h]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_scalar_oracle(causal: bool) -> None:
    gen = torch.Generator().manual_seed(1234 + causal)
    args = (*make_inputs(gen, [1, 6, 0, 5, 4], [1, 2, 0, 0, 4], heads=2, d=4), 0.4, 3.0, causal)
    ref = reference.hstu_attention(*args)
    assert torch.allclose(ref, scalar_oracle(*args), rtol=1e-10, atol=1e-12)


def test_reference_users_are_independent_and_candidates_symmetric() -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, [9, 7], [4, 2])
    base = reference.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.3, 5.0, True)
    q2 = q.clone()
    q2[9:] += 1.0  # touch user 1 only
    k2, v2 = k.clone(), v.clone()
    k2[9:] -= 1.0
    v2[9:] *= 2.0
    again = reference.hstu_attention(q2, k2, v2, offsets, ts, nc, pos_w, ts_w, 0.3, 5.0, True)
    assert torch.equal(again[:9], base[:9])
    perm = torch.arange(16)
    perm[5:9] = torch.tensor([8, 6, 5, 7])  # reorder user 0's four candidates
    shuffled = reference.hstu_attention(q[perm], k[perm], v[perm], offsets, ts[perm], nc, pos_w, ts_w, 0.3, 5.0, True)
    assert torch.allclose(shuffled, base[perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_on_cpu_run_the_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, [3, 8, 1], [1, 3, 0], dtype=torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    args = (q, k, v, offsets, ts, nc, pos_w, ts_w, 0.5, 4.0, True)
    out = kernels.hstu_attention(*args, impl="triton")
    assert out.dtype == dtype and out.shape == v.shape
    assert torch.equal(out, kernels.hstu_attention(*args, impl="pytorch"))
    a, u = torch.randn(12, 16, generator=gen).to(dtype), torch.randn(12, 16, generator=gen).to(dtype)
    w, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    y = kernels.norm_gate(a, u, w, b, 1e-5)
    assert y.dtype == dtype and torch.equal(y, kernels.norm_gate(a, u, w, b, 1e-5, impl="pytorch"))
    want = torch.nn.functional.layer_norm(a.double(), (16,), w.double(), b.double(), 1e-5) * u.double()
    assert float((y.double() - want).norm() / want.norm()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_unknown_impl_is_rejected() -> None:
    with pytest.raises(ValueError, match="impl"):
        kernels.norm_gate(torch.ones(1, 4), torch.ones(1, 4), torch.ones(4), torch.ones(4), 1e-5, impl="cuda")


class _Block(torch.nn.Module):
    def forward(self, q, k, v, offsets, ts, nc, pos_w, ts_w, u, w, b):
        o = torch.ops.grc.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.5, 4.0, True)
        return torch.ops.grc.norm_gate(o.reshape(o.shape[0], -1), u, w, b, 1e-5)


def _block_inputs() -> tuple:
    gen = torch.Generator().manual_seed(5)
    q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, [4, 6], [1, 2], dtype=torch.float32)
    u, w, b = torch.randn(10, 16, generator=gen), torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    return q, k, v, offsets, ts, nc, pos_w.float(), ts_w.float(), u, w, b


def test_export_keeps_the_ops() -> None:
    inputs = _block_inputs()
    program = torch.export.export(_Block(), inputs)
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"grc.hstu_attention.default", "grc.norm_gate.default"} <= targets
    assert torch.allclose(program.module()(*inputs), _Block()(*inputs))


def test_compile_fullgraph() -> None:
    inputs = _block_inputs()
    compiled = torch.compile(_Block(), backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(*inputs), _Block()(*inputs))


def test_fake_impls_give_shapes_and_dtypes() -> None:
    with FakeTensorMode():
        q = torch.empty(7, 3, 16, dtype=torch.bfloat16)
        v = torch.empty(7, 3, 8, dtype=torch.bfloat16)
        ints = torch.empty(2, dtype=torch.int64)
        out = torch.ops.grc.hstu_attention(
            q,
            q,
            v,
            torch.empty(3, dtype=torch.int64),
            torch.empty(7, dtype=torch.int64),
            ints,
            torch.empty(3, 15),
            torch.empty(3, 24),
            0.25,
            256.0,
            False,
        )
        assert out.shape == (7, 3, 8) and out.dtype == torch.bfloat16
        a = torch.empty(7, 48, dtype=torch.float16)
        y = torch.ops.grc.norm_gate(a, a, torch.empty(48), torch.empty(48), 1e-5)
        assert y.shape == (7, 48) and y.dtype == torch.float16


@pytest.mark.parametrize("causal", [True, False])
def test_cached_reference_equals_full_sequence_suffix(causal: bool) -> None:
    """Queries against cached keys == the full sequence's attention, suffix rows kept (the history
    cache's contract), on fresh random users whose query suffix covers none, some and all of the
    history, with and without candidates."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())) + causal)
    lengths, ncands, n_queries = [7, 5, 9, 4, 3], [2, 0, 3, 4, 0], [3, 2, 9, 4, 0]
    q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, lengths, ncands, heads=2, d=4)
    full = reference.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.3, 5.0, causal)
    keep = torch.cat([torch.arange(int(offsets[b + 1]) - n, int(offsets[b + 1])) for b, n in enumerate(n_queries)])
    q_offsets = torch.tensor([0, *torch.tensor(n_queries).cumsum(0).tolist()], dtype=torch.int64)
    for impl in kernels.ops.IMPLS:
        got = kernels.hstu_attention_cached(
            q[keep], k, v, q_offsets, offsets, ts, nc, pos_w, ts_w, 0.3, 5.0, causal, impl=impl
        )
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, full[keep], rtol=1e-12, atol=1e-12)


def test_cached_refuses_more_queries_than_keys() -> None:
    gen = torch.Generator().manual_seed(7)
    _q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, [3], [1])
    q_offsets = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="4 queries but only 3 keys"):
        kernels.hstu_attention_cached(
            torch.randn(4, 2, 8, dtype=torch.float64),
            k,
            v,
            q_offsets,
            offsets,
            ts,
            nc,
            pos_w,
            ts_w,
            0.3,
            5.0,
            True,
            impl="pytorch",
        )


def test_kernel_refuses_what_it_does_not_run() -> None:
    """Settings the Triton kernel does not support raise before any launch, naming the setting
    (on CUDA nothing else would run them: the reference is never substituted)."""
    from kernels.hstu_attention import MAX_POSITION_BUCKETS, hstu_attention_triton

    gen = torch.Generator().manual_seed(11)
    q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, [3, 5], [1, 0], dtype=torch.float32)
    args = (offsets, ts, nc, pos_w, ts_w, 0.3, 5.0, True)
    with pytest.raises(ValueError, match=r"torch\.float64"):
        hstu_attention_triton(q.double(), k.double(), v.double(), *args)
    wide = torch.randn(8, 2, 512, generator=gen)
    with pytest.raises(ValueError, match="head dims up to 256, got qk 512"):
        hstu_attention_triton(wide, wide, v, *args)
    huge_p = torch.empty(2, 2 * (MAX_POSITION_BUCKETS + 1) - 1)
    with pytest.raises(ValueError, match=f"position_buckets up to {MAX_POSITION_BUCKETS}"):
        hstu_attention_triton(q, k, v, offsets, ts, nc, huge_p, ts_w, 0.3, 5.0, True)


def test_cached_op_traces_as_one_node_with_its_shape() -> None:
    gen = torch.Generator().manual_seed(12)
    _q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, [4, 6], [1, 2], dtype=torch.float32)
    q_offsets = torch.tensor([0, 2, 5])
    q = torch.randn(5, 2, 8, generator=gen)

    class Cached(torch.nn.Module):
        def forward(self, q, k, v, q_offsets, kv_offsets, ts, nc, pos_w, ts_w):  # type: ignore[no-untyped-def]
            return torch.ops.grc.hstu_attention_cached(
                q, k, v, q_offsets, kv_offsets, ts, nc, pos_w, ts_w, 0.5, 4.0, True
            )

    inputs = (q, k, v, q_offsets, offsets, ts, nc, pos_w, ts_w)
    program = torch.export.export(Cached(), inputs)
    assert "grc.hstu_attention_cached.default" in {str(n.target) for n in program.graph.nodes}
    want = reference.hstu_attention_cached(*inputs, 0.5, 4.0, True)
    assert torch.equal(program.module()(*inputs), want) and want.shape == (5, 2, 8)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in inputs]
        out = torch.ops.grc.hstu_attention_cached(*fake, 0.5, 4.0, True)
        assert out.shape == (5, 2, 8) and out.dtype == torch.float32


class _OpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_op_dispatch_and_export_still_holds_the_op() -> None:
    """kernels.ops._route: an eager call on plain tensors without autograd runs the kernel (here its
    reference: CPU without the interpreter) without the grc:: op; with autograd it goes through the op;
    an exported program still holds the op; all give the same values."""
    gen = torch.Generator().manual_seed(21)
    q, k, v, offsets, ts, nc, pos_w, ts_w = make_inputs(gen, [3, 5], [1, 2], dtype=torch.float32)
    scalars = (0.5, 4.0, True)
    with _OpsSeen() as mode:
        direct = ops.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, *scalars)
    assert not [op for op in mode.seen if op.startswith("grc.")], mode.seen
    trained = q.clone().requires_grad_(True)
    with _OpsSeen() as mode:
        through_op = ops.hstu_attention(trained, k, v, offsets, ts, nc, pos_w, ts_w, *scalars)
    assert "grc.hstu_attention.default" in mode.seen
    assert torch.equal(direct, through_op.detach())
    # a model's bias tables are parameters: without autograd still the direct call, with it the op
    pos_p, ts_p = torch.nn.Parameter(pos_w), torch.nn.Parameter(ts_w)
    with torch.no_grad(), _OpsSeen() as mode:
        from_params = ops.hstu_attention(q, k, v, offsets, ts, nc, pos_p, ts_p, *scalars)
    assert not [op for op in mode.seen if op.startswith("grc.")], mode.seen
    with _OpsSeen() as mode:
        ops.hstu_attention(q, k, v, offsets, ts, nc, pos_p, ts_p, *scalars)
    assert "grc.hstu_attention.default" in mode.seen
    assert torch.equal(from_params, direct)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, offsets, ts, nc, pos_w, ts_w):  # type: ignore[no-untyped-def]
            return ops.hstu_attention(q, k, v, offsets, ts, nc, pos_w, ts_w, 0.5, 4.0, True)

    inputs = (q, k, v, offsets, ts, nc, pos_w, ts_w)
    program = torch.export.export(Attention(), inputs)
    assert "grc.hstu_attention.default" in {str(n.target) for n in program.graph.nodes}
    assert torch.equal(program.module()(*inputs), direct)


def test_key_ranges_need_their_shape_and_a_bound_on_keys() -> None:
    """Keys as ranges of an arena ([users, 2]): k's rows say nothing about one user's keys, so the launch (which sizes
    its key split and autotuning key on the host) refuses ranges without max_user_keys, and ranges of another shape;
    the float64 reference reads the same ranges (the interpreter tests check the kernel against it)."""
    from kernels.hstu_attention import hstu_attention_cached_triton

    heads, d = 2, 16
    q, k, v = torch.randn(3, heads, d), torch.randn(20, heads, d), torch.randn(20, heads, d)
    q_offsets, ranges = torch.tensor([0, 1, 3]), torch.tensor([[12, 18], [2, 7]])
    ts, nc = torch.arange(20) * 10, torch.tensor([1, 0])
    pos_w, ts_w = torch.randn(heads, 7), torch.randn(heads, 8)
    args = (ts, nc, pos_w, ts_w, 0.3, 7.0, True)
    with pytest.raises(ValueError, match="max_user_keys"):
        hstu_attention_cached_triton(q, k, v, q_offsets, ranges, *args)
    with pytest.raises(ValueError, match=r"\[users, 2\] = \[2, 2\]"):
        hstu_attention_cached_triton(q, k, v, q_offsets, torch.cat([ranges, ranges]), *args, max_user_keys=6)
    got = reference.hstu_attention_cached(q, k, v, q_offsets, ranges, *args)
    compact = torch.tensor([0, 6, 11])
    kc, vc, tsc = (torch.cat([x[12:18], x[2:7]]) for x in (k, v, ts))
    want = reference.hstu_attention_cached(q, kc, vc, q_offsets, compact, tsc, *args[1:])
    assert torch.equal(got, want)
    # the op and the public entry carry the bound to the kernels (here: the reference, off CUDA)
    op = torch.ops.grc.hstu_attention_cached(q, k, v, q_offsets, ranges, *args, max_user_keys=6)
    public = ops.hstu_attention_cached(q, k, v, q_offsets, ranges, *args, max_user_keys=6)
    assert torch.equal(op, want) and torch.equal(public, want)
