"""Runs the fused-linear Triton kernels under TRITON_INTERPRET=1; prints one JSON line of
{case: ||out - ref|| / ||ref||} against the float64 twins. Started by test_fused_linear.py (the
interpreter flag must be set before the kernels are decorated, so never in the pytest process).
Usage: python fused_worker.py DTYPE SEED
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kernels import tma_linear  # noqa: E402
from kernels.fused_heads import candidate_heads_reference, candidate_heads_triton  # noqa: E402
from kernels.fused_linear import (  # noqa: E402
    GROUP_NORM,
    NO_NORM,
    NORM_GATE,
    RESIDUAL,
    SILU,
    KVInto,
    fused_linear_triton,
    gated_linear_residual_reference,
    linear_residual_reference,
    linear_silu_into,
    linear_silu_reference,
    norm_linear_silu_reference,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():  # a NaN left from the poisoned buffer: a tile not written
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def case(gen: torch.Generator, dtype: torch.dtype, rows: int, k: int, n: int, prologue: int) -> float:
    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale + shift).to(dtype)

    x = randn(rows, k, scale=2.0, shift=0.5)  # a non-zero mean: the norm must remove it
    weight, bias = randn(n, k, scale=k**-0.5), randn(n, scale=0.3)
    poisoned = torch.full((rows, n), float("nan"), dtype=dtype)
    if prologue == GROUP_NORM:
        groups = 3
        group = torch.randint(0, groups, (rows,), generator=gen)
        gamma, beta = randn(groups, k, shift=1.0), randn(groups, k, scale=0.5)
        out = fused_linear_triton(
            x, weight, bias, GROUP_NORM, SILU, gamma=gamma, beta=beta, eps=1e-5, group=group, out=poisoned
        )
        ref = norm_linear_silu_reference(
            x.double(), group, gamma.double(), beta.double(), weight.double(), bias.double(), 1e-5
        )
        return rel_err(out, ref)
    if prologue == NO_NORM:  # the epilogues alone (the norm run apart)
        residual = randn(rows, n)
        silu = fused_linear_triton(x, weight, bias, NO_NORM, SILU, out=poisoned.clone())
        added = fused_linear_triton(x, weight, bias, NO_NORM, RESIDUAL, residual=residual, out=poisoned)
        x64, w64, b64 = x.double(), weight.double(), bias.double()
        return max(
            rel_err(silu, linear_silu_reference(x64, w64, b64)),
            rel_err(added, linear_residual_reference(x64, w64, b64, residual.double())),
        )
    u, residual = randn(rows, k), randn(rows, n)
    nw, nb = randn(k, shift=1.0), randn(k, scale=0.5)
    out = fused_linear_triton(
        x, weight, bias, NORM_GATE, RESIDUAL, gamma=nw, beta=nb, eps=1e-5, u=u, residual=residual, out=poisoned
    )
    ref = gated_linear_residual_reference(
        x.double(), u.double(), nw.double(), nb.double(), weight.double(), bias.double(), residual.double(), 1e-5
    )
    return rel_err(out, ref)


def tma_case(gen: torch.Generator, dtype: torch.dtype, rows: int, k: int, n: int, subtile: bool) -> float:
    """The TMA GEMM (kernels/tma_linear.py) behind fused_linear's NO_NORM calls, both epilogues, through the op's
    launcher with gemm="tma": 16-wide tiles over 3 programs (each loops over several tiles), the epilogue whole or in
    halves."""
    x = (torch.randn(rows, k, generator=gen) * 2 + 0.5).to(dtype)
    weight = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
    bias = (torch.randn(n, generator=gen) * 0.3).to(dtype)
    residual = torch.randn(rows, n, generator=gen).to(dtype)
    config = tma_linear.Config(16, 16, 16, group_m=2, stages=1, warps=1, subtile=subtile)
    poisoned = torch.full((rows, n), float("nan"), dtype=dtype)
    silu = fused_linear_triton(x, weight, bias, NO_NORM, SILU, out=poisoned.clone(), gemm="tma", config=config)
    added = fused_linear_triton(x, weight, bias, NO_NORM, RESIDUAL, residual=residual, out=poisoned, gemm="tma",
                                config=config)  # fmt: skip
    x64, w64, b64 = x.double(), weight.double(), bias.double()
    return max(
        rel_err(silu, linear_silu_reference(x64, w64, b64)),
        rel_err(added, linear_residual_reference(x64, w64, b64, residual.double())),
    )


def tma_refuses_unaligned_rows(dtype: torch.dtype) -> float:
    """K = 12 16-bit values per row is 24 bytes: no TMA tile. 0.0 when the launcher refuses it naming why, else inf
    (nothing else may run it in the TMA kernel's place)."""
    x, weight = torch.ones(4, 12, dtype=dtype), torch.ones(16, 12, dtype=dtype)
    try:
        fused_linear_triton(x, weight, torch.zeros(16, dtype=dtype), NO_NORM, SILU, gemm="tma")
    except ValueError as exc:
        return 0.0 if "16-byte-aligned rows" in str(exc) else float("inf")
    return float("inf")


def heads_case(gen: torch.Generator, dtype: torch.dtype, lengths: list[int], ncands: list[int], hidden: int) -> float:
    """Users' last rows are candidates (some users none, one all): blocks with and without them."""
    d, tasks, groups = 40, 3, 3
    rows = sum(lengths)
    idx = torch.cat([torch.arange(n) for n in lengths])
    n_ctx = torch.cat([torch.full((n,), n - c) for n, c in zip(lengths, ncands, strict=True)])
    is_candidate = idx >= n_ctx
    group = torch.randint(0, groups, (rows,), generator=gen)
    x = (torch.randn(rows, d, generator=gen) * 2 + 0.5).to(dtype)
    gamma = (torch.randn(groups, d, generator=gen) + 1).to(dtype)
    beta = (torch.randn(groups, d, generator=gen) * 0.5).to(dtype)
    w1 = (torch.randn(tasks, d, hidden, generator=gen) * d**-0.5).to(dtype)
    b1, w2 = (
        (torch.randn(tasks, hidden, generator=gen) * 0.3).to(dtype),
        torch.randn(tasks, hidden, generator=gen).to(dtype),
    )
    b2 = torch.randn(tasks, generator=gen).to(dtype)
    poisoned = torch.full((rows, tasks), float("nan"), dtype=dtype)
    out = candidate_heads_triton(x, group, is_candidate, gamma, beta, w1, b1, w2, b2, 1e-5, out=poisoned)
    g64, be64, w1_64, b1_64, w2_64, b2_64 = (t.double() for t in (gamma, beta, w1, b1, w2, b2))
    ref = candidate_heads_reference(x.double(), group, is_candidate, g64, be64, w1_64, b1_64, w2_64, b2_64, 1e-5)
    if bool((out[~is_candidate] != 0).any()):
        return float("inf")  # a non-candidate row scored: the contract is zeros there
    return rel_err(out, ref)


def scatter_case(gen: torch.Generator, dtype: torch.dtype, rows: int, prologue: int) -> float:
    """The UVQK GEMM with its K and V columns also stored into a cache's rows (KVInto): heads 2, Dqk 6, Dv 4, so
    N = 40 and the 16-wide tiles straddle u|v, q|k. The rel. error vs float64, or inf when the scattered rows are
    not the output's K and V columns bit for bit, or anything else of the NaN-filled rows was written."""
    heads, dqk, dv, k_in, cache_rows = 2, 6, 4, 24, 3 * rows
    lin, att = heads * dv, heads * dqk
    n = 2 * lin + 2 * att
    x = (torch.randn(rows, k_in, generator=gen) * 2 + 0.5).to(dtype)
    weight = (torch.randn(n, k_in, generator=gen) * k_in**-0.5).to(dtype)
    bias = (torch.randn(n, generator=gen) * 0.3).to(dtype)
    cache = torch.full((cache_rows, 2 * (att + lin)), float("nan"), dtype=dtype)  # two layers' K|V per row
    keys = cache[:, att + lin : 2 * att + lin].unflatten(1, (heads, dqk))  # layer 1's views, as KVLayout.split
    values = cache[:, 2 * att + lin :].unflatten(1, (heads, dv))
    slots = torch.randperm(cache_rows, generator=gen)[:rows]
    into = KVInto(keys, values, slots, k_col=2 * lin + att, v_col=lin)
    if prologue == GROUP_NORM:
        group = torch.randint(0, 3, (rows,), generator=gen)
        gamma, beta = (torch.randn(3, k_in, generator=gen) + 1).to(dtype), torch.randn(3, k_in, generator=gen).to(dtype)
        out = linear_silu_into(x, weight, bias, into, norm=(group, gamma, beta, 1e-5))
        alone = fused_linear_triton(x, weight, bias, GROUP_NORM, SILU, gamma=gamma, beta=beta, eps=1e-5, group=group)
        ref = norm_linear_silu_reference(
            x.double(), group, gamma.double(), beta.double(), weight.double(), bias.double(), 1e-5
        )
    else:
        out = linear_silu_into(x, weight, bias, into)
        alone = fused_linear_triton(x, weight, bias, NO_NORM, SILU)
        ref = linear_silu_reference(x.double(), weight.double(), bias.double())
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[slots, att + lin :] = True
    exact = (
        torch.equal(out, alone)
        and torch.equal(keys[slots].flatten(1), out[:, 2 * lin + att :])
        and torch.equal(values[slots].flatten(1), out[:, lin : 2 * lin])
        and bool(torch.isnan(cache[~written]).all())
    )
    return rel_err(out, ref) if exact else float("inf")


def main(dtype_name: str, seed: int) -> None:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    results = {}
    # Tails in every dimension (rows 37, K 40 = 2.5 blocks of 16, N 24 = 1.5 tiles), one even shape.
    for rows, k, n in ((37, 40, 24), (32, 64, 48), (1, 16, 16)):
        for name, prologue in (
            ("norm_linear_silu", GROUP_NORM),
            ("gated_linear_residual", NORM_GATE),
            ("linear_silu + linear_residual", NO_NORM),
        ):
            results[f"{name} {rows}x{k}->{n}"] = case(gen, dtype, rows, k, n, prologue)
    for rows in (37, 16):
        results[f"linear_silu_into {rows} rows"] = scatter_case(gen, dtype, rows, NO_NORM)
        results[f"linear_silu_into {rows} rows, group norm prologue"] = scatter_case(gen, dtype, rows, GROUP_NORM)
    if dtype != torch.float32:  # the TMA GEMM takes 16-bit operands only (float32 keeps the ieee kernel)
        for rows, k, n in ((37, 40, 24), (70, 48, 48), (1, 16, 16)):
            for subtile in (True, False):
                results[f"tma linear_silu + linear_residual {rows}x{k}->{n} subtile {subtile}"] = tma_case(
                    gen, dtype, rows, k, n, subtile
                )
        results["tma refuses 24-byte rows"] = tma_refuses_unaligned_rows(dtype)
    # 100 rows: blocks of 16 with no candidate (skipped), mixed ones and all-candidate ones.
    results["candidate_heads hidden 24"] = heads_case(gen, dtype, [30, 7, 40, 23], [5, 0, 40, 9], 24)
    # 32 candidate rows, not 3: with 3 rows x 3 tasks a draw of near-cancelling outputs made ||ref|| small and the
    # bf16 relative error seed-dependent (1 seed in 40 over 5e-3, CI 2026-12-02); with 32 the worst of 40 is 2.8e-3
    results["candidate_heads hidden 32"] = heads_case(gen, dtype, [50, 30], [12, 20], 32)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
