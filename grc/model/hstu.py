"""The HSTU layer (Zhai et al., ICML 2024) with MTGR's group layer norm.

    x_hat = GroupLayerNorm(x, kind)                 # separate affine per token kind (MTGR)
    U, V, Q, K = split(SiLU(x_hat W1 + b1))          # one fused projection
    A = pointwise attention (see attention.py)      # SiLU, no softmax, /N, masked
    y = x + (LayerNorm(A V) * U) W2 + b2
One code path per layout: ``forward_padded`` (what ONNX export traces) and ``forward_jagged``
(canonical, dispatches attention to the kernels' op). Both call the same projection and output
code, so they can only differ in the attention itself, which tests compare.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from grc.model.attention import hstu_attention_padded
from grc.model.kernel_ops import (
    gated_linear_residual,
    group_norm,
    hstu_attention_cached,
    hstu_attention_gate_vqk,
    hstu_attention_jagged,
    hstu_attention_vqk_jagged,
    linear_residual,
    linear_silu,
    linear_silu_into,
    norm_gate,
    norm_linear_silu,
)
from grc.model.kernel_ops import silu_apart as silu_apart_op
from grc.spec.schema import HSTUConfig

# Where the fused path (fuse=True) runs each projection's norm: as its GEMM's prologue, or apart
# (the group norm as PyTorch ops, one Inductor kernel in compiled graphs; the norm-gate kernel) with
# only the epilogue fused. A prologue is recomputed for every N tile of a row block (16 for the
# UVQK GEMM of mtgr-small, 4 for the output GEMM), a norm apart is one more pass over memory;
# bench/fused_gemm.py measures both forms of each on the device.
NORM_PROLOGUE = {"uvqk": False, "out": True, "uvqk_step": False}
# "uvqk_step": the history cache's score steps (forward_scattered), a few hundred rows per call, where the GEMM is
# bound by reading its weight and the norm apart was five small kernels (layer_norm, two gathers, mul, add: ~0.05 ms
# of a 0.39 ms mtgr-base step on the H200, history-cache-profile-h200-s19-arena-base-default.json), one since
# session 22 (kernel_ops.group_norm). As a prologue it
# measured slower on the H200 (session 21: 0.410 vs 0.390 ms at 3837 history, 0.351 vs 0.323 at 1000: the GEMMs
# recompute the norm per N tile); bench/history_cache_profile.py times both (--uvqk-step-prologue).
# The compiled jagged layer (JaggedDense: AOTInductor packages, torch.compile) hands u to the norm-gate kernel before
# SiLU, which applies it as it reads u: Inductor otherwise writes SiLU(u) as a pass of its own over the UVQK output
# (one of the four SiLU/split kernels, ~3.5% of a throughput call on the H200). q's SiLU in the Gluon attention
# kernel's Q tiles was measured with it (4.34 vs 4.56 ms, mtgr-small) but failed its GPU check at head dim 128 and
# was taken out (bench/results/e2e-notes.md, session 18); k and v are read once per query tile: activated apart.
# JaggedDense's default (read when one is built: bench/e2e_modes.py turns it off to time the pass it saves).
CONSUMER_SILU = True
# ... and, with it, q, k and v handed to the attention op as ONE activated tensor (vqk) it cuts its views from:
# Inductor gives each view input of an opaque op a buffer and a pass of its own (three SiLU/split kernels a layer in
# the GPU package; bench/inductor_view_inputs.py), one input one. Measured on the H100 (session 26, mtgr-small,
# 15 interleaved rounds, e2e-h100-s26-mtgr-small-rounds.json): latency p50 0.255 vs 0.268 ms, throughput 4.79 vs
# 4.83 ms, the same parity. JaggedDense reads it when built, as CONSUMER_SILU.
PACKED_VQK = True
# ... and, with it, the norm-gate inside the attention op (one opaque node a layer in the GPU package): where the
# Gluon kernel cuts one user's keys into parts (kernels.hstu_attention.split_count: the latency call), the norm-gate
# kernel adds the parts as it reads them, so the separate sum kernel goes (3 kernels of the latency call). Same
# function, same roundings. Same run: latency p50 0.2475 ms (0.255 packed vqk alone), throughput 4.78 ms.
ATTENTION_GATE = True
# The history step's new K/V rows written by the fused UVQK GEMM's epilogue (kernels.fused_linear.KVInto) instead of
# two index_copy_ passes per layer after it: on the H200 the step took 0.347 ms with it, 0.375 without (mtgr-base,
# 3837 x 256, session 21: history-cache-profile-h200-s21-diag-*.json); False only to time that again.
SCATTER_KV = True
# The history step's group norm (norm apart) as one Triton kernel (kernel_ops.group_norm) rather than the module's
# five PyTorch kernels (~0.046 of a 0.376 ms mtgr-base step on the H200, session 22); False only to time that again
# (bench/history_cache_profile.py's arena_score_torch_norm).
STEP_NORM_KERNEL = True


class GroupLayerNorm(nn.Module):
    """LayerNorm whose scale and shift are chosen per token kind (profile / history / candidate)."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, dim))
        self.bias = nn.Parameter(torch.zeros(groups, dim))

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return normed * self.weight[group] + self.bias[group]


class PointwiseAttention(nn.Module):
    """Holds the relative-bias tables; a module of its own so the exported ONNX nodes of the
    attention share one name scope (``...attention``), which graph surgery fuses into one node."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.cfg = cfg
        self.pos_w = nn.Parameter(torch.zeros(cfg.num_heads, 2 * cfg.position_buckets - 1))
        self.ts_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.time_buckets))

    @property
    def constants(self) -> tuple[torch.Tensor, torch.Tensor, float, float, bool]:
        """What every attention call takes after its tensors: the bias tables, alpha, the norm N, causal."""
        c = self.cfg
        return self.pos_w, self.ts_w, c.scale, float(c.max_seq_len), c.history_mask == "causal"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
    ) -> torch.Tensor:
        return hstu_attention_padded(q, k, v, lengths, num_candidates, timestamps, *self.constants)

    def jagged(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        return hstu_attention_jagged(q, k, v, offsets, timestamps, num_candidates, *self.constants, impl=impl)

    def jagged_vqk(
        self,
        vqk: torch.Tensor,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        """``jagged`` of q, k, v as views of the activated ``vqk`` [T, Lv + 2 A] (columns v, q, k)."""
        c, args = self.cfg, (offsets, timestamps, num_candidates, *self.constants)
        return hstu_attention_vqk_jagged(vqk, c.num_heads, c.head_qk, c.head_v, *args, impl=impl)

    def jagged_vqk_gate(
        self,
        vqk: torch.Tensor,
        u: torch.Tensor,
        norm: nn.LayerNorm,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        impl: str,
    ) -> torch.Tensor:
        """``jagged_vqk`` as [T, H*Dv], then ``norm`` (LayerNorm) times SiLU(raw ``u``): one op (ATTENTION_GATE)."""
        c, args = self.cfg, (offsets, timestamps, num_candidates, *self.constants)
        return hstu_attention_gate_vqk(vqk, u, norm, c.num_heads, c.head_qk, c.head_v, *args, impl=impl)

    def cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_offsets: torch.Tensor,
        kv_offsets: torch.Tensor,
        timestamps: torch.Tensor,
        num_candidates: torch.Tensor,
        impl: str,
        max_user_keys: int | None = None,
    ) -> torch.Tensor:
        """New tokens' queries against cached + new keys (the history cache's attention; ``kv_offsets`` as
        [users, 2] ranges with ``max_user_keys``: the keys where an arena holds them)."""
        args = (q, k, v, q_offsets, kv_offsets, timestamps, num_candidates, *self.constants)
        return hstu_attention_cached(*args, impl=impl, max_user_keys=max_user_keys)


class HSTULayer(nn.Module):
    def __init__(self, d_model: int, cfg: HSTUConfig, groups: int):
        super().__init__()
        self.cfg = cfg
        self.norm_in = GroupLayerNorm(d_model, groups, cfg.eps)
        self.uvqk = nn.Linear(d_model, 2 * cfg.linear_dim + 2 * cfg.attention_dim)
        self.attention = PointwiseAttention(cfg)
        self.norm_attn = nn.LayerNorm(cfg.linear_dim, eps=cfg.eps)
        self.out = nn.Linear(cfg.linear_dim, d_model)

    def _project(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        fuse: bool = False,
        silu_apart: bool = False,
        raw_u: bool = False,
        into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """x [..., D] -> u [..., Lv], and q, k [..., H, Dqk], v [..., H, Dv] (fuse: one Triton
        GEMM with the group norm as prologue and SiLU as epilogue; u, v, q, k are views of it;
        silu_apart: SiLU as the ``grc::silu`` op, so compiled code keeps one activated buffer and the four are
        views of it, kernels/silu.py; raw_u: u left before SiLU, for the norm-gate kernel to apply;
        into (fuse only): (keys, values, slots), the K and V rows also written there by the GEMM's epilogue)."""
        c = self.cfg
        if into is not None:
            uvqk = self._project_into(x, group, *into)
        elif raw_u and not (fuse or silu_apart):
            u, vqk = self._raw_u_projection(x, group)
            v, q, k = torch.split(vqk, [c.linear_dim, c.attention_dim, c.attention_dim], dim=-1)
            return self._heads(x, u, q, k, v)
        elif silu_apart and not fuse:
            uvqk = silu_apart_op(self.uvqk(self.norm_in(x, group)))
        elif fuse and NORM_PROLOGUE["uvqk"]:
            n = self.norm_in
            uvqk = norm_linear_silu(x, group, n.weight, n.bias, self.uvqk.weight, self.uvqk.bias, n.eps)
        elif fuse:  # SiLU as the GEMM's epilogue, the norm apart
            uvqk = linear_silu(self.norm_in(x, group), self.uvqk.weight, self.uvqk.bias)
        else:
            uvqk = F.silu(self.uvqk(self.norm_in(x, group)))
        u, v, q, k = torch.split(uvqk, [c.linear_dim, c.linear_dim, c.attention_dim, c.attention_dim], dim=-1)
        return self._heads(x, u, q, k, v)

    def _raw_u_projection(self, x: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> u [..., Lv] before SiLU (the norm-gate kernel applies it) and the activated vqk [..., Lv + 2 A]
        (columns v, q, k)."""
        c = self.cfg
        pre = self.uvqk(self.norm_in(x, group))
        u, vqk = torch.split(pre, [c.linear_dim, c.linear_dim + 2 * c.attention_dim], dim=-1)
        return u, F.silu(vqk)

    def _project_into(
        self, x: torch.Tensor, group: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """The fused UVQK output whose K and V rows the GEMM also stores at ``slots`` of ``keys`` / ``values``."""
        c, n, w, b = self.cfg, self.norm_in, self.uvqk.weight, self.uvqk.bias
        k_col, v_col = 2 * c.linear_dim + c.attention_dim, c.linear_dim  # u, v, q, k: _project's split
        if NORM_PROLOGUE["uvqk_step"]:
            norm = (group, n.weight, n.bias, n.eps)
            return linear_silu_into(x, w, b, (keys, values, slots), k_col, v_col, norm=norm)
        normed = group_norm(x, group, n) if STEP_NORM_KERNEL else n(x, group)
        return linear_silu_into(normed, w, b, (keys, values, slots), k_col, v_col)

    def _heads(
        self, x: torch.Tensor, u: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        c, lead = self.cfg, x.shape[:-1]
        return (
            u,
            q.reshape(*lead, c.num_heads, c.head_qk),
            k.reshape(*lead, c.num_heads, c.head_qk),
            v.reshape(*lead, c.num_heads, c.head_v),
        )

    def _finish(
        self,
        x: torch.Tensor,
        attn: torch.Tensor,
        u: torch.Tensor,
        impl: str,
        fuse: bool = False,
        silu_u: bool = False,
    ) -> torch.Tensor:
        attn = attn.reshape(*attn.shape[:-2], self.cfg.linear_dim)
        n, out = self.norm_attn, self.out
        if fuse and NORM_PROLOGUE["out"]:  # norm-gate as the output GEMM's prologue, the residual add as its epilogue
            return gated_linear_residual(attn, u, n.weight, n.bias, out.weight, out.bias, x, self.cfg.eps)
        gated = norm_gate(attn, u, n.weight, n.bias, self.cfg.eps, impl=impl, silu_u=silu_u)
        if fuse:  # the residual add as the GEMM's epilogue
            return linear_residual(gated, out.weight, out.bias, x)
        return x + self.out(gated)

    def forward_padded(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        lengths: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
    ) -> torch.Tensor:
        u, q, k, v = self._project(x, group)
        attn = self.attention(q, k, v, lengths, num_candidates, timestamps)
        return self._finish(x, attn, u, impl="pytorch")

    def forward_jagged(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        offsets: torch.Tensor,
        num_candidates: torch.Tensor,
        timestamps: torch.Tensor,
        impl: str = "pytorch",
        fuse: bool = False,
        silu_apart: bool = False,
        consumer_silu: bool = False,
        packed_vqk: bool = False,
        attention_gate: bool = False,
    ) -> torch.Tensor:
        """fuse (impl="triton" only): the projections as fused Triton GEMMs (kernels/fused_linear.py),
        the GPU compile path; the unfused form is the model's math (ONNX, TensorRT plugins).
        silu_apart (impl="triton" only, unfused): SiLU as the grc::silu op (engine.aoti.silu_apart).
        consumer_silu (unfused, neither fuse nor silu_apart): u reaches the norm-gate before SiLU, which its kernel
        applies (CONSUMER_SILU says why), the same function computed with one pass fewer.
        packed_vqk (with consumer_silu): the attention takes the activated vqk whole (PACKED_VQK says why);
        attention_gate (with packed_vqk): the norm-gate in the attention's op (ATTENTION_GATE says why)."""
        _needs_triton(fuse, FUSE_NEEDS, impl)
        _needs_triton(silu_apart, "silu_apart runs the grc::silu op", impl)
        raw_u = consumer_silu and not (fuse or silu_apart)
        if raw_u and packed_vqk:
            u, vqk = self._raw_u_projection(x, group)
            if attention_gate:
                jagged = (offsets, num_candidates, timestamps, impl)
                return x + self.out(self.attention.jagged_vqk_gate(vqk, u, self.norm_attn, *jagged))
            attn = self.attention.jagged_vqk(vqk, offsets, num_candidates, timestamps, impl)
            return self._finish(x, attn, u, impl=impl, fuse=fuse, silu_u=True)
        u, q, k, v = self._project(x, group, fuse, silu_apart, raw_u)
        attn = self.attention.jagged(q, k, v, offsets, num_candidates, timestamps, impl)
        return self._finish(x, attn, u, impl=impl, fuse=fuse, silu_u=raw_u)

    def forward_cached(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]],
        q_offsets: torch.Tensor,
        kv_offsets: torch.Tensor,
        kv_timestamps: torch.Tensor,
        num_candidates: torch.Tensor,
        impl: str = "pytorch",
        bounds: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Only the new tokens ``x`` [Tq, D] of B users (``q_offsets``), attending to each user's
        cached keys/values ``past[b]`` and to themselves. ``kv_offsets`` / ``kv_timestamps``
        describe the whole sequences (cached + new). ``bounds``: ``q_offsets`` as host integers
        (spares a device sync). Returns (output, k, v) of the new tokens."""
        rows = q_offsets.tolist() if bounds is None else bounds

        def join(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _after_past([p[0] for p in past], k, rows), _after_past([p[1] for p in past], v, rows)

        return self._attend_cached(x, group, join, q_offsets, kv_offsets, kv_timestamps, num_candidates, impl)

    def forward_scattered(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        slots: torch.Tensor,
        q_offsets: torch.Tensor,
        kv_offsets: torch.Tensor,
        kv_timestamps: torch.Tensor,
        num_candidates: torch.Tensor,
        impl: str = "pytorch",
        fuse: bool = False,
        max_user_keys: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward_cached`` with the sequences already laid out: ``past_k`` / ``past_v`` [Tkv, H, D] hold
        every user's cached rows where ``kv_offsets`` puts them, and ``slots`` [Tq] says which row each new
        token's K/V fills (IN PLACE: the buffers are the caller's scratch, or an arena's rows, which
        ``kv_offsets`` as [users, 2] ranges with ``max_user_keys`` address). Every shape is fixed by the
        buffers, nothing is read back: the form a CUDA graph replays (grc/serving/common/score_graphs.py).
        fuse: the projections as the fused Triton GEMMs, as ``forward_jagged``'s GPU compile path; the UVQK GEMM's
        epilogue then writes the new K/V rows itself (kernels.fused_linear.KVInto)."""

        scatter = fuse and SCATTER_KV

        def join(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if scatter:  # written by the projection
                return past_k, past_v
            return past_k.index_copy_(0, slots, k), past_v.index_copy_(0, slots, v)

        args = (q_offsets, kv_offsets, kv_timestamps, num_candidates, impl, fuse, max_user_keys)
        return self._attend_cached(x, group, join, *args, into=(past_k, past_v, slots) if scatter else None)

    def _attend_cached(
        self,
        x: torch.Tensor,
        group: torch.Tensor,
        join: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        q_offsets: torch.Tensor,
        kv_offsets: torch.Tensor,
        kv_timestamps: torch.Tensor,
        num_candidates: torch.Tensor,
        impl: str,
        fuse: bool = False,
        max_user_keys: int | None = None,
        into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached-keys layer; ``join(k, v)`` of the new tokens -> the whole sequences' keys and values (into:
        ``_project``'s, the rows the projection writes them to)."""
        _needs_triton(fuse, FUSE_NEEDS, impl)
        u, q, k, v = self._project(x, group, fuse, into=into)
        keys, values = join(k, v)
        args = (q_offsets, kv_offsets, kv_timestamps, num_candidates, impl, max_user_keys)
        attn = self.attention.cached(q, keys, values, *args)
        return self._finish(x, attn, u, impl=impl, fuse=fuse), k, v


FUSE_NEEDS = "fuse=True runs the fused Triton GEMMs"


def _needs_triton(asked: bool, what: str, impl: str) -> None:
    """An option that runs grc's Triton ops (``what`` says which) refused with any other impl."""
    if asked and impl != "triton":
        raise ValueError(f"{what}: it needs impl='triton', got impl={impl!r}")


def _after_past(past: list[torch.Tensor], new: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Jagged [sum(past_b + new_b), ...]: each user's cached rows, then its new rows (``bounds``: new rows' offsets)."""
    parts: list[torch.Tensor] = []
    for b, rows in enumerate(past):
        parts += [rows, new[bounds[b] : bounds[b + 1]]]
    return torch.cat(parts)
