"""The export entry point: the dense jagged model with its HSTU ops as ``torch.ops.grc.*``.

``GRDense.forward_jagged`` finds each token's user with ``int(offsets[-1])`` and
``repeat_interleave``, whose sizes depend on tensor values, so ``torch.export`` cannot trace it
with a dynamic token count. ``JaggedDense`` computes the same per-token quantities from the
static token count (``searchsorted`` over the offsets) and then runs GRDense's own layers, final
norm and heads, each layer with ``impl="triton"``: the exported program holds one
``grc.hstu_attention_gate_vqk`` node per layer by default (the attention of the activated vqk and the
norm-gate after it: grc.model.hstu's PACKED_VQK and ATTENTION_GATE; ``expected_ops`` lists every
variant's nodes), every layer's full bias tables included (the kernel is exact for any number of time
buckets). The parity check compares the
compiled package with ``GRDense.forward_jagged`` itself (float64, plain reference), so the two
entry points cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grc.aoti.inputs import JaggedInputs, random_inputs
from grc.model import hstu
from grc.model.gr import GRDense, TaskHeads, token_groups
from grc.model.hstu import NORM_PROLOGUE

INPUTS = ("tokens", "offsets", "num_candidates", "timestamps")
OUTPUTS = ("scores",)
MAX_USERS = 1 << 16
MAX_TOKENS = 1 << 24
TUNE_USERS = 16  # users in the GPU export's example batch, which AOTInductor autotunes on (trace_inputs)


def jagged_positions(offsets: torch.Tensor, num_candidates: torch.Tensor, total: int) -> tuple[torch.Tensor, ...]:
    """[T] each token's index within its user, and its user's history length (profile + history)."""
    pos = torch.arange(total, device=offsets.device)
    # user of token t = how many users end at or before t = how many of offsets[0..B] are <= t, less one (offsets[0]
    # is 0): a binary search over the WHOLE offsets, which Inductor compiles into a pointwise kernel of its own
    # (ops.bucketize). History: searchsorted over the view offsets[1:] went wrong in Inductor's CUDA bucketize, which
    # read the view from its base (every token of a 1-user batch sent to user 1, an out-of-bounds gather; H100, torch
    # 2.11): no view here. Session 19-22's form instead, int64 marks (+1 at each user's end, index_add, prefix sum),
    # compiled to ~12 device launches (aten's sort-based index_put fallback: bounds-check min/max, compares and two
    # _assert_async, a radix sort, the accumulate kernel, fills, copies; then a cumsum). Measured on the H200 (session
    # 22, one process, mtgr-small package, 1 user x 1,515 tokens, CUDA graph): 53 -> 35 device events per call, p50
    # 0.325 -> 0.296 ms, same scores (the search fuses into the first group norm's kernel). int32 marks failed the
    # GPU compile (session 21): index dtypes stay int64.
    # The clamp changes nothing for valid offsets (offsets[0] = 0 <= t < offsets[-1]: the count lies in 1..B) but keeps
    # every gather below in bounds whatever the search's buffer holds: on the H200 (session 22) the package's compile
    # without it failed a device-side assert, "0 <= tmp43 < 1 + ks0", in a kernel gathering offsets[user] while
    # Inductor autotuned it, as if it read the search's output before the search had run (zeros: user -1). The
    # marks' form read its users from a cumsum of the same zeros there (user 0, in bounds), which is why it compiled.
    users = num_candidates.shape[0]
    user = (torch.searchsorted(offsets, pos, right=True) - 1).clamp(0, users - 1)
    start = offsets[user]
    idx = pos - start
    n_ctx = offsets[user + 1] - start - num_candidates[user]
    return idx, n_ctx


def time_bucket_note(time_buckets: int) -> str:
    """The package metadata's word on time buckets (older packages cut the table to 31)."""
    return f"exact: the kernel computes all {time_buckets} time buckets (gaps saturate at 2**63 - 1 s)"


class JaggedDense(nn.Module):
    """tokens [T, D], offsets [B+1], num_candidates [B], timestamps [T] -> scores [T, tasks]
    (zero except at candidate tokens), exactly ``GRDense.forward_jagged``."""

    def __init__(
        self,
        dense: GRDense,
        impl: str = "triton",
        fuse: bool = False,
        silu_apart: bool = False,
        consumer_silu: bool | None = None,
        packed_vqk: bool | None = None,
        attention_gate: bool | None = None,
    ):
        super().__init__()
        self.dense = dense
        self.impl = impl
        self.fuse = fuse  # the fused kernels (impl="triton" only): engine.aoti.fuse, off until measured
        self.silu_apart = silu_apart  # SiLU as grc::silu (engine.aoti.silu_apart), off until measured
        # u's SiLU in the norm-gate kernel; default: grc.model.hstu.CONSUMER_SILU
        self.consumer_silu = hstu.CONSUMER_SILU if consumer_silu is None else consumer_silu
        # q, k, v to the attention as one activated tensor; default: grc.model.hstu.PACKED_VQK
        self.packed_vqk = hstu.PACKED_VQK if packed_vqk is None else packed_vqk
        # with it, the norm-gate in the attention's op; default: grc.model.hstu.ATTENTION_GATE
        self.attention_gate = hstu.ATTENTION_GATE if attention_gate is None else attention_gate
        # The heads' first layer as ONE [D, tasks x hidden] matrix, laid out once here: TaskHeads' einsum over w1
        # [tasks, D, hidden] permutes w1 into that layout on every call, which a package runs as a kernel of its own
        # (triton_poi_fused_clone_permute_unsqueeze: ~2 us of the H100's 24-kernel latency call, session 26). A
        # buffer, not a parameter: built from the dense's weights when this module is (export_program builds it on
        # the copy it exports, and an eager call lays it out again if w1 changed since); TaskHeads keeps its layout
        # for ONNX and the reference. Other heads (grc.model.fp8's Fp8Heads: already one matrix) run as they are.
        self.heads_w1: torch.Tensor | None
        plain = isinstance(dense.heads, TaskHeads)
        self.register_buffer("heads_w1", _heads_layout(dense.heads.w1) if plain else None, persistent=False)
        self._w1_seen = _weight_key(dense.heads.w1) if plain else None

    @property
    def packs_vqk(self) -> bool:
        """Whether its layers hand the attention the activated vqk whole: packed_vqk, where u reaches the norm-gate
        before SiLU (HSTULayer.forward_jagged: neither fused nor SiLU apart)."""
        return self.packed_vqk and self.consumer_silu and not (self.fuse or self.silu_apart)

    @property
    def gates_attention(self) -> bool:
        """Whether its layers' attention op also applies the norm-gate: attention_gate where they pack vqk."""
        return self.attention_gate and self.packs_vqk

    def forward(
        self, tokens: torch.Tensor, offsets: torch.Tensor, num_candidates: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
        d = self.dense
        idx, n_ctx = jagged_positions(offsets, num_candidates, tokens.shape[0])
        group = token_groups(d.cfg, idx, n_ctx)
        x = tokens
        for layer in d.hstu_layers:
            x = layer.forward_jagged(
                x, group, offsets, num_candidates, timestamps, self.impl, self.fuse, self.silu_apart,
                self.consumer_silu, self.packed_vqk, self.gates_attention,
            )  # fmt: skip
        if self.fuse:
            return d.candidate_scores(x, group, idx >= n_ctx, fuse=True)
        # every row, masked: GRDense's gather of the candidate rows has a data-dependent row count
        scores = self.heads(d.final_norm(x, group))
        return scores * (idx >= n_ctx).unsqueeze(-1).to(scores.dtype)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """TaskHeads.forward, its first layer the one matrix ``heads_w1`` (see __init__): [T, D] -> [T, tasks]."""
        h = self.dense.heads
        if self.heads_w1 is None:
            return h(x)
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            key = _weight_key(h.w1)  # eager: weights loaded, moved or cast since __init__ must not go stale here
            if key != self._w1_seen:
                self.heads_w1, self._w1_seen = _heads_layout(h.w1), key
        hidden = F.silu((x @ self.heads_w1).view(x.shape[0], *h.b1.shape) + h.b1)
        return torch.sigmoid((hidden * h.w2).sum(-1) + h.b2)


def _heads_layout(w1: torch.Tensor) -> torch.Tensor:
    """TaskHeads' w1 [tasks, D, hidden] as one [D, tasks x hidden] matrix (JaggedDense.heads)."""
    w1 = w1.detach()
    return w1.permute(1, 0, 2).reshape(w1.shape[1], -1).contiguous()


def _weight_key(w: torch.Tensor) -> tuple[Any, ...]:
    """What changes when a weight is replaced, moved, cast or written in place."""
    return (w.data_ptr(), w.device, w.dtype, w._version)


def dynamic_shapes() -> dict[str, dict[int, Any]]:
    users = torch.export.Dim("users", min=1, max=MAX_USERS)
    tokens = torch.export.Dim("tokens", min=2, max=MAX_TOKENS)
    return {"tokens": {0: tokens}, "offsets": {0: users + 1}, "num_candidates": {0: users}, "timestamps": {0: tokens}}


def trace_inputs(dense: GRDense, device: torch.device, dtype: torch.dtype) -> JaggedInputs:
    """The export's example inputs (no size 0 or 1 anywhere, so nothing is specialised into the
    graph). On a GPU they are also what AOTInductor autotunes every Triton kernel on
    (``triton.autotune_with_sample_inputs``), and the configs it picks are compiled into the
    package for every shape; tuned on two users of ~20 tokens, the attention kernel's tile was a
    pick for a toy batch while torch.compile of the same module tunes on its first real call. So on
    a GPU: TUNE_USERS users of the longest sequences the model takes (max_seq_len tokens,
    max_candidates of them candidates), the throughput shape the package is built for. On a CPU
    nothing is tuned: two short users."""
    cfg = dense.cfg
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        history = cfg.hstu.max_seq_len - len(cfg.profile) - cfg.max_candidates
        return random_inputs(cfg, TUNE_USERS, history, cfg.max_candidates, gen, ragged=False).to(device, dtype)
    history = max(2, min(16, cfg.hstu.max_seq_len - len(cfg.profile) - 4))
    return random_inputs(cfg, 2, history, 2, gen, ragged=False).to(device, dtype)


def expected_ops(
    num_layers: int, fuse: bool, silu_apart: bool = False, packed_vqk: bool = False, attention_gate: bool = False
) -> dict[str, int]:
    """The grc custom-op nodes an exported program of ``num_layers`` layers holds (packed_vqk: JaggedDense.packs_vqk,
    the attention taking the activated vqk whole; attention_gate: JaggedDense.gates_attention, the norm-gate in
    that op)."""
    if attention_gate:
        return {"grc.hstu_attention_gate_vqk.default": num_layers}
    if not fuse:
        attention = "grc.hstu_attention_vqk.default" if packed_vqk else "grc.hstu_attention.default"
        ops = {attention: num_layers, "grc.norm_gate.default": num_layers}
        return {**ops, "grc.silu.default": num_layers} if silu_apart else ops
    uvqk = ("grc.norm_linear_silu",) if NORM_PROLOGUE["uvqk"] else ("grc.linear_silu",)
    out = ("grc.gated_linear_residual",) if NORM_PROLOGUE["out"] else ("grc.norm_gate", "grc.linear_residual")
    per_layer = (*uvqk, "grc.hstu_attention", *out)
    return {**{f"{op}.default": num_layers for op in per_layer}, "grc.candidate_heads.default": 1}


def export_program(
    dense: GRDense, device: torch.device, dtype: torch.dtype, fuse: bool = False, silu_apart: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``JaggedDense`` (dense cast to ``dtype`` on ``device``), dynamic users
    and tokens; the grc ops stay custom-op nodes in the program (fuse: the fused ones; silu_apart: grc::silu)."""
    model = JaggedDense(copy.deepcopy(dense).to(device=device, dtype=dtype), fuse=fuse, silu_apart=silu_apart).eval()
    sample = trace_inputs(dense, device, dtype)
    with torch.no_grad():
        return torch.export.export(model, sample.args(), dynamic_shapes=dynamic_shapes(), strict=False)


def custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The grc custom-op nodes (and any Triton kernel calls traced out of them) of an exported
    program, in graph order."""
    names = [
        str(n.target) if isinstance(n.target, torch._ops.OpOverload) else str(getattr(n.target, "__name__", n.target))
        for n in program.graph.nodes
        if n.op == "call_function"
    ]
    return [n for n in names if n.startswith("grc.") or "triton_kernel_wrapper" in n]
