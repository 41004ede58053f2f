"""triton: the Triton model repository (ensemble preprocess -> dense -> postprocess) + bundle.json.

With the aotinductor backend the stage also reads the aoti stage's packages, with tensorrt_plan
the engine stage's plans (optional inputs: only specs that serve them wait for, and are keyed by,
those stages).

Cheap and self-contained: configs are rendered from ``bundles.triton`` and ``model``, the weights
and the exported ONNX are hard-linked from their stages' outputs (copied across filesystems), so
editing ``bundles.triton.*`` reruns this stage alone. See grc/serving/triton/bundle.py for the layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grc.serving.triton.bundle import write_bundle
from grc.stages.base import MANIFEST, Context, Stage

# backend -> the stage whose output it serves
SERVED_BY = {"aotinductor": "aoti", "tensorrt_plan": "engine"}


def served_stages(spec: Any) -> tuple[str, ...]:
    """The ensemble reads the exported ONNX (its dense_onnx step, and the manifest's digests); the fused
    pipeline never does, so a fused build needs no export stage (nor onnxscript)."""
    cfg = spec.bundles.triton
    export = ("export",) if cfg.pipeline == "ensemble" else ()
    return (*export, *(SERVED_BY[b] for b in (cfg.backend, *cfg.extra_backends) if b in SERVED_BY))


def engine_plans(folder: Path) -> tuple[dict[int, Path], dict[str, Path]]:
    """The engine stage's built plans: compute capability -> plan for cc_model_filenames (the
    first target of each SM), and target -> plan for every target whose SM another target shares
    (Triton cannot tell H100 from H200 by compute capability: those get configs/<target>.pbtxt)."""
    built = [e for e in json.loads((folder / MANIFEST).read_text())["targets"] if e["status"] == "built"]
    by_sm: dict[int, Path] = {}
    for entry in built:
        by_sm.setdefault(entry["sm"], folder / entry["plan"])
    shared = {e["name"]: folder / e["plan"] for e in built if sum(o["sm"] == e["sm"] for o in built) > 1}
    return by_sm, shared


def run(ctx: Context) -> dict[str, Any]:
    engines, per_gpu = engine_plans(ctx.inputs["engine"]) if "engine" in ctx.inputs else (None, None)
    return write_bundle(ctx.spec, ctx.inputs["weights"], ctx.inputs.get("export"), ctx.out, engines=engines,
                        gpu_engines=per_gpu, aoti=ctx.inputs.get("aoti"), log=ctx.log)  # fmt: skip


STAGE = Stage(
    name="triton",
    output="triton",
    # name: the default model_name and bundle.json's spec; engine.aoti.dtype and the tolerances: a fused GPU
    # model's dense dtype and the tolerance bundle.json records for its smoke test
    reads=(
        "bundles.triton",
        "model",
        "name",
        "engine.aoti.dtype",
        "engine.aoti.parity",
        "engine.parity",
        "verify.export",
    ),
    inputs=("weights",),  # and export for the ensemble: served_stages
    toolkits=("tritonclient", "protobuf"),
    run=run,
    doc="Triton model repository: ensemble of python preprocess, onnxruntime dense model, postprocess",
    enabled=lambda spec: spec.bundles.triton.enabled,
    optional_inputs=served_stages,
)
