"""The kernels compile for Hopper (sm90) on this CPU host, through Triton's own ptxas: with the
float32 scalars the eager path passes, and with the float64 scalars torch.compile / AOTInductor
pass (Inductor's default for Python-float arguments since torch 2.10). Before the kernels cast
their scalars, the float64 signature failed to compile (seen on the H100 and reproduced here);
the PTX may convert those scalars once, and must hold no other float64 instruction.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from kernels.gather import _gather_concat_kernel
from kernels.hstu_attention import _hstu_fwd_kernel
from kernels.norm_gate import _group_norm_kernel, _norm_gate_kernel
from kernels.silu import _silu_kernel

HOPPER = GPUTarget("cuda", 90, 32)
ATTENTION_PTRS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "q_offsets": "*i64", "kv_offsets": "*i64",
                  "ts": "*i64", "ncand": "*i64", "time_tab": "*fp32", "pos_tab": "*fp32",
                  "far_tab": "*fp32"}  # fmt: skip
ATTENTION_CONST = {"CAUSAL": True, "FAST_SILU": True, "ALLOW_TS_FAST": True, "P": 64,
                   "DQK": 64, "DV": 64, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DQK": 64, "BLOCK_DV": 64,
                   "DOT_PREC": "ieee", "DOT_UPCAST": False, "PTX": 13, "ABLATE": 0, "SEARCH": 64,
                   "PARTIAL": False, "KV_STRIDE": 1}  # fmt: skip
NORM_PTRS = {"A": "*bf16", "U": "*bf16", "W": "*bf16", "Bias": "*bf16", "Y": "*bf16"}
NORM_CONST = {"C": 128, "BLOCK_R": 8, "BLOCK_C": 128, "ROUND_BF16": False, "SILU_U": True, "PARTS": 1}


def compile_kernel(jit: Any, ptrs: dict[str, str], const: dict[str, Any], floats: tuple[str, ...], float_type: str,
                   options: dict[str, Any] | None = None, descs: dict[str, str] | None = None) -> Any:  # fmt: skip
    """The kernel compiled for sm_90 as a GPU launch would specialise it (also bench/kernel_sass.py's and the Gluon
    kernel's test: a Gluon function compiles as Gluon; ``descs`` are its TMA descriptors' signature types)."""
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    fn = jit if isinstance(jit, JITFunction) else jit.fn  # the autotuner wraps the attention kernel
    names = fn.arg_names
    signature = dict(descs or {})
    for n in names:
        if n not in signature:
            signature[n] = ptrs.get(n) or ("constexpr" if n in const else float_type if n in floats else "i32")
    # What the launcher specialises on a GPU: pointers and strides divisible by 16 (16-byte loads).
    aligned = [n for n in names if n in ptrs or (n.startswith("stride_") and n != "stride_os")]
    source_type = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    source = source_type(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})  # fmt: skip
    try:
        return triton.compile(source, target=HOPPER, options=options or {"num_warps": 4, "num_stages": 2})
    except FileNotFoundError as exc:  # no ptxas beside the triton package
        pytest.skip(f"Triton cannot build sm90 code here: {exc}")


def ptxas_report(ptx: str) -> str:
    """ptxas -v's report on compiling the PTX for sm_90a (fails the test if ptxas fails)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def compile_for_hopper(jit: Any, ptrs: dict[str, str], const: dict[str, Any], floats: tuple[str, ...],
                       float_type: str) -> str:  # fmt: skip
    return str(compile_kernel(jit, ptrs, const, floats, float_type).asm["ptx"])


F64_TIME_GAPS = {"sub.f64", "abs.f64", "add.f64", "sub.rn.f64", "add.rn.f64"}


@pytest.mark.parametrize("float_type", ["fp32", "fp64"])
def test_attention_compiles_for_sm90(float_type: str) -> None:
    ptx = compile_for_hopper(_hstu_fwd_kernel, ATTENTION_PTRS, ATTENTION_CONST, ("alpha", "inv_norm"), float_type)
    assert ".target sm_90" in ptx and "mma" in ptx  # tensor-core code, not a scalar fallback
    assert "cvt.rz.f32.s32" in ptx and "ld.global.nc.f32" in ptx  # the GPU variant's PTX time bucket and loads
    assert "shfl.sync.idx.b32" in ptx and "%laneid" in ptx  # time / far tables from the warp's registers
    # float64 only where meant: the unmasked blocks' time gaps (exact integers; _exponent_bits), never the scores
    # (a float64 scalar argument would otherwise promote the fp32 accumulator: mul / fma .f64)
    assert set(re.findall(r"\b\w+(?:\.\w+)*\.f64\b", ptx)) <= {"cvt.rn.f32.f64", *F64_TIME_GAPS}


@pytest.mark.parametrize("float_type", ["fp32", "fp64"])
def test_norm_gate_compiles_for_sm90(float_type: str) -> None:
    """The norm-gate of a bf16 attention output, and of an attention's three fp32 key parts (norm_gate_parts_triton):
    fp32 math, no float64 but eps' conversion."""
    parts = ({**NORM_PTRS, "A": "*fp32"}, {**NORM_CONST, "PARTS": 3})
    for ptrs, const in ((NORM_PTRS, NORM_CONST), parts):
        ptx = compile_for_hopper(_norm_gate_kernel, ptrs, const, ("eps",), float_type)
        assert ".target sm_90" in ptx
        assert set(re.findall(r"\b\w+(?:\.\w+)*\.f64\b", ptx)) <= {"cvt.rn.f32.f64"}


def test_group_norm_compiles_for_sm90() -> None:
    """The history cache step's group LayerNorm (kernels/norm_gate.py): int64 group ids, fp32 math, no float64."""
    ptrs = {"A": "*bf16", "G": "*i64", "W": "*bf16", "Bias": "*bf16", "Y": "*bf16"}
    const = {"C": 512, "BLOCK_R": 8, "BLOCK_C": 512, "ROUND_BF16": False}
    ptx = compile_for_hopper(_group_norm_kernel, ptrs, const, ("eps",), "fp32")
    assert ".target sm_90" in ptx
    assert set(re.findall(r"\b\w+(?:\.\w+)*\.f64\b", ptx)) <= {"cvt.rn.f32.f64"}


def test_attention_wgmma_not_serialised() -> None:
    """ptxas serialises every wgmma of a kernel (each waits for the one before; warning C7515) when
    non-wgmma code defines accumulator registers inside a pipeline stage. An if/else choosing
    between the int32 key loops and the int64 loop did that; the kernel now picks by empty ranges."""
    ptx = compile_for_hopper(_hstu_fwd_kernel, ATTENTION_PTRS, ATTENTION_CONST, ("alpha", "inv_norm"), "fp32")
    report = ptxas_report(ptx)
    assert "C7515" not in report, report[-2000:]


def test_silu_compiles_for_sm90() -> None:
    """grc::silu's kernel (engine.aoti.silu_apart): bf16 in and out, computed in fp32 (no float64 anywhere)."""
    ptx = compile_for_hopper(_silu_kernel, {"X": "*bf16", "Y": "*bf16"},
                             {"BLOCK": 1024, "F64": False, "ROUND_BF16": False}, (), "fp32")  # fmt: skip
    assert ".target sm_90" in ptx and "ex2.approx" in ptx
    assert not re.findall(r"\b\w+(?:\.\w+)*\.f64\b", ptx)


def test_register_caps_reach_the_autotuner() -> None:
    """A config tuple's fifth element (kernels.hstu_attention.CONFIGS) becomes the launch's maxnreg, and the
    autotuner's per-head-dim pruning keeps capped and uncapped shapes alike (each listed shape, nothing else)."""
    from kernels.hstu_attention import CONFIGS, _configs, _configs_for_head_dim, _launch_options

    assert _launch_options((64, 32, 4, 3, 168)) == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3,
                                                    "maxnreg": 168}  # fmt: skip
    assert "maxnreg" not in _launch_options((64, 32, 4, 3))
    configs = _configs()
    for dim, listed in CONFIGS.items():
        kept = _configs_for_head_dim(configs, {}, BLOCK_DQK=dim, BLOCK_DV=dim)
        got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg) for c in kept}
        assert got == {(*shape[:4], shape[4] if len(shape) > 4 else None) for shape in listed}, dim


def test_gather_concat_compiles_for_sm90() -> None:
    """The fused Ranker's one-kernel lookups (kernels/gather.py), as mtgr-base's candidates call it: two bf16 tables
    and the float32 cross features into float32 columns; int64 ids, no float64."""
    ptrs = {"out": "*fp32", "T0": "*bf16", "I0": "*i64", "T1": "*bf16", "I1": "*i64", "T2": "*bf16", "I2": "*i64",
            "T3": "*bf16", "I3": "*i64", "E": "*fp32"}  # fmt: skip
    const = {"PARTS": 2, "EXTRA": True, "BLOCK_R": 16, "BLOCK_D": 128}
    ptx = compile_for_hopper(_gather_concat_kernel, ptrs, const, (), "fp32")
    assert ".target sm_90" in ptx and "cvt.f32.bf16" in ptx
    assert not re.findall(r"\b\w+(?:\.\w+)*\.f64\b", ptx)
