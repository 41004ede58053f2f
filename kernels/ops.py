"""Torch custom ops (namespace ``grc``) and the public ``impl=`` API.

``torch.ops.grc.hstu_attention`` / ``torch.ops.grc.norm_gate`` are ``torch.library.triton_op``s:
on CUDA tensors they launch the Triton kernels (torch.compile / AOTInductor see and compile the
kernels; under the Triton interpreter also on CPU tensors), on any other device they run the
PyTorch reference, so the ops work everywhere. On CUDA nothing else runs: a setting the kernel
does not support raises ValueError naming it. Their fake (meta) impl is the op body itself run on
fake tensors, which is why the bodies use tensor ops only. The jagged references loop over users
with data-dependent slicing, so they sit behind their own opaque ops
(``grc::hstu_attention_reference``, ``grc::hstu_attention_cached_reference``) with explicit fake
impls.

Eager calls on plain tensors without autograd skip the ops' dispatch and call the kernels (or references)
directly; there, on an sm90 GPU, the attention runs the Gluon kernel (kernels/hstu_hopper.py) where it measured
faster than the Triton one (its ``DEFAULT_HEAD_DIMS``; ``GRC_ATTENTION_KERNEL`` picks: auto, triton, hopper).
Both are exact to the same reference. Compiled code (torch.compile, AOTInductor) reaches the same choice through the
ops: where the Gluon kernel runs, their bodies call it as the opaque ``grc::hstu_attention_hopper`` (Inductor
compiles Triton kernels, not Gluon ones: a package calls it back through torch's dispatcher, so the process that
runs a GPU package imports ``kernels`` first, as grc.aoti.runtime does); else they trace the Triton kernel in.
Skipping the dispatch matters: on the H200 the custom-op layer cost ~0.3 ms of host time per call, ~1.9 of the
2.7 ms of an eager cached score step at mtgr-small (bench/results/history-cache-profile-h200.json). Under
torch.compile / torch.export (fake or functional tensors) the ops run, so compiled graphs and packages still
hold ``grc::`` nodes. The compiled jagged layer (grc.aoti.model.JaggedDense) calls ``grc::hstu_attention_gate_vqk``:
the attention of the activated vqk (q, k, v cut from it as views) and the norm-gate after it, one node a layer;
its Gluon path (``grc::hstu_attention_gate_hopper_vqk``) lets the norm-gate kernel add the attention's key parts.
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op, wrap_triton

from kernels import hstu_hopper, reference
from kernels.hstu_attention import INTERPRET, hstu_attention_cached_triton, hstu_attention_triton
from kernels.norm_gate import norm_gate_parts_triton, norm_gate_triton
from kernels.silu import silu_triton

IMPLS = ("triton", "pytorch")


def runs_kernel(x: torch.Tensor) -> bool:
    """The ops launch the Triton kernels on CUDA tensors, and on CPU tensors under the Triton
    interpreter (TRITON_INTERPRET=1: tests and dry runs of the GPU scripts); else the reference."""
    return x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu")


@custom_op("grc::hstu_attention_reference", mutates_args=())
def _hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    return reference.hstu_attention(q, k, v, offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)


@triton_op("grc::hstu_attention", mutates_args=())
def _hstu_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    args = (q, k, v, offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    if not runs_kernel(q):
        return torch.ops.grc.hstu_attention_reference(*args)
    if hstu_hopper.runs(q, k, v, traced=_traced(q)):
        return torch.ops.grc.hstu_attention_hopper(q, k, v, offsets, offsets, *args[4:])
    return hstu_attention_triton(*args, wrap=wrap_triton)


@custom_op("grc::hstu_attention_hopper", mutates_args=())
def _hstu_attention_hopper_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    max_user_keys: int | None = None,
) -> torch.Tensor:
    """The Gluon sm90 kernel as one opaque node of a compiled graph (the cached contract, key ranges included;
    full attention passes the same offsets twice). It raises where the kernel cannot run (check_hopper): nothing
    else runs in its place."""
    args = (q, k, v, q_offsets, kv_offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    return hstu_hopper.hstu_attention_hopper(*args, max_user_keys=max_user_keys)


@custom_op("grc::hstu_attention_cached_reference", mutates_args=())
def _hstu_attention_cached_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    return reference.hstu_attention_cached(
        q, k, v, q_offsets, kv_offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal
    )


def _attention_output_like(q: torch.Tensor, _k: torch.Tensor, v: torch.Tensor, *_rest: object) -> torch.Tensor:
    """The fake impl of the opaque attention ops (both references, the Gluon kernel): [T_q, H, Dv] in q's dtype."""
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


_hstu_attention_reference.register_fake(_attention_output_like)
_hstu_attention_cached_reference.register_fake(_attention_output_like)
_hstu_attention_hopper_op.register_fake(_attention_output_like)


def vqk_views(vqk: torch.Tensor, heads: int, head_qk: int, head_v: int) -> tuple[torch.Tensor, ...]:
    """q, k [T, H, Dqk] and v [T, H, Dv] as views of the activated projection's ``vqk`` [T, H*Dv + 2*H*Dqk] (its
    columns v, q, k: grc.model.hstu's split), row stride the whole width: what the Gluon kernel's TMA tiles read."""
    lv, la = heads * head_v, heads * head_qk
    v, q, k = vqk[:, :lv], vqk[:, lv : lv + la], vqk[:, lv + la :]
    return q.unflatten(1, (heads, head_qk)), k.unflatten(1, (heads, head_qk)), v.unflatten(1, (heads, head_v))


@custom_op("grc::hstu_attention_hopper_vqk", mutates_args=())
def _hstu_attention_hopper_vqk_op(
    vqk: torch.Tensor,
    heads: int,
    head_qk: int,
    head_v: int,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    """``grc::hstu_attention_hopper`` (full attention) taking the activated ``vqk`` whole: Inductor hands an opaque
    op's view inputs a buffer and a pass each (three SiLU kernels a layer), one input one
    (bench/inductor_view_inputs.py)."""
    q, k, v = vqk_views(vqk, heads, head_qk, head_v)
    args = (timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    return hstu_hopper.hstu_attention_hopper(q, k, v, offsets, offsets, *args)


@_hstu_attention_hopper_vqk_op.register_fake
def _(vqk: torch.Tensor, heads: int, head_qk: int, head_v: int, *_: object) -> torch.Tensor:
    return vqk.new_empty((vqk.shape[0], heads, head_v))


@triton_op("grc::hstu_attention_vqk", mutates_args=())
def _hstu_attention_vqk_op(
    vqk: torch.Tensor,
    heads: int,
    head_qk: int,
    head_v: int,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    """``grc::hstu_attention`` of the views of one activated ``vqk`` (hstu_attention_vqk)."""
    q, k, v = vqk_views(vqk, heads, head_qk, head_v)
    args = (offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    if not runs_kernel(vqk):
        return torch.ops.grc.hstu_attention_reference(q, k, v, *args)
    if hstu_hopper.runs(q, k, v, traced=_traced(vqk)):
        return torch.ops.grc.hstu_attention_hopper_vqk(vqk, heads, head_qk, head_v, *args)
    return hstu_attention_triton(q, k, v, *args, wrap=wrap_triton)


def _norm_gate_reference(
    a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu_u: bool
) -> torch.Tensor:
    """The reference norm-gate, u raw (SiLU first) where ``silu_u``: what every norm-gate path runs off the kernels."""
    return reference.norm_gate(a, torch.nn.functional.silu(u) if silu_u else u, weight, bias, eps)


@custom_op("grc::hstu_attention_gate_hopper_vqk", mutates_args=())
def _hstu_attention_gate_hopper_vqk_op(
    vqk: torch.Tensor,
    u: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    eps: float,
    heads: int,
    head_qk: int,
    head_v: int,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    """``grc::hstu_attention_hopper_vqk`` and the norm-gate of raw ``u`` as one opaque node (_gate_hopper)."""
    gate = (u, gate_w, gate_b, eps)
    args = (offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    return _gate_hopper(vqk, gate, (heads, head_qk, head_v), args)


# offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal: full attention's arguments after q, k, v
AttentionArgs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float, bool]


def _gate_hopper(
    vqk: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float],
    shape: tuple[int, int, int],
    args: AttentionArgs,
) -> torch.Tensor:
    """The Gluon kernel's attention of ``vqk``'s views, then the norm-gate of raw u (``gate``: u, weight, bias,
    eps): where the kernel cut the keys into parts, the norm-gate kernel adds them as it reads them
    (norm_gate_parts_triton), so the separate sum kernel goes (one kernel a layer; grc.model.hstu.ATTENTION_GATE)."""
    q, k, v = vqk_views(vqk, *shape)
    offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal = args
    dest = hstu_hopper.hstu_attention_hopper(
        q, k, v, offsets, offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal, finish=False
    )
    if dest.dim() == 4:  # the key parts' fp32 partial sums
        return norm_gate_parts_triton(dest, *gate, vqk.dtype, silu_u=True)
    return norm_gate_triton(dest.reshape(dest.shape[0], -1), *gate, silu_u=True)


@_hstu_attention_gate_hopper_vqk_op.register_fake
def _(vqk: torch.Tensor, u: torch.Tensor, *_: object) -> torch.Tensor:
    return u.new_empty(u.shape)


@triton_op("grc::hstu_attention_gate_vqk", mutates_args=())
def _hstu_attention_gate_vqk_op(
    vqk: torch.Tensor,
    u: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    eps: float,
    heads: int,
    head_qk: int,
    head_v: int,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
) -> torch.Tensor:
    """LayerNorm(hstu_attention_vqk(...)) * SiLU(u): the attention of one activated ``vqk`` and its norm-gate of raw
    ``u`` (hstu_attention_gate_vqk)."""
    gate = (u, gate_w, gate_b, eps)
    shape = (heads, head_qk, head_v)
    args = (offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    q, k, v = vqk_views(vqk, *shape)
    if not runs_kernel(vqk):
        attn = torch.ops.grc.hstu_attention_reference(q, k, v, *args)
        return _norm_gate_reference(attn.reshape(attn.shape[0], -1), *gate, silu_u=True)
    if hstu_hopper.runs(q, k, v, traced=_traced(vqk)):
        return torch.ops.grc.hstu_attention_gate_hopper_vqk(vqk, *gate, *shape, *args)
    attn = hstu_attention_triton(q, k, v, *args, wrap=wrap_triton)
    return norm_gate_triton(attn.reshape(attn.shape[0], -1), u, gate_w, gate_b, eps, wrap=wrap_triton, silu_u=True)


@triton_op("grc::hstu_attention_cached", mutates_args=())
def _hstu_attention_cached_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    max_user_keys: int | None = None,
) -> torch.Tensor:
    args = (q, k, v, q_offsets, kv_offsets, timestamps, num_candidates, pos_w, ts_w, alpha, norm, causal)
    if not runs_kernel(q):
        return torch.ops.grc.hstu_attention_cached_reference(*args)
    if hstu_hopper.runs(q, k, v, traced=_traced(q)):
        return torch.ops.grc.hstu_attention_hopper(*args, max_user_keys)
    return hstu_attention_cached_triton(*args, wrap=wrap_triton, max_user_keys=max_user_keys)


@triton_op("grc::norm_gate", mutates_args=())
def _norm_gate_op(
    a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu_u: bool = False
) -> torch.Tensor:
    if not runs_kernel(a):
        return _norm_gate_reference(a, u, weight, bias, eps, silu_u)
    return norm_gate_triton(a, u, weight, bias, eps, wrap=wrap_triton, silu_u=silu_u)


# A model's bias tables are nn.Parameters: plain tensors for this purpose (fake and functional tensors are other
# subclasses). Testing `type(t) is torch.Tensor` alone sent every model call through the op (the H200 profile of
# session 8 still showed the ops' dispatch in the eager steps).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _traced(x: torch.Tensor) -> bool:
    """Whether x is a compile's or export's stand-in (fake or functional: no data pointer to check)."""
    return type(x) not in _PLAIN


def _route(impl: str, first: torch.Tensor, *tensors: torch.Tensor) -> str:
    """Where a public call goes: "reference" (impl pytorch, or an eager call the kernel cannot run), "kernel" (an
    eager call: not compiling, not exporting, plain ``torch.Tensor`` inputs rather than fake or functional ones,
    no autograd: the kernel without the op's dispatch) or "op" (everything else: the grc:: op)."""
    if impl == "pytorch":
        return "reference"
    if torch.compiler.is_compiling():
        return "op"
    grad = torch.is_grad_enabled()
    if any(_traced(t) or (grad and t.requires_grad) for t in (first, *tensors)):
        return "op"
    return "kernel" if runs_kernel(first) else "reference"


@triton_op("grc::silu", mutates_args=())
def _silu_op(x: torch.Tensor) -> torch.Tensor:
    if not runs_kernel(x):
        return torch.nn.functional.silu(x)
    return silu_triton(x, wrap=wrap_triton)


def silu(x: torch.Tensor, impl: str = "triton") -> torch.Tensor:
    """SiLU as a pass of its own (kernels/silu.py says why): impl="triton" the ``grc::silu`` op (its Triton kernel
    on CUDA, F.silu elsewhere), "pytorch" F.silu."""
    _check_impl(impl)
    route = _route(impl, x)
    if route == "reference":
        return torch.nn.functional.silu(x)
    if route == "kernel":
        return silu_triton(x)
    return torch.ops.grc.silu(x)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    impl: str = "triton",
) -> torch.Tensor:
    """Jagged HSTU attention -> [T, H, Dv] in q's dtype.

    impl="triton": the ``grc::hstu_attention`` op (Triton on CUDA, reference elsewhere);
    impl="pytorch": the plain reference (any device, any float dtype incl. float64).
    """
    _check_impl(impl)
    args = (q, k, v, offsets, timestamps, num_candidates, pos_w, ts_w, float(alpha), float(norm), bool(causal))
    route = _route(impl, q, k, v, pos_w, ts_w)
    if route == "reference":
        return reference.hstu_attention(*args)
    if route == "kernel":
        if hstu_hopper.runs(q, k, v):
            return hstu_hopper.hstu_attention_hopper(q, k, v, offsets, *args[3:])
        return hstu_attention_triton(*args)
    return torch.ops.grc.hstu_attention(*args)


def hstu_attention_vqk(
    vqk: torch.Tensor,
    heads: int,
    head_qk: int,
    head_v: int,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    *,
    impl: str = "triton",
) -> torch.Tensor:
    """``hstu_attention`` of q, k, v as views of the activated projection ``vqk`` (vqk_views). Eagerly the same call
    on the views; compiled or exported, one ``grc::hstu_attention_vqk`` node taking ``vqk`` whole, so Inductor
    writes it as one buffer in one pass where three view inputs got a buffer and a kernel each
    (bench/inductor_view_inputs.py; grc.model.hstu.PACKED_VQK)."""
    _check_impl(impl)
    consts = (float(alpha), float(norm), bool(causal))
    if _route(impl, vqk, pos_w, ts_w) != "op":
        q, k, v = vqk_views(vqk, heads, head_qk, head_v)
        return hstu_attention(q, k, v, offsets, timestamps, num_candidates, pos_w, ts_w, *consts, impl=impl)
    return torch.ops.grc.hstu_attention_vqk(
        vqk, heads, head_qk, head_v, offsets, timestamps, num_candidates, pos_w, ts_w, *consts
    )


def hstu_attention_gate_vqk(
    vqk: torch.Tensor,
    u: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    eps: float,
    heads: int,
    head_qk: int,
    head_v: int,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    *,
    impl: str = "triton",
) -> torch.Tensor:
    """norm_gate(hstu_attention_vqk(vqk, ...) as [T, H*Dv], u, gate_w, gate_b, eps, silu_u=True): the attention and
    the norm-gate after it. Eagerly those two calls; compiled or exported, one ``grc::hstu_attention_gate_vqk`` node,
    whose Gluon path lets the norm-gate kernel add the attention's key parts (grc.model.hstu.ATTENTION_GATE)."""
    _check_impl(impl)
    consts = (float(alpha), float(norm), bool(causal))
    args = (offsets, timestamps, num_candidates, pos_w, ts_w, *consts)
    route = _route(impl, vqk, u, pos_w, ts_w, gate_w, gate_b)
    q, k, v = vqk_views(vqk, heads, head_qk, head_v)
    if route == "kernel" and hstu_hopper.runs(q, k, v):  # eagerly too: the key parts added in the norm-gate kernel
        return _gate_hopper(vqk, (u, gate_w, gate_b, float(eps)), (heads, head_qk, head_v), args)
    if route != "op":
        attn = hstu_attention_vqk(vqk, heads, head_qk, head_v, *args, impl=impl)
        return norm_gate(attn.reshape(attn.shape[0], -1), u, gate_w, gate_b, eps, impl=impl, silu_u=True)
    return torch.ops.grc.hstu_attention_gate_vqk(vqk, u, gate_w, gate_b, float(eps), heads, head_qk, head_v, *args)


def norm_gate(
    a: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    impl: str = "triton",
    silu_u: bool = False,
) -> torch.Tensor:
    """LayerNorm(a) * u over the last dim, in a's dtype; impl as for hstu_attention; silu_u: u is the projection's
    output before SiLU (the kernel applies it; the reference path first): grc.model.hstu.CONSUMER_SILU."""
    _check_impl(impl)
    route = _route(impl, a, u, weight, bias)
    if route == "reference":
        return _norm_gate_reference(a, u, weight, bias, eps, silu_u)
    if route == "kernel":
        return norm_gate_triton(a, u, weight, bias, float(eps), silu_u=bool(silu_u))
    return torch.ops.grc.norm_gate(a, u, weight, bias, float(eps), silu_u=bool(silu_u))


def hstu_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    kv_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_candidates: torch.Tensor,
    pos_w: torch.Tensor,
    ts_w: torch.Tensor,
    alpha: float,
    norm: float,
    causal: bool,
    impl: str = "triton",
    max_user_keys: int | None = None,
) -> torch.Tensor:
    """Queries against cached keys -> [Tq, H, Dv]: the history cache's attention (see
    ``reference.hstu_attention_cached`` for the contract: per user the queries are the last
    ``q_offsets`` rows of the sequence whose keys/values/timestamps ``kv_offsets`` delimit; as [users, 2]
    (start, end) ranges, anywhere in k and v, with ``max_user_keys`` bounding one user's keys: the arena).

    impl="pytorch": the reference. impl="triton": the ``grc::hstu_attention_cached`` op (the
    Triton kernel on CUDA, where a user with more queries than keys gets NaN rows since a kernel
    cannot raise; the reference, which raises, elsewhere).
    """
    _check_impl(impl)
    args = (
        q,
        k,
        v,
        q_offsets,
        kv_offsets,
        timestamps,
        num_candidates,
        pos_w,
        ts_w,
        float(alpha),
        float(norm),
        bool(causal),
    )
    route = _route(impl, q, k, v, pos_w, ts_w)
    if route == "reference":
        return reference.hstu_attention_cached(*args)
    if route == "kernel":
        if hstu_hopper.runs(q, k, v):
            return hstu_hopper.hstu_attention_hopper(*args, max_user_keys=max_user_keys)
        return hstu_attention_cached_triton(*args, max_user_keys=max_user_keys)
    return torch.ops.grc.hstu_attention_cached(*args, max_user_keys=max_user_keys)
