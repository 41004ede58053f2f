"""engine.aoti.silu_apart: the unfused layer's SiLU as the grc::silu op (kernels/silu.py), so compiled code keeps
one activated UVQK buffer. On the CPU: the exported program holds one grc::silu per layer beside the attention and
norm-gate ops, the layer computes what it computes without it, and the spec refuses it together with fuse. Its
kernel: tests/kernels/test_interpreter.py::test_silu_kernel; its speed: the device (bench/e2e.py)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from grc.aoti.model import custom_ops, expected_ops, export_program
from grc.model.gr import GRModel
from grc.spec.loader import load_spec
from grc.spec.schema import AotiConfig
from tests.conftest import TEST_SPECS


def test_the_exported_program_holds_one_silu_per_layer() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = GRModel(cfg).dense.eval()
    ops = custom_ops(export_program(dense, torch.device("cpu"), torch.float32, silu_apart=True))
    want = expected_ops(cfg.hstu.num_layers, fuse=False, silu_apart=True)
    assert {op: ops.count(op) for op in want} == want and want["grc.silu.default"] == cfg.hstu.num_layers
    plain = custom_ops(export_program(dense, torch.device("cpu"), torch.float32))
    assert "grc.silu.default" not in plain


def test_the_layer_computes_the_same_with_silu_apart() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    layer = next(iter(GRModel(cfg).dense.double().hstu_layers))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    x = torch.randn(40, cfg.d_model, generator=gen, dtype=torch.float64)
    args = (x, torch.zeros(40, dtype=torch.int64), torch.tensor([0, 25, 40]), torch.tensor([5, 3]),
            torch.randint(0, 10**6, (40,), generator=gen).sort().values)  # fmt: skip
    with torch.no_grad():
        apart = layer.forward_jagged(*args, impl="triton", silu_apart=True)
        plain = layer.forward_jagged(*args, impl="triton")
    assert torch.equal(apart, plain) and apart.abs().max() > 0
    with pytest.raises(ValueError, match="silu_apart runs the grc::silu op: it needs impl='triton'"):
        layer.forward_jagged(*args, impl="pytorch", silu_apart=True)


def test_the_spec_refuses_silu_apart_with_fuse() -> None:
    with pytest.raises(ValidationError, match="silu_apart: with fuse the UVQK GEMM applies SiLU"):
        AotiConfig(enabled=True, fuse=True, silu_apart=True)
    assert AotiConfig(enabled=True, silu_apart=True).silu_apart


def test_consumer_silu_computes_the_same_function() -> None:
    """grc.model.hstu.CONSUMER_SILU: the compiled layer hands u to the norm-gate before SiLU (its kernel applies
    it: tests/kernels/test_interpreter.py::test_norm_gate_kernel). On the reference path the scores are
    bit-identical to SiLU applied first (float64, fresh ragged users), and the exported program holds the same grc
    nodes (no extra op)."""
    from grc.aoti.inputs import random_inputs
    from grc.aoti.model import JaggedDense

    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = GRModel(cfg).dense.double().eval()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    with torch.no_grad():  # every weight drawn: the seeded init's heads score 0.5 whatever the layers compute
        for p in dense.parameters():
            p.normal_(0.0, 0.3, generator=gen)
    args = random_inputs(cfg, 4, 30, 6, gen).to(torch.device("cpu"), torch.float64).args()
    with torch.no_grad():
        raw = JaggedDense(dense, consumer_silu=True)(*args)
        activated = JaggedDense(dense, consumer_silu=False)(*args)
    assert raw[raw != 0].std() > 1e-3 and torch.equal(raw, activated)
    ops = custom_ops(export_program(GRModel(cfg).dense.eval(), torch.device("cpu"), torch.float32))
    model = JaggedDense(dense)  # the defaults the export reads
    want = expected_ops(cfg.hstu.num_layers, False, packed_vqk=model.packs_vqk, attention_gate=model.gates_attention)
    assert {op: ops.count(op) for op in want} == want and len(ops) == sum(want.values())


def test_packed_vqk_computes_the_same_function_and_exports_one_attention_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """grc.model.hstu.PACKED_VQK: the layer hands the attention the activated vqk whole (kernels.ops.
    hstu_attention_vqk cuts q, k, v from it), so Inductor writes it as one buffer (bench/inductor_view_inputs.py).
    Same scores as the three views (float64, fresh ragged users), and the exported program holds one
    grc::hstu_attention_vqk node per layer in place of grc::hstu_attention. Its Gluon path: the device
    (bench/e2e.py's aoti_bf16_vqk)."""
    from grc.aoti.inputs import random_inputs
    from grc.aoti.model import JaggedDense
    from grc.model import hstu

    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = GRModel(cfg).dense.double().eval()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    with torch.no_grad():  # every weight drawn (the bias tables and the heads too): each of q, k, v reaches the scores
        for p in dense.parameters():
            p.normal_(0.0, 0.3, generator=gen)
    args = random_inputs(cfg, 4, 30, 6, gen).to(torch.device("cpu"), torch.float64).args()
    with torch.no_grad():
        packed = JaggedDense(dense, consumer_silu=True, packed_vqk=True)(*args)
        views = JaggedDense(dense, consumer_silu=True, packed_vqk=False)(*args)
        activated_first = JaggedDense(dense, consumer_silu=False, packed_vqk=False)(*args)
    candidates = packed[packed != 0]
    assert candidates.numel() > 0 and candidates.std() > 1e-3  # scores that depend on the users
    torch.testing.assert_close(packed, views, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(packed, activated_first, rtol=1e-12, atol=0.0)
    monkeypatch.setattr(hstu, "PACKED_VQK", True)
    monkeypatch.setattr(hstu, "ATTENTION_GATE", False)
    assert JaggedDense(dense).packs_vqk and not JaggedDense(dense, silu_apart=True).packs_vqk  # what the build expects
    ops = custom_ops(export_program(GRModel(cfg).dense.eval(), torch.device("cpu"), torch.float32))
    want = expected_ops(cfg.hstu.num_layers, fuse=False, packed_vqk=True)
    assert want.get("grc.hstu_attention_vqk.default") == cfg.hstu.num_layers
    assert {op: ops.count(op) for op in want} == want and len(ops) == sum(want.values())


def test_the_gate_in_the_attention_op_computes_the_same_function_and_exports_one_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """grc.model.hstu.ATTENTION_GATE: with PACKED_VQK, the norm-gate inside the attention's op (its Gluon path adds
    the key parts in the norm-gate kernel: tests/kernels/test_interpreter.py::test_norm_gate_kernel). Same scores
    (float64, fresh ragged users, every weight drawn), one grc::hstu_attention_gate_vqk node per layer and nothing
    else, and the flag does nothing without packed vqk."""
    from grc.aoti.inputs import random_inputs
    from grc.aoti.model import JaggedDense
    from grc.model import hstu

    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    dense = GRModel(cfg).dense.double().eval()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.3, generator=gen)
    args = random_inputs(cfg, 4, 30, 6, gen).to(torch.device("cpu"), torch.float64).args()
    with torch.no_grad():
        gated = JaggedDense(dense, consumer_silu=True, packed_vqk=True, attention_gate=True)(*args)
        apart = JaggedDense(dense, consumer_silu=True, packed_vqk=True, attention_gate=False)(*args)
    assert gated[gated != 0].std() > 1e-3
    torch.testing.assert_close(gated, apart, rtol=1e-12, atol=0.0)
    assert not JaggedDense(dense, packed_vqk=False, attention_gate=True).gates_attention
    monkeypatch.setattr(hstu, "PACKED_VQK", True)
    monkeypatch.setattr(hstu, "ATTENTION_GATE", True)
    assert JaggedDense(dense).gates_attention and not JaggedDense(dense, silu_apart=True).gates_attention
    ops = custom_ops(export_program(GRModel(cfg).dense.eval(), torch.device("cpu"), torch.float32))
    want = expected_ops(cfg.hstu.num_layers, fuse=False, packed_vqk=True, attention_gate=True)
    assert want == {"grc.hstu_attention_gate_vqk.default": cfg.hstu.num_layers}
    assert {op: ops.count(op) for op in want} == want and len(ops) == sum(want.values())


def test_the_packed_attention_op_compiles_to_the_views_result() -> None:
    """kernels.ops.hstu_attention_vqk under torch.compile (the grc:: op's body; on the CPU its reference) equals
    hstu_attention on q, k, v cut from vqk, in float32 on fresh data; vqk_views cuts columns v, q, k."""
    from kernels.ops import hstu_attention, hstu_attention_vqk, vqk_views

    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    heads, dqk, dv, total = 2, 8, 4, 23
    vqk = torch.randn(total, heads * (dv + 2 * dqk), generator=gen)
    q, k, v = vqk_views(vqk, heads, dqk, dv)
    assert torch.equal(v.flatten(1), vqk[:, : heads * dv]) and torch.equal(k.flatten(1), vqk[:, -heads * dqk :])
    offsets, candidates = torch.tensor([0, 9, 23]), torch.tensor([2, 5])
    stamps = torch.randint(0, 10**6, (total,), generator=gen).sort().values
    pos_w, ts_w = torch.randn(heads, 2 * 16 - 1, generator=gen), torch.randn(heads, 8, generator=gen)
    rest = (offsets, stamps, candidates, pos_w, ts_w, 0.3, 64.0, True)
    want = hstu_attention(q, k, v, *rest, impl="pytorch")
    got = torch.compile(hstu_attention_vqk, fullgraph=True)(vqk, heads, dqk, dv, *rest)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the gate op (ATTENTION_GATE): LayerNorm of that attention times SiLU of raw u, compiled
    from kernels.ops import hstu_attention_gate_vqk, norm_gate

    u = torch.randn(total, heads * dv, generator=gen) * 2
    gate_w, gate_b = torch.randn(heads * dv, generator=gen), torch.randn(heads * dv, generator=gen)
    want = norm_gate(want.reshape(total, -1), u, gate_w, gate_b, 1e-5, impl="pytorch", silu_u=True)
    compiled = torch.compile(hstu_attention_gate_vqk, fullgraph=True)
    got = compiled(vqk, u, gate_w, gate_b, 1e-5, heads, dqk, dv, *rest)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
