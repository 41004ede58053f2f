"""The ways bench/e2e.py runs one spec's dense model: one named function per mode.

Baselines are what a user runs without grc: the plain PyTorch model, padded and batched in bf16,
eager or under ``torch.compile``. grc's modes are the Triton kernels (eager, CUDA-graphed,
``torch.compile``d) and the AOTInductor package the aoti stage builds. The per-user jagged
reference (``GRDense.forward_jagged``) is not a mode: it is the float64 correctness oracle.

A mode is ``make(case, workload) -> call``; the call runs one forward on the workload's inputs
and returns scores, jagged [T, tasks] or, for ``padded`` modes, [B, N, tasks].
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grc.aoti.inputs import JaggedInputs
from grc.model.gr import GRDense
from grc.model.jagged import lengths_of, to_padded
from grc.serving.common.score_graphs import packed_spans
from grc.spec.schema import Spec

Call = Callable[[], torch.Tensor]


@dataclass
class Case:
    """What every mode of one spec shares: the models, each workload's inputs, the spec's record."""

    name: str
    spec: Spec
    device: torch.device
    dense: GRDense  # float32 on the device: what the aoti build takes (it casts to the package dtype)
    dense_act: GRDense  # the activation dtype (bf16) on the device: what every timed mode runs
    inputs: dict[str, JaggedInputs]  # per workload, on the device, activation dtype
    record: dict[str, Any]  # the spec's section of the result file
    memo: dict[str, Any] = field(default_factory=dict)  # compiled functions, the package: built once
    graphs: list[Any] = field(default_factory=list)  # CUDA graphs of the mode being measured

    def once(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` the first time, the same object after; a failure is remembered, not retried."""
        if key not in self.memo:
            try:
                self.memo[key] = build()
            except Exception as exc:
                self.memo[key] = exc
                raise
        got = self.memo[key]
        if isinstance(got, Exception):
            raise RuntimeError(f"{key} failed earlier in this run: {type(got).__name__}: {got}"[:600])
        return got

    def timed_first_call(self, what: str, fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> None:
        """Run ``fn`` once and record the seconds (a compile happens in the first call)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.record.setdefault("compile_seconds", {})[what] = round(time.perf_counter() - t0, 1)


@dataclass(frozen=True)
class Mode:
    what: str
    make: Callable[[Case, str], Call]
    baseline: bool = False  # what a user runs without grc: speed-ups are quoted against the best of these
    padded: bool = False  # returns [B, N, tasks]
    needs_cuda: bool = False


def padded_args(inp: JaggedInputs) -> tuple[torch.Tensor, ...]:
    """The jagged inputs in the padded layout forward_padded (and the exported ONNX) takes."""
    lengths = lengths_of(inp.offsets)
    n = int(lengths.max())
    return to_padded(inp.tokens, inp.offsets, n), lengths, inp.num_candidates, to_padded(inp.timestamps, inp.offsets, n)


def graphed(case: Case, fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> Call:
    """``fn`` captured in a CUDA graph for these inputs (grc.aoti.runtime.CudaGraphRunner), replayed per call with
    its inputs copied in first as the fused server copies a batch in (grc/serving/ranker/dense.py, ``run_padded``):
    the integer inputs as ONE copy (views of one buffer at 16-byte-aligned offsets, as the server's packed layout),
    each floating input as one. Every graphed mode, baseline or grc's, pays the same copies (before session 25: one
    copy per input, four a call)."""
    from grc.aoti.runtime import CudaGraphRunner

    copies, static = packed_inputs(args)
    runner = CudaGraphRunner(fn, max_graphs=1)
    case.graphs.append(runner)
    runner.capture(*static, clone=False)

    def call() -> torch.Tensor:
        for dst, src in copies:
            dst.copy_(src, non_blocking=True)
        return runner(*static)  # the tensors it captured: it copies nothing more

    return call


def packed_inputs(args: tuple[torch.Tensor, ...]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """A graph's static inputs for ``args`` and the copies that fill them: each floating input a clone, filled from
    the input; the integer inputs of one dtype views of one buffer at 16-byte-aligned offsets, filled by one copy of
    the same values packed -> ([(static, source)] per copy, the static inputs in ``args``' order)."""
    static: list[torch.Tensor | None] = [a.clone() if a.is_floating_point() else None for a in args]
    copies = [(s, a) for s, a in zip(static, args, strict=True) if s is not None]
    for dtype in dict.fromkeys(a.dtype for a in args if not a.is_floating_point()):
        members = {str(i): a for i, a in enumerate(args) if a.dtype == dtype}
        spans = packed_spans({i: a.numel() for i, a in members.items()}, align=max(1, 16 // dtype.itemsize))
        end = max(e for _, e in spans.values())
        buffer = torch.zeros(end, dtype=dtype, device=next(iter(members.values())).device)
        for i, (start, stop) in spans.items():
            view = buffer[start:stop].view(members[i].shape)
            static[int(i)] = view.copy_(members[i])
        copies.append((buffer, buffer.clone()))
    assert all(s is not None for s in static)
    return copies, [s for s in static if s is not None]


# --------------------------------------------------------------------------- baselines
def eager_padded(case: Case, wl: str) -> Call:
    args = padded_args(case.inputs[wl])
    return lambda: case.dense_act.forward_padded(*args)


def compiled_padded_fn(case: Case, wl: str) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """``torch.compile`` with no Inductor settings, as a user would write it, static shapes
    (dynamic=False: each workload gets its own specialised graph, timed in compile_seconds)."""
    fn = case.once("torch.compile padded", lambda: torch.compile(case.dense_act.forward_padded, dynamic=False))
    args = padded_args(case.inputs[wl])
    if f"torch.compile padded:{wl}" not in case.record.get("compile_seconds", {}):
        case.timed_first_call(f"torch.compile padded:{wl}", fn, args)
    return fn, args


def compiled_padded(case: Case, wl: str) -> Call:
    fn, args = compiled_padded_fn(case, wl)
    return lambda: fn(*args)


def compiled_padded_graph(case: Case, wl: str) -> Call:
    fn, args = compiled_padded_fn(case, wl)
    return graphed(case, fn, args)


# --------------------------------------------------------------------------- grc
def kernels_module(case: Case, fuse: bool = False) -> torch.nn.Module:
    """grc's jagged module with its ops: the Triton kernels on a GPU, their PyTorch twins
    elsewhere; fuse: the fused projections and candidate heads (kernels/fused_*.py), what the
    package compiles with engine.aoti.fuse (impl="triton" only)."""
    from grc.aoti.model import JaggedDense

    # the kernels on a CPU too under TRITON_INTERPRET=1: what a dry run of a GPU script runs
    impl = "triton" if case.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "pytorch"
    case.record["grc_ops"] = impl
    fuse = fuse and impl == "triton"
    return case.once(f"kernels fuse={fuse}", lambda: JaggedDense(case.dense_act, impl, fuse=fuse).eval())


def eager_kernels(case: Case, wl: str) -> Call:
    module, args = kernels_module(case), case.inputs[wl].args()
    return lambda: module(*args)


def eager_kernels_graph(case: Case, wl: str) -> Call:
    return graphed(case, kernels_module(case), case.inputs[wl].args())


def eager_fused_graph(case: Case, wl: str) -> Call:
    return graphed(case, kernels_module(case, fuse=True), case.inputs[wl].args())


def compiled_module(case: Case, wl: str, fuse: bool) -> Call:
    """torch.compile (dynamic shapes, no Inductor settings) of the module with grc's ops, CUDA-graphed."""
    what = f"torch.compile kernels{' fused' if fuse else ''}"
    fn = case.once(what, lambda: torch.compile(kernels_module(case, fuse), dynamic=True))
    args = case.inputs[wl].args()
    case.timed_first_call(f"{what}:{wl}", fn, args)
    return graphed(case, fn, args)


def compiled_kernels(case: Case, wl: str) -> Call:
    return compiled_module(case, wl, fuse=False)


def compiled_fused(case: Case, wl: str) -> Call:
    return compiled_module(case, wl, fuse=True)


# grc.model.hstu flags a package variant sets while its model is built (JaggedDense reads them then), each setting
# with the words its mode's name and record key carry
MODEL_FLAGS = {
    ("CONSUMER_SILU", False): (" (SiLU pass for u)", "_silu_passes"),
    ("PACKED_VQK", True): (" (packed vqk)", "_packed_vqk"),
    ("PACKED_VQK", False): (" (q, k, v views)", "_views"),
    ("ATTENTION_GATE", True): (" (norm-gate in the attention op)", "_attention_gate"),
    ("ATTENTION_GATE", False): (" (norm-gate apart)", "_gate_apart"),
}
Flags = tuple[tuple[str, bool], ...]


def package(
    case: Case,
    fuse: bool = False,
    silu_apart: bool = False,
    attention: str = "auto",
    flags: Flags = (),
) -> Callable[..., torch.Tensor]:
    """The AOTInductor package, built once per spec and variant by the aoti stage's code (compile, a load check
    in a child process, float64 parity), loaded with the single-threaded runner: the one whose
    CUDA-graph capture works (the default runner's capture failed on the H200). attention: engine.aoti.attention;
    flags: (name, value) of grc.model.hstu's MODEL_FLAGS set while the package's model is built (CONSUMER_SILU
    False: SiLU of u as a pass of its own, as before; PACKED_VQK: the attention takes the activated vqk whole;
    ATTENTION_GATE: with it, the norm-gate in the attention's op)."""
    variant = f"{' (fused)' if fuse else ''}{' (SiLU apart)' if silu_apart else ''}"
    variant += f" (attention {attention})" if attention != "auto" else ""
    variant += "".join(MODEL_FLAGS[flag][0] for flag in flags)
    return case.once(
        f"the AOTInductor package{variant}", lambda: build_package(case, fuse, silu_apart, attention, flags)
    )


def build_package(
    case: Case,
    fuse: bool,
    silu_apart: bool = False,
    attention: str = "auto",
    flags: Flags = (),
) -> Callable[..., torch.Tensor]:
    from grc.aoti.build import compile_target, verify_target
    from grc.aoti.runtime import load
    from grc.model import hstu

    folder = Path(tempfile.mkdtemp(prefix="grc-aoti-")) / "cuda"
    log = lambda m: print(f"  {m}", flush=True)  # noqa: E731
    kept = {name: getattr(hstu, name) for name, _ in MODEL_FLAGS}
    try:
        for name, value in flags:  # JaggedDense's defaults, read when the package's model is built
            setattr(hstu, name, value)
        compiled = compile_target(case.dense, "cuda", "bfloat16", folder, log, fuse, silu_apart, attention)
    finally:
        for name, value in kept.items():
            setattr(hstu, name, value)
    if compiled["status"] != "compiled":
        raise RuntimeError(f"the package was not built: {compiled.get('reason')}")
    shapes = [(s.users, s.history, s.candidates) for s in case.spec.verify.shapes]
    tolerance = case.spec.engine.tolerance_of("bf16")
    provenance = {"spec": case.name, "weights": "seeded init in memory (bench)"}
    entry = verify_target(case.dense, compiled, folder, tolerance, shapes, 20240501, provenance, log,
                          single_threaded=True)  # fmt: skip
    meta = json.loads((folder / "metadata.json").read_text())
    key = "aoti_package" + ("_fused" if fuse else "") + ("_silu_apart" if silu_apart else "")
    key += ("" if attention == "auto" else f"_attention_{attention}") + "".join(MODEL_FLAGS[flag][1] for flag in flags)
    case.record[key] = {
        "entry": entry,
        "build_seconds": meta["build_seconds"],
        "parity": meta["parity"],
        "bytes": meta["package"]["bytes"],
        "toolkit": meta["toolkit"],
        "metadata": meta,  # the whole metadata.json, inside the result file (and so under its provenance)
    }
    return load(folder / "model.pt2", "cuda", single_threaded=True)


def package_nograph(case: Case, wl: str) -> Call:
    run, args = package(case), case.inputs[wl].args()
    return lambda: run(*args)


def package_graph(case: Case, wl: str) -> Call:
    return graphed(case, package(case), case.inputs[wl].args())


def package_fused_graph(case: Case, wl: str) -> Call:
    return graphed(case, package(case, fuse=True), case.inputs[wl].args())


def package_silu_graph(case: Case, wl: str) -> Call:
    return graphed(case, package(case, silu_apart=True), case.inputs[wl].args())


def package_triton_attention_graph(case: Case, wl: str) -> Call:
    return graphed(case, package(case, attention="triton"), case.inputs[wl].args())


def package_silu_passes_graph(case: Case, wl: str) -> Call:
    return graphed(case, package(case, flags=(("CONSUMER_SILU", False),)), case.inputs[wl].args())


def package_views_graph(case: Case, wl: str) -> Call:
    return graphed(case, package(case, flags=(("PACKED_VQK", False),)), case.inputs[wl].args())


def package_packed_vqk_graph(case: Case, wl: str) -> Call:
    flags = (("PACKED_VQK", True), ("ATTENTION_GATE", False))
    return graphed(case, package(case, flags=flags), case.inputs[wl].args())


def package_attention_gate_graph(case: Case, wl: str) -> Call:
    flags = (("PACKED_VQK", True), ("ATTENTION_GATE", True))
    return graphed(case, package(case, flags=flags), case.inputs[wl].args())


# In the order they run: the baselines first, then the package (its compile and parity take
# minutes: a child that runs out of time must still have measured it), then the kernel paths.
MODES: dict[str, Mode] = {
    "eager_bf16_padded": Mode("GRDense.forward_padded bf16, plain PyTorch, batched and padded", eager_padded,
                              baseline=True, padded=True),
    "compile_bf16_padded": Mode("torch.compile(GRDense.forward_padded, dynamic=False) bf16, no Inductor settings",
                                compiled_padded, baseline=True, padded=True),
    "compile_bf16_padded_graph": Mode("the same, CUDA graph per shape", compiled_padded_graph, baseline=True,
                                      padded=True, needs_cuda=True),
    "aoti_bf16_nograph": Mode("AOTInductor package bf16, grc ops (engine.aoti.attention auto), no CUDA graph",
                              package_nograph,
                              needs_cuda=True),
    "aoti_bf16": Mode("the same package, CUDA graph per shape", package_graph, needs_cuda=True),
    "aoti_bf16_triton_attention": Mode("the package with engine.aoti.attention: triton (the Triton attention "
                                       "kernel compiled in, not the Gluon sm90 one), CUDA graph per shape",
                                       package_triton_attention_graph, needs_cuda=True),
    "aoti_bf16_silu_passes": Mode("the package with grc.model.hstu.CONSUMER_SILU off (SiLU of u as an Inductor pass "
                                  "of its own, not in the norm-gate kernel; session 18's run also had q's in the "
                                  "attention kernel), CUDA graph per shape", package_silu_passes_graph,
                                  needs_cuda=True),
    "aoti_bf16_views": Mode("the package with grc.model.hstu.PACKED_VQK off (the attention op takes q, k, v as three "
                            "views: three SiLU/split passes a layer; the default before session 26), CUDA graph per "
                            "shape", package_views_graph, needs_cuda=True),
    "aoti_bf16_vqk": Mode("the package with grc.model.hstu.PACKED_VQK on and ATTENTION_GATE off (the attention op "
                          "takes the activated vqk whole: one SiLU pass a layer, not three; the norm-gate apart), "
                          "CUDA graph per shape", package_packed_vqk_graph, needs_cuda=True),
    "aoti_bf16_vqk_gate": Mode("the package with grc.model.hstu.PACKED_VQK and ATTENTION_GATE on (the norm-gate in "
                               "the attention op, adding the key parts as it reads them: no sum kernel; the default "
                               "since session 26), CUDA graph per shape", package_attention_gate_graph,
                               needs_cuda=True),
    "aoti_bf16_fused": Mode("the package with engine.aoti.fuse (kernels/fused_*.py), CUDA graph per shape",
                            package_fused_graph, needs_cuda=True),
    "aoti_bf16_silu": Mode("the package with engine.aoti.silu_apart (grc::silu: one activated UVQK buffer), "
                           "CUDA graph per shape", package_silu_graph, needs_cuda=True),
    "eager_bf16_triton": Mode("JaggedDense bf16, grc ops (Triton kernels; their twins on a CPU), eager",
                              eager_kernels),
    "eager_bf16_triton_graph": Mode("the same, CUDA graph per shape", eager_kernels_graph, needs_cuda=True),
    "eager_bf16_fused_graph": Mode("JaggedDense bf16 with the fused projections and candidate heads "
                                   "(fuse=True: kernels/fused_*.py), CUDA graph per shape", eager_fused_graph,
                                   needs_cuda=True),
    "compile_bf16_triton": Mode("torch.compile(dynamic) bf16 of the module the package compiles (grc Triton ops), "
                                "CUDA graph per shape", compiled_kernels, needs_cuda=True),
    "compile_bf16_fused": Mode("torch.compile(dynamic) bf16 of the fused module (fuse=True), CUDA graph per shape",
                               compiled_fused, needs_cuda=True),
}  # fmt: skip
