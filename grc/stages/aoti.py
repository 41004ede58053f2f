"""aoti: the dense jagged model -> one AOTInductor ``.pt2`` package per target, with metadata.

Per ``engine.aoti.targets`` entry: ``torch.export`` of the dense model with its HSTU attention and
norm-gate as ``torch.ops.grc.*`` custom ops (Triton kernels on CUDA, the PyTorch reference on
CPU), AOTInductor compile, then parity of the loaded package against ``GRDense.forward_jagged``
in float64 on CPU (``engine.aoti.parity``; default ``verify.export`` for float32 packages and the
engine tolerance for 16-bit ones). Writes ``<target>/model.pt2`` and ``<target>/metadata.json``
(toolkit versions, target GPU and SM, dtype, weights hash, package hash, build seconds, parity
figures). A GPU target on a host without that GPU is recorded as skipped with the reason; no
package is ever written for it. The TensorRT engines cannot target the H100 here; this can.
"""

from __future__ import annotations

import json
from typing import Any

from grc.stages.base import Context, Stage

PARITY_SEED = 20240501  # fixed: parity inputs must not depend on unrelated spec fields


def tolerance(spec: Any, dtype: str) -> Any:
    cfg = spec.engine.aoti
    if cfg.parity is not None:
        return cfg.parity
    if dtype == "float32":
        return spec.verify.export
    return spec.engine.tolerance_of({"bfloat16": "bf16", "float16": "fp16"}[dtype])


def run(ctx: Context) -> dict[str, Any]:
    import hashlib

    from rich.table import Table
    from rich.text import Text

    from grc.aoti.build import PACKAGE, build_target
    from grc.weights import DENSE_VIEW, load_model

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
    entries = []
    for target in cfg.targets:
        dtype = "float32" if target == "cpu" else cfg.dtype
        entries.append(
            build_target(
                dense,
                target,
                cfg.dtype,
                ctx.out / target,
                tolerance(spec, dtype),
                shapes,
                PARITY_SEED,
                provenance,
                ctx.log,
                fuse=cfg.fuse,
            )
        )
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
        "sha256": {f"{e['name']}/{PACKAGE}": e["package_sha256"] for e in entries if e["status"] == "built"},
        "metadata": {
            e["name"]: json.loads((ctx.out / e["metadata"]).read_text())["build_seconds"]
            for e in entries
            if e["status"] == "built"
        },
    }


STAGE = Stage(
    name="aoti",
    output="engines-aoti",
    reads=("engine.aoti", "engine.parity", "verify.export", "verify.shapes", "model"),
    inputs=("weights",),
    input_files={"weights": "dense.json"},  # the dense model only (DENSE_VIEW in grc/weights.py)
    run=run,
    toolkits=("torch", "triton"),
    # a GPU target is built here, or recorded as skipped, by what this host's GPU is
    host_gpu=lambda spec: any(t != "cpu" for t in spec.engine.aoti.targets),
    doc="AOTInductor .pt2 package per target (cpu, cuda): dense jagged model with the grc Triton ops + parity",
    enabled=lambda spec: spec.engine.aoti.enabled and bool(spec.engine.aoti.targets),
)
