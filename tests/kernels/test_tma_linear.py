"""The TMA GEMM (kernels/tma_linear.py) behind fused_linear's NO_NORM calls with gemm "tma".

On this CPU host: the launcher's refusals (test_fused_linear.py runs the kernel itself under the interpreter,
test_fused_hopper_compile.py compiles it for sm_90a). On an sm90 GPU: every listed config at the HSTU widths against
the float64 twins on fresh inputs with a NaN-poisoned output, and a compiled graph refusing it by name (torch 2.11's
Inductor cannot hold the host descriptors the op builds: session 24).
"""

from __future__ import annotations

import secrets

import pytest
import torch

from kernels import fused_linear as fl
from kernels.tma_linear import CONFIGS

BOUNDS = {torch.float16: 1e-3, torch.bfloat16: 1e-2}  # as test_fused_linear.py's (two roundings' worth for bf16)


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm90 GPU (H100/H200: TMA and wgmma); none here")


def test_an_unknown_gemm_is_refused() -> None:
    x, w = torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gemm 'cublas', expected one of"):
        fl.fused_linear_triton(x, w, torch.zeros(16, dtype=torch.bfloat16), fl.NO_NORM, fl.SILU, gemm="cublas")


@pytest.mark.skipif(_sm90() or fl.INTERPRET, reason="runs where the TMA kernel cannot: no sm90 GPU, no interpreter")
def test_tma_is_refused_where_it_cannot_run_naming_why() -> None:
    """Asked for by name, the TMA GEMM runs or raises: nothing else runs in its place."""
    bf16, f32 = torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(4, 16)
    with pytest.raises(ValueError, match="needs an sm90 GPU"):
        fl.fused_linear_triton(bf16, bf16[:1].expand(16, 16).contiguous(), bf16[0], fl.NO_NORM, fl.SILU, gemm="tma")
    with pytest.raises(ValueError, match="16-bit operands"):
        fl.fused_linear_triton(f32, torch.ones(16, 16), f32[0], fl.NO_NORM, fl.SILU, gemm="tma")


def _case(rows: int, k: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale + shift).to("cuda", dtype)

    return randn(rows, k, scale=2.0, shift=0.5), randn(n, k, scale=k**-0.5), randn(n, scale=0.3), randn(rows, n)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    return float("inf") if not torch.isfinite(out).all() else float((out - ref).norm() / ref.norm())


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_every_config_matches_float64_at_the_hstu_widths(config_name: str, dtype: torch.dtype) -> None:
    """mtgr-small's UVQK (512 -> 2048) and output (512 -> 512 + residual) projections on 1,515 rows (a row tail in
    every tile height), and mtgr-base's (768 -> 3072, 768 -> 768)."""
    seed = secrets.randbits(31)
    gen = torch.Generator().manual_seed(seed)
    for k, n in ((512, 2048), (512, 512), (768, 3072), (768, 768)):
        x, w, b, r = _case(1515, k, n, dtype, gen)
        x64, w64, b64 = x.double(), w.double(), b.double()
        for epilogue, ref in ((fl.SILU, fl.linear_silu_reference(x64, w64, b64)),
                              (fl.RESIDUAL, fl.linear_residual_reference(x64, w64, b64, r.double()))):  # fmt: skip
            out = torch.full((1515, n), float("nan"), device="cuda", dtype=dtype)
            fl.fused_linear_triton(x, w, b, fl.NO_NORM, epilogue, residual=r if epilogue else None, out=out,
                                   gemm="tma", config=CONFIGS[config_name])  # fmt: skip
            err = _rel(out, ref)
            assert err <= BOUNDS[dtype], f"{config_name} {k}->{n} epilogue {epilogue} seed={seed}: {err}"


@needs_sm90
def test_a_compiled_graph_refuses_the_tma_gemm_naming_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """grc::linear_silu traced by torch.compile with GEMM "tma": torch 2.11's Inductor loses the host descriptors a
    triton_op builds (session 24: KeyError 'x_desc', then a failed compile), so the launcher refuses a traced call
    saying so, and nothing else compiles in its place; the eager call still runs it."""
    monkeypatch.setattr(fl, "GEMM", "tma")
    gen = torch.Generator().manual_seed(secrets.randbits(31))
    x, w, b, _ = _case(700, 512, 2048, torch.bfloat16, gen)
    compiled = torch.compile(lambda x, w, b: fl.linear_silu(x, w, b), dynamic=True, fullgraph=True)
    with pytest.raises(Exception, match="not a compiled graph"):
        compiled(x, w, b)
    ref = fl.linear_silu_reference(x.double(), w.double(), b.double())
    assert _rel(fl.fused_linear_triton(x, w, b, fl.NO_NORM, fl.SILU, gemm="tma"), ref) <= BOUNDS[torch.bfloat16]
