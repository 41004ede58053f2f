"""The fused kernels (kernels/fused_*.py) compile for Hopper (sm90) on this CPU host through
Triton's own ptxas, with the float32 and the float64 eps (what torch.compile / AOTInductor pass),
their GEMMs on Hopper's warpgroup tensor cores (wgmma) and no float64 arithmetic."""

from __future__ import annotations

import re
from typing import Any

import pytest
import triton

from kernels.fused_heads import _candidate_heads_kernel
from kernels.fused_linear import _fused_linear_kernel, _row_stats_kernel
from tests.kernels.test_hopper_compile import HOPPER, compile_for_hopper

GEMM_PTRS = {n: "*bf16" for n in ("X", "Gamma", "Beta", "U", "W", "Bias", "R", "Y", "KS", "VS")}
GEMM_PTRS |= {"Stats": "*fp32", "G": "*i64", "Slots": "*i64"}
GEMM_CONST = {"N": 2048, "K": 512, "OPERAND": 0, "DOT_PREC": "tf32", "EVEN_K": True, "BLOCK_M": 128, "BLOCK_N": 128,
              "BLOCK_K": 64, "SCATTER": False, "K_COL": 0, "K_W": 0, "V_COL": 0, "V_W": 0}  # fmt: skip
# The history step's UVQK GEMM (KVInto): mtgr-base's widths, u | v | q | k of 768 each
SCATTER_CONST = {"SCATTER": True, "N": 3072, "K": 768, "K_COL": 2304, "K_W": 768, "V_COL": 768, "V_W": 768}
HEADS_PTRS = {n: "*bf16" for n in ("X", "Gamma", "Beta", "W1", "B1", "W2", "B2", "Y")}
HEADS_PTRS |= {"Stats": "*fp32", "G": "*i64", "Cand": "*i8"}
HEADS_CONST = {"K": 512, "HIDDEN": 128, "OPERAND": 0, "DOT_PREC": "tf32", "EVEN_K": True, "BLOCK_M": 64,
               "BLOCK_H": 128, "BLOCK_K": 64}  # fmt: skip


def _no_fp64_math(ptx: str) -> bool:
    return set(re.findall(r"\b\w+(?:\.\w+)*\.f64\b", ptx)) <= {"cvt.rn.f32.f64"}


@pytest.mark.parametrize(
    "prologue, epilogue",
    [(0, 0), (1, 1), (2, 0), (2, 1)],
    ids=["norm_linear_silu", "gated_linear_residual", "linear_silu", "linear_residual"],
)
def test_fused_linear_compiles_for_sm90(prologue: int, epilogue: int) -> None:
    const = {**GEMM_CONST, "PROLOGUE": prologue, "EPILOGUE": epilogue}
    ptx = compile_for_hopper(_fused_linear_kernel, GEMM_PTRS, const, (), "fp32")
    assert ".target sm_90" in ptx and "wgmma" in ptx


@pytest.mark.parametrize("prologue", [0, 2], ids=["group_norm_prologue", "norm_apart"])
def test_the_scattering_uvqk_gemm_compiles_for_sm90(prologue: int) -> None:
    """SCATTER (the history step's K/V rows stored by the epilogue) keeps the GEMM on wgmma, and each tuned tile
    fits Hopper's shared memory with it."""
    from kernels.fused_linear import _configs

    const = {**GEMM_CONST, **SCATTER_CONST, "PROLOGUE": prologue, "EPILOGUE": 0}
    ptx = compile_for_hopper(_fused_linear_kernel, GEMM_PTRS, const, (), "fp32")
    assert ".target sm_90" in ptx and "wgmma" in ptx
    plain = compile_for_hopper(_fused_linear_kernel, GEMM_PTRS, {**const, "SCATTER": False}, (), "fp32")
    assert ptx.count("st.global") == 3 * plain.count("st.global"), "the K and V stores beside Y's"
    for config in _configs():
        compiled = _compile_specialised(_fused_linear_kernel.fn, GEMM_PTRS, {**const, **config.kwargs, "stride_wk": 1},
                                        config.num_warps, config.num_stages)  # fmt: skip
        assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{config} prologue {prologue}"


def test_candidate_heads_compiles_for_sm90() -> None:
    ptx = compile_for_hopper(_candidate_heads_kernel, HEADS_PTRS, HEADS_CONST, (), "fp32")
    assert ".target sm_90" in ptx and "wgmma" in ptx


@pytest.mark.parametrize("float_type", ["fp32", "fp64"])
def test_row_stats_compile_for_sm90(float_type: str) -> None:
    const = {"C": 512, "BLOCK_R": 8, "BLOCK_C": 512}
    ptx = compile_for_hopper(_row_stats_kernel, {"X": "*bf16", "Stats": "*fp32"}, const, ("eps",), float_type)
    assert ".target sm_90" in ptx and _no_fp64_math(ptx)


@pytest.mark.parametrize("which", ["fused_linear", "candidate_heads"])
def test_inductors_copy_of_the_kernels_compiles(which: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """torch.compile and AOTInductor re-emit a user kernel and the jit functions it calls from their
    source, under their def names: a helper imported under another name would be undefined there."""
    import importlib.util

    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    kernel, ptrs, const = {
        "fused_linear": (_fused_linear_kernel.fn, GEMM_PTRS, {**GEMM_CONST, "PROLOGUE": 0, "EPILOGUE": 0}),
        "candidate_heads": (_candidate_heads_kernel, HEADS_PTRS, HEADS_CONST),
    }[which]
    source = user_defined_triton_kernel_transitive_closure_source_code(kernel)
    path = tmp_path / f"inductor_copy_{which}.py"  # @triton.jit needs its source in a file
    path.write_text(f"import triton\nimport triton.language as tl\n\n@triton.jit\n{source}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ptx = compile_for_hopper(getattr(module, kernel.__name__), ptrs, const, (), "fp32")
    assert ".target sm_90" in ptx and "wgmma" in ptx


HOPPER_SHARED_BYTES = 227 * 1024  # the H100/H200 per-block limit


def _compile_specialised(kernel, ptrs: dict[str, str], const: dict, warps: int, stages: int):  # type: ignore[no-untyped-def]
    """As a launch specialises it: unit strides constant, pointers and other strides multiples of
    16 (what makes Triton pipeline the loads through shared memory)."""
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ptrs.get(n) or ("constexpr" if n in const else "i32") for n in names}
    aligned = [n for n in names if n in ptrs or (n.startswith("stride_") and n not in const)]
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})  # fmt: skip
    try:
        return triton.compile(source, target=HOPPER, options={"num_warps": warps, "num_stages": stages})
    except FileNotFoundError as exc:
        pytest.skip(f"Triton cannot build sm90 code here: {exc}")


def test_every_tuned_config_fits_hoppers_shared_memory() -> None:
    """A config over the limit cannot launch, and AOTInductor autotunes (and compiles) every one:
    each tile of _configs() with each prologue, pipelined as a launch specialises it."""
    from kernels.fused_linear import _configs

    for config in _configs():
        for prologue, epilogue in ((0, 0), (1, 1), (2, 0)):
            const = {**GEMM_CONST, **config.kwargs, "PROLOGUE": prologue, "EPILOGUE": epilogue, "stride_wk": 1}
            compiled = _compile_specialised(_fused_linear_kernel.fn, GEMM_PTRS, const, config.num_warps,
                                            config.num_stages)  # fmt: skip
            assert "cp.async" in compiled.asm["ptx"], f"{config} prologue {prologue}: loads not pipelined"
            assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"{config} prologue {prologue}"
    for hidden, warps in ((128, 4), (256, 8)):  # the heads kernel at mtgr-small's and mtgr-base's widths
        const = {**HEADS_CONST, "HIDDEN": hidden, "BLOCK_H": hidden, "stride_w1h": 1}
        compiled = _compile_specialised(_candidate_heads_kernel, HEADS_PTRS, const, warps, 3)
        assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, f"heads hidden {hidden}"


def test_the_key_split_finish_compiles_for_sm90() -> None:
    """The one kernel that adds a key split's fp32 parts (kernels.hstu_attention.finish_parts) into bf16."""
    from kernels.hstu_attention import _sum_parts_kernel

    ptx = compile_for_hopper(_sum_parts_kernel, {"Parts": "*fp32", "Out": "*bf16"},
                             {"PARTS": 8, "ROUND_BF16": False, "BLOCK": 1024}, (), "fp32")  # fmt: skip
    assert ".target sm_90" in ptx and "cvt.rn.bf16" in ptx


def _compile_tma_linear(config_name: str, epilogue: int, source: Any = None) -> Any:
    """kernels/tma_linear.py's GEMM for sm_90a as a launch of ``config_name`` specialises it: mtgr-small's UVQK widths
    (K 512 -> N 2048), bf16, one program per H100/H200 SM. ``source``: the kernel to compile (default the module's)."""
    import torch
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kernels.tma_linear import CONFIGS, _tma_linear_kernel
    from tests.kernels.test_hopper_compile import compile_kernel

    c = CONFIGS[config_name]
    part = c.block_n // 2 if c.subtile else c.block_n

    def desc(columns: int, rows: int, cols: int) -> str:
        return str(mangle_type(TensorDescriptor.from_tensor(torch.empty(256, columns, dtype=torch.bfloat16),
                                                            [rows, cols])))  # fmt: skip

    descs = {"x_desc": desc(512, c.block_m, c.block_k), "w_desc": desc(512, c.block_n, c.block_k),
             "y_desc": desc(2048, c.block_m, part), "r_desc": desc(2048, c.block_m, part)}  # fmt: skip
    const = {"N": 2048, "K": 512, "EPILOGUE": epilogue, "UPCAST": False, "ROUND_BF16": False, "PROGRAMS": 132,
             "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m,
             "SUBTILE": c.subtile, "FLATTEN": c.flatten}  # fmt: skip
    options = {"num_warps": c.warps, "num_stages": c.stages}
    return compile_kernel(source or _tma_linear_kernel, {"Bias": "*bf16"}, const, (), "fp32", options, descs)


@pytest.mark.parametrize("epilogue", [0, 1], ids=["silu", "residual"])
@pytest.mark.parametrize("config_name", sorted(__import__("kernels.tma_linear").tma_linear.CONFIGS))
def test_the_tma_gemm_compiles_into_the_hopper_pipeline(config_name: str, epilogue: int) -> None:
    """Each listed config of the TMA GEMM: tiles loaded and the output stored by TMA, wgmma issued asynchronously
    (one group left in flight), no register spills, within Hopper's shared memory (a config over it cannot launch)."""
    from tests.kernels.test_hopper_compile import ptxas_report

    compiled = _compile_tma_linear(config_name, epilogue)
    ptx = compiled.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx), "every wgmma waited at once: no overlap"
    assert "cp.async.bulk.tensor.2d.shared" in ptx, "tiles not loaded by TMA"
    assert "cp.async.bulk.tensor.2d.global" in ptx, "output not stored by TMA"
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, config_name
    report = ptxas_report(ptx)
    assert re.search(r"\b0 bytes spill stores", report) and "C7515" not in report, report[-1500:]


def test_inductors_copy_of_the_tma_gemm_compiles(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As for the fused kernels above: the TMA GEMM and its jit helpers (_tile, _finish, _round_to_bf16) re-emitted by
    their def names compile, so a package traced with fused_linear.GEMM = "tma" builds."""
    import importlib.util

    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    from kernels.tma_linear import DEFAULT, _tma_linear_kernel

    source = user_defined_triton_kernel_transitive_closure_source_code(_tma_linear_kernel)
    path = tmp_path / "inductor_copy_tma_linear.py"
    path.write_text(f"import triton\nimport triton.language as tl\n\n@triton.jit\n{source}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ptx = _compile_tma_linear(DEFAULT, 0, module._tma_linear_kernel).asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor.2d.shared" in ptx
