"""Build one AOTInductor package per target: export, compile, parity, metadata.

Targets: ``cpu`` (float32; the grc ops run the PyTorch reference through the dispatcher),
``cuda`` (this host's GPU, the spec's dtype; the Triton kernels are compiled into the package) or
``sm<NN>`` (like cuda, but only on a GPU of that compute capability). A target whose device this
host lacks is returned as skipped with the reason: no package is ever written for it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from grc.aoti.inputs import JaggedInputs, random_inputs
from grc.aoti.loadcheck import check_loads
from grc.aoti.model import (
    INPUTS,
    MAX_TOKENS,
    MAX_USERS,
    OUTPUTS,
    JaggedDense,
    custom_ops,
    expected_ops,
    export_program,
    time_bucket_note,
)
from grc.build.atomic import write_file
from grc.build.fingerprint import sha256_file
from grc.cache.store import default_dir
from grc.errors import StageError
from grc.model.gr import GRDense
from grc.spec.schema import ModelConfig, Tolerance
from grc.verify.compare import Figure, compare
from kernels import hstu_hopper

PACKAGE = "model.pt2"
# the attention ops' nodes, and the Gluon kernel's node an export that traces into their bodies leaves in their place
TRACED_INTO = {
    "grc.hstu_attention_hopper.default": "grc.hstu_attention.default",
    "grc.hstu_attention_hopper_vqk.default": "grc.hstu_attention_vqk.default",
    "grc.hstu_attention_gate_hopper_vqk.default": "grc.hstu_attention_gate_vqk.default",
}
METADATA = "metadata.json"
FORMAT = "grc-aoti/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Checks = Callable[[Callable[..., torch.Tensor], torch.device, torch.dtype], dict[str, Any]]
# AOTInductor options. Precompiled headers cost ~15 s on a cold CPU build and save nothing here.
# Float scalars passed to the user Triton kernels (alpha, 1/norm, eps) arrive as fp64 by default
# since torch 2.10; the kernels now cast them to fp32 themselves (before that, Triton refused the
# attention kernel: "acc ... redefines it as fp64", H100, torch 2.11; tests/kernels/
# test_hopper_compile.py compiles both signatures for sm90). Kept here as a second guard.
# The attention kernel finds each program's users by scanning ``offsets``: Inductor's compile-time
# autotuning must run it on the real example inputs, not on its made-up ones (zeros for integer
# tensors), with which the scan reads past the end of ``offsets`` (an illegal address on the H100).
INDUCTOR_CONFIGS: dict[str, Any] = {
    "aot_inductor.precompile_headers": False,
    "_use_fp64_for_unbacked_floats": False,
    "triton.autotune_with_sample_inputs": True,
}


SYSTEM_CXX = "/usr/bin/g++"


def cxx_compiler() -> str | None:
    """The C++ compiler AOTInductor compiles the package with, as an absolute path, or None when
    there is none (Inductor then reports it); recorded in the metadata. ``$CXX`` when set (the
    user's choice), else the system's ``/usr/bin/g++`` when there is one, else ``g++`` on PATH.

    Why the system compiler before PATH: on the lent H200 image ``g++`` on PATH is
    ``/opt/gcc/bin/g++``, a wrapper around the same GCC 13.3 (it names itself ``g++-real``).
    Packages it built crashed when loaded (SIGSEGV in ``std::regex`` inside the model .so) unless
    the process preloaded libstdc++; the same package source built with ``/usr/bin/g++`` loaded
    and ran, plain (bench/results/aoti-probe-h200.json, bench/gpu_aoti_probe.py)."""
    wanted = os.environ.get("CXX")
    if wanted:
        found = shutil.which(wanted)
    elif os.path.isfile(SYSTEM_CXX) and os.access(SYSTEM_CXX, os.X_OK):
        found = SYSTEM_CXX
    else:
        found = shutil.which("g++")
    return os.path.abspath(found) if found else None


@contextlib.contextmanager
def compiler_shim() -> Iterator[str | None]:
    """Inductor compiles through a one-line script that execs the real compiler (``$CXX`` and
    Inductor's ``cpp.cxx`` both point at it while the package compiles); yields its path.

    Why (measured on the lent H200s, torch 2.11, Ubuntu g++ 13.3; cause not isolated): packages
    compiled with Inductor's default ``g++`` crashed when loaded (SIGSEGV in ``std::regex`` inside the
    model .so), 6 of 6 builds on two machines, CPU MLPs among them; with ``cpp.cxx`` set to
    ``/usr/bin/g++``, 3 of 4 on two machines; through such a script none of 10 builds on three
    machines (CPU MLPs, hstu-tiny cpu + cuda, mtgr-small and mtgr-base cuda: all loaded and matched
    their references). On one machine, side by side: default crashed, script and absolute path loaded
    (bench/results/aoti-host-probe-h200.json). The script passes every argument unchanged (logged
    command lines match), so the difference lies outside the flags. Named like the compiler: Inductor
    picks gcc or clang flags by that name. bench/results/e2e-notes.md has the runs."""
    real = cxx_compiler()
    if real is None:
        yield None
        return
    # kept in grc's cache folder, never deleted: Inductor compile workers started meanwhile keep
    # its path in their config for later compiles in this process
    text = f'#!/bin/sh\nexec {shlex.quote(real)} "$@"\n'
    shim = default_dir() / "cxx" / hashlib.sha256(text.encode()).hexdigest()[:16] / Path(real).name
    try:
        if not (shim.is_file() and shim.read_text() == text):
            write_file(shim, text.encode(), mode=0o755)  # atomic: no build runs a half-written script
    except OSError:  # grc's cache folder is not writable here: a private temporary one, left in place
        shim = Path(tempfile.mkdtemp(prefix="grc-cxx-")) / Path(real).name
        write_file(shim, text.encode(), mode=0o755)
    before = os.environ.get("CXX")
    os.environ["CXX"] = str(shim)  # Inductor's compile workers read it when they start
    try:
        yield str(shim)
    finally:
        if before is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = before


def resolve_target(name: str) -> tuple[torch.device | None, str | None, dict[str, Any]]:
    """(device, None, gpu info) when this host can build ``name``, else (None, reason, {})."""
    if name == "cpu":
        return torch.device("cpu"), None, {"cpu": platform.processor() or platform.machine()}
    if not torch.cuda.is_available():
        return (
            None,
            (
                f"no CUDA GPU on this host (torch {torch.__version__}, cuda available: False): AOTInductor "
                f"compiles a GPU package on a machine with that GPU; build there with `grc build`"
            ),
            {},
        )
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    gpu = {"gpu": torch.cuda.get_device_name(), "sm": sm, "cuda": torch.version.cuda}
    if name != "cuda" and int(name.removeprefix("sm")) != sm:
        return None, f"target {name} needs a sm{name.removeprefix('sm')} GPU; this host's is sm{sm} ({gpu['gpu']})", {}
    return torch.device("cuda"), None, gpu


def toolkit_versions() -> dict[str, str | None]:
    import triton

    try:
        compiler = cxx_compiler()
        version = subprocess.run([compiler or "c++", "--version"], capture_output=True, text=True).stdout
        cxx = f"{compiler}: {version.splitlines()[0]}"
    except (OSError, IndexError):
        cxx = None
    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cxx": cxx,
    }


def compile_package(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, str]) -> float:
    """AOTInductor: exported program -> ``path`` (.pt2); returns seconds."""
    import torch._inductor.config as inductor_config

    configs = dict(INDUCTOR_CONFIGS)
    if hasattr(inductor_config.aot_inductor, "metadata"):
        configs["aot_inductor.metadata"] = metadata
    configs = {k: v for k, v in configs.items() if _has_config(inductor_config, k)}
    if "triton.autotune_with_sample_inputs" not in configs:  # older torch: the two-pass compile uses real inputs
        configs["triton.autotune_at_compile_time"] = False
    started = time.perf_counter()
    with compiler_shim() as shim:
        if shim is not None:
            configs["cpp.cxx"] = (None, shim)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return time.perf_counter() - started


def _has_config(module: Any, dotted: str) -> bool:
    node = module
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def parity_cases(cfg: ModelConfig, shapes: list[tuple[int, int, int]], seed: int) -> list[tuple[str, JaggedInputs]]:
    """(name, inputs) per (users, history, candidates) that fits the model, plus one ragged batch
    long enough to cross the kernels' block boundaries."""
    gen = torch.Generator().manual_seed(seed)
    room = cfg.hstu.max_seq_len - len(cfg.profile)
    cases = [s for s in shapes if s[1] + s[2] <= room and s[2] <= cfg.max_candidates]
    long_cands = min(cfg.max_candidates, 24, room // 4)
    cases.append((3, min(200, room - long_cands), long_cands))
    return [(f"{u}u x {h}h x {c}c", random_inputs(cfg, u, h, c, gen)) for u, h, c in cases]


def reference_scores(dense64: GRDense, inputs: JaggedInputs) -> torch.Tensor:
    """The PyTorch reference: GRDense.forward_jagged, float64 on CPU, plain (impl="pytorch") ops."""
    with torch.no_grad():
        x = inputs.to("cpu", torch.float64)
        return dense64.forward_jagged(*x.args(), impl="pytorch")


def check_parity(
    runner: Callable[..., torch.Tensor],
    dense: GRDense,
    device: torch.device,
    dtype: torch.dtype,
    tolerance: Tolerance,
    cases: list[tuple[str, JaggedInputs]],
    backend: str,
) -> list[Figure]:
    """Package on ``device`` in ``dtype`` vs the float64 reference, per case. The reference sees
    the same (dtype-rounded) tokens, so the figures measure the model's arithmetic only."""
    dense64 = copy.deepcopy(dense).to("cpu", torch.float64).eval()
    figures = []
    for case, inputs in cases:
        rounded = inputs.to("cpu", dtype)
        with torch.no_grad():
            actual = runner(*rounded.to(device).args())
        if device.type == "cuda":
            torch.cuda.synchronize()
        expected = reference_scores(dense64, rounded)
        figures.append(compare(backend, case, "scores", actual.float().cpu().numpy(), expected.numpy(), tolerance))
    return figures


def compile_target(
    dense: GRDense,
    target: str,
    dtype_name: str,
    folder: Path,
    log: Callable[[str], None] = print,
    fuse: bool = False,
    silu_apart: bool = False,
    attention: str = "auto",
) -> dict[str, Any]:
    """Export + AOTInductor compile into ``folder``. Returns {"status": "skipped", ...} when this
    host lacks the target's device, else what ``verify_target`` needs. fuse: the fused Triton
    GEMMs and heads (kernels/fused_*.py; their twins on a CPU), else the unfused layer; silu_apart:
    the unfused layer's SiLU as the grc::silu op (engine.aoti.silu_apart); attention: the GPU
    package's attention kernel (engine.aoti.attention)."""
    with hstu_hopper.kernel_choice(attention):
        return _compile_target(dense, target, dtype_name, folder, log, fuse, silu_apart)


def _compile_target(
    dense: GRDense,
    target: str,
    dtype_name: str,
    folder: Path,
    log: Callable[[str], None],
    fuse: bool,
    silu_apart: bool,
) -> dict[str, Any]:
    device, reason, host = resolve_target(target)
    if device is None:
        log(f"aoti: {target}: skipped: {reason}")
        return {"name": target, "status": "skipped", "reason": reason, "dtype": dtype_name}
    if device.type == "cpu":
        dtype_name = "float32"  # the reference ops are the CPU path: 16-bit would only be slower
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # progress on long work: the compile below is silent for one to three minutes on a GPU (Inductor autotunes
    # every Triton kernel on the example batch)
    what = f"{dtype_name}, fused ops" if fuse else (f"{dtype_name}, SiLU apart" if silu_apart else dtype_name)
    log(f"aoti: {target}: exporting and compiling ({what}): a minute or more, Inductor compiles and autotunes")
    program = export_program(dense, device, DTYPES[dtype_name], fuse=fuse, silu_apart=silu_apart)
    export_s = time.perf_counter() - started
    ops = custom_ops(program)
    traced_kernels = any("triton_kernel_wrapper" in op for op in ops)  # torch versions that trace into triton_ops
    model = JaggedDense(dense, fuse=fuse, silu_apart=silu_apart)  # as export_program's model, defaults read
    expected = expected_ops(dense.cfg.hstu.num_layers, fuse, silu_apart, model.packs_vqk, model.gates_attention)
    # an export that traces into grc::hstu_attention's body leaves its Gluon kernel's node in its place
    counted = [TRACED_INTO.get(op, op) for op in ops]
    if {op: counted.count(op) for op in expected} != expected and not traced_kernels:
        raise StageError(f"aoti: {target}: expected {expected} grc nodes in the exported program, found {ops}")
    tag = {"grc.format": FORMAT, "grc.target": target, "grc.dtype": dtype_name, "grc.device": device.type}
    compile_s = compile_package(program, folder / PACKAGE, tag)
    check_loads(folder / PACKAGE, device.type, dtype_name, dense.cfg, f"aoti: {target}", cxx_compiler())
    log(
        f"aoti: {target}: exported in {export_s:.1f}s, compiled in {compile_s:.1f}s "
        f"({(folder / PACKAGE).stat().st_size / 2**20:.1f} MiB)"
    )
    return {"name": target, "status": "compiled", "device": device, "host": host, "dtype": dtype_name,
            "ops": ops, "export_s": export_s, "compile_s": compile_s, "fused": fuse,
            "silu_apart": silu_apart, "attention": attention_kernel(dense, device, dtype_name)}  # fmt: skip


def attention_kernel(dense: GRDense, device: torch.device, dtype_name: str) -> str:
    """Which attention kernel a package compiled now (under its kernel_choice) runs, in words: the metadata says it."""
    if device.type != "cuda":
        return "the grc::hstu_attention_reference op (PyTorch, called through the dispatcher)"
    hstu = dense.cfg.hstu
    return hstu_hopper.describe(hstu.head_qk, hstu.head_v, DTYPES[dtype_name], device)


def build_target(
    dense: GRDense,
    target: str,
    dtype_name: str,
    folder: Path,
    tolerance: Tolerance,
    shapes: list[tuple[int, int, int]],
    seed: int,
    provenance: dict[str, Any],
    log: Callable[[str], None] = print,
    packaged: GRDense | None = None,
    checks: Checks | None = None,
    fuse: bool = False,
    silu_apart: bool = False,
    attention: str = "auto",
) -> dict[str, Any]:
    """Export + compile + parity for one target into ``folder``; the manifest entry (status built
    or skipped). Raises StageError when the package misses the tolerance. ``packaged``: the model
    compiled when it is not ``dense`` itself (the fp8 one); parity still compares with ``dense``.
    fuse: engine.aoti.fuse; silu_apart: engine.aoti.silu_apart; attention: engine.aoti.attention."""
    compiled = compile_target(packaged or dense, target, dtype_name, folder, log, fuse, silu_apart, attention)
    if compiled["status"] == "skipped":
        return compiled
    return verify_target(dense, compiled, folder, tolerance, shapes, seed, provenance, log, checks=checks)


def verify_target(
    dense: GRDense,
    compiled: dict[str, Any],
    folder: Path,
    tolerance: Tolerance,
    shapes: list[tuple[int, int, int]],
    seed: int,
    provenance: dict[str, Any],
    log: Callable[[str], None] = print,
    single_threaded: bool = False,
    checks: Checks | None = None,
) -> dict[str, Any]:
    """Load the compiled package, parity against the float64 reference, metadata.json; the
    manifest entry. Raises StageError when the package misses the tolerance. ``checks(runner,
    device, dtype)``: more checks of the loaded package (the ranking gates), their record merged
    into the metadata; they raise StageError on a failure."""
    from grc.aoti.runtime import load

    target, device, host, dtype_name = compiled["name"], compiled["device"], compiled["host"], compiled["dtype"]
    ops, export_s, compile_s = compiled["ops"], compiled["export_s"], compiled["compile_s"]
    dtype = DTYPES[dtype_name]
    runner = load(folder / PACKAGE, device, single_threaded=single_threaded)
    cases = parity_cases(dense.cfg, shapes, seed)
    log(f"aoti: {target}: parity of {len(cases)} shapes against PyTorch float64 on the CPU")
    figures = check_parity(runner, dense, device, dtype, tolerance, cases, f"aoti:{target}")
    from grc.verify.compare import format_figures

    table = format_figures(figures)
    log(table)
    if not all(f.ok for f in figures):
        raise StageError(f"aoti: {target} differs from the PyTorch reference beyond the tolerance:\n{table}")
    checked = checks(runner, device, dtype) if checks is not None else {}
    package_sha = sha256_file(folder / PACKAGE)
    metadata = {
        "format": FORMAT,
        "target": {"name": target, "device": device.type, **host},
        "dtype": dtype_name,
        "package": {"file": PACKAGE, "bytes": (folder / PACKAGE).stat().st_size, "sha256": package_sha},
        "toolkit": {"name": "aotinductor", **toolkit_versions()},
        "inputs": {
            "tokens": f"[T, {dense.cfg.d_model}] {dtype_name}",
            "offsets": "[B+1] int64",
            "num_candidates": "[B] int64",
            "timestamps": "[T] int64",
        },
        "input_names": list(INPUTS),
        "outputs": {"scores": f"[T, {len(dense.cfg.tasks)}] {dtype_name}: zero except at candidate tokens"},
        "output_names": list(OUTPUTS),
        "dynamic": {
            "users": [1, MAX_USERS],
            "tokens": [2, MAX_TOKENS],
            "note": f"tokens per user at most model.hstu.max_seq_len = {dense.cfg.hstu.max_seq_len}",
        },
        "custom_ops": ops,
        "fused": compiled["fused"],
        "silu_apart": compiled["silu_apart"],
        "time_buckets": time_bucket_note(dense.cfg.hstu.time_buckets),
        "kernels": (
            "Triton kernels compiled into the package; the Gluon attention kernel (where attention says so) "
            "called through the dispatcher (import kernels before loading)"
            if device.type == "cuda"
            else "grc reference ops called through the dispatcher (import kernels before loading)"
        ),
        "attention": compiled["attention"],
        **provenance,
        # host- and run-dependent: everything else is a function of the inputs
        "build_seconds": {"export": round(export_s, 3), "compile": round(compile_s, 3)},
        "parity": {
            "status": "passed",
            "reference": "GRDense.forward_jagged, PyTorch float64 on CPU",
            "device": host.get("gpu", "cpu"),
            "figures": [f.as_dict() for f in figures],
        },
        **checked,
        "runtime": (
            "grc.aoti.runtime.load(path, device) (imports kernels, then "
            "torch._inductor.aoti_load_package); CUDA graphs per input shape: "
            "grc.aoti.runtime.CudaGraphRunner; needs the same torch version"
        ),
    }
    (folder / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return {
        "name": target,
        "status": "built",
        "device": device.type,
        "dtype": dtype_name,
        "gpu": host.get("gpu"),
        "sm": host.get("sm"),
        "package": f"{target}/{PACKAGE}",
        "metadata": f"{target}/{METADATA}",
        "package_sha256": package_sha,
        "parity": "passed",
        "python": sys.version.split()[0],
    }
