"""aoti: the dense jagged model -> one AOTInductor ``.pt2`` package per target, with metadata.

Per ``engine.aoti.targets`` entry: ``torch.export`` of the dense model with its HSTU attention and
norm-gate as ``torch.ops.grc.*`` custom ops (Triton kernels on CUDA, the PyTorch reference on
CPU), AOTInductor compile, then parity of the loaded package against ``GRDense.forward_jagged``
in float64 on CPU (``engine.aoti.parity``; default ``verify.export`` for float32 packages and the
engine tolerance for 16-bit ones). Writes ``<target>/model.pt2`` and ``<target>/metadata.json``
(toolkit versions, target GPU and SM, dtype, weights hash, package hash, build seconds, parity
figures). A GPU target on a host without that GPU is recorded as skipped with the reason; no
package is ever written for it. The TensorRT engines cannot target the H100 here; this can.
``engine.aoti.precision: fp8``: the GPU packages compile a copy of the model whose HSTU output
GEMMs are float8 e4m3 ``torch._scaled_mm`` calls (grc/model/fp8.py, PACKAGE_GEMMS), scales
calibrated on ``engine.calibration``'s users (grc/engine/aoti_quality.py) and recorded in the
metadata under ``fp8``; parity is still against the unquantized model. Every package is also held
to the ranking gates (``verify.ranking``: held-out users vs the fp32 model), its figures in the
metadata under ``ranking``; a failing gate fails the stage with the table. ``engine.aoti.history_entries``:
each built target also gets the history cache's prefill and score packages (``<target>/history/``, checked
against GRDense.prefill / score in float64, recorded in the manifest entry under ``history_entries``).
"""

from __future__ import annotations

import json
from typing import Any

from grc.stages.base import Context, Stage

PARITY_SEED = 20240501  # fixed: parity inputs must not depend on unrelated spec fields


def tolerance(spec: Any, dtype: str, fp8: bool = False) -> Any:
    cfg = spec.engine.aoti
    if cfg.parity is not None:
        return cfg.parity
    if dtype == "float32":
        return spec.verify.export
    return spec.engine.tolerance_of("fp8" if fp8 else {"bfloat16": "bf16", "float16": "fp16"}[dtype])


def fp8_gpu_or_fail(target: str) -> None:
    """fp8 GEMMs need FP8 tensor cores (sm89+): a GPU target on an older GPU fails, naming it."""
    from grc.aoti.build import resolve_target
    from grc.errors import StageError

    _, _, host = resolve_target(target)
    if host.get("sm") is not None and host["sm"] < 89:
        raise StageError(
            f"engine.aoti.precision: fp8 needs an sm89+ GPU (float8 e4m3 tensor cores) for target "
            f"{target}; this host's is sm{host['sm']} ({host.get('gpu')})"
        )


def run(ctx: Context) -> dict[str, Any]:
    import hashlib

    import torch
    from rich.table import Table
    from rich.text import Text

    from grc.aoti.build import DTYPES, PACKAGE, build_target
    from grc.aoti.history_entry import build_checked
    from grc.engine.aoti_quality import fp8_package_model, held_out_reference, ranking_check
    from grc.weights import DENSE_VIEW, load_model
    from kernels import hstu_hopper

    spec = ctx.spec
    cfg = spec.engine.aoti
    dense = load_model(spec.model, ctx.inputs["weights"]).dense
    weights_manifest = (ctx.inputs["weights"] / DENSE_VIEW).read_bytes()  # what the key holds: no tables
    provenance = {
        "spec": spec.name,
        "weights": {
            "manifest_sha256": hashlib.sha256(weights_manifest).hexdigest(),
            "dense_parameters": sum(p.numel() for p in dense.parameters()),
        },
        "onnx": None,  # exported from the PyTorch model itself, not from the ONNX graph
    }
    shapes = [(s.users, s.history, s.candidates) for s in spec.verify.shapes]
    fp8 = None  # (model, record): calibrated once, for every GPU target
    entries = []
    reference = None  # verify.ranking's held-out users and their float32 scores (aoti_quality.held_out_reference)
    for target in cfg.targets:
        gpu = target != "cpu"
        dtype = cfg.dtype if gpu else "float32"
        quantized = gpu and cfg.precision == "fp8"
        if quantized:
            fp8_gpu_or_fail(target)
        if quantized and fp8 is None:
            fp8 = fp8_package_model(dense, spec)
            ctx.log(f"aoti: fp8: {len(fp8[1]['scales'])} GEMMs calibrated on {fp8[1]['calibration']['users']} users")
        precision = "fp8 GEMMs, bfloat16" if quantized else dtype
        # gated where the package quantizes (fp8) or computes in float32; 16-bit: recorded (aoti_quality.UNGATED)
        if reference is None:  # one float32 reference for every target
            ctx.log(f"aoti: the ranking gates' float32 reference ({spec.verify.ranking.users} held-out users, CPU)")
            reference = held_out_reference(dense, spec)
        check = ranking_check(dense, spec, f"aoti:{target}", precision, quantized or dtype == "float32", reference)
        entry = build_target(
            dense,
            target,
            cfg.dtype,
            ctx.out / target,
            tolerance(spec, dtype, quantized),
            shapes,
            PARITY_SEED,
            {**provenance, "fp8": fp8[1] if quantized and fp8 else None},
            ctx.log,
            packaged=fp8[0] if quantized and fp8 else None,
            checks=check,
            fuse=cfg.fuse,
            silu_apart=cfg.silu_apart,
            attention=cfg.attention,
        )
        if cfg.history_entries and entry["status"] == "built":  # from the model in dtype (not the fp8 copy)
            max_rel = tolerance(spec, dtype).max_rel
            with hstu_hopper.kernel_choice(cfg.attention):
                entry["history_entries"] = build_checked(
                    dense, ctx.out / target, torch.device(entry["device"]), DTYPES[dtype], max_rel, PARITY_SEED, ctx.log
                )
        entries.append(entry)
    table = Table(title="aoti packages", show_edge=False)
    for col in ("target", "device", "dtype", "status", "parity / why skipped"):
        table.add_column(col)
    for e in entries:
        built = e["status"] == "built"
        table.add_row(
            e["name"],
            e.get("gpu") or e.get("device", "-"),
            e["dtype"],
            e["status"],
            Text(e["parity"] if built else e["reason"]),  # a reason quotes compiler output: not markup
        )
    ctx.console.print(table)
    return {
        "targets": entries,
        "built": [e["name"] for e in entries if e["status"] == "built"],
        "skipped": {e["name"]: e["reason"] for e in entries if e["status"] == "skipped"},
        "weights_manifest_sha256": provenance["weights"]["manifest_sha256"],
        # file -> digest (the manifests' convention: the build cache takes these instead of hashing again)
        "sha256": {
            **{f"{e['name']}/{PACKAGE}": e["package_sha256"] for e in entries if e["status"] == "built"},
            **{k: v for e in entries for k, v in e.get("history_entries", {}).get("sha256", {}).items()},
        },
        "metadata": {
            e["name"]: json.loads((ctx.out / e["metadata"]).read_text())["build_seconds"]
            for e in entries
            if e["status"] == "built"
        },
    }


STAGE = Stage(
    name="aoti",
    output="engines-aoti",
    reads=(
        "engine.aoti",
        "engine.parity",
        "engine.calibration",
        "verify.export",
        "verify.shapes",
        "verify.ranking",
        "model",
    ),
    inputs=("weights",),
    input_files={"weights": "dense.json"},  # the dense model only (DENSE_VIEW in grc/weights/artifact.py)
    run=run,
    toolkits=("torch", "triton"),
    # a GPU target is built here, or recorded as skipped, by what this host's GPU is
    host_gpu=lambda spec: any(t != "cpu" for t in spec.engine.aoti.targets),
    doc="AOTInductor .pt2 package per target (cpu, cuda): dense jagged model with the grc Triton ops + parity",
    enabled=lambda spec: spec.engine.aoti.enabled and bool(spec.engine.aoti.targets),
)
