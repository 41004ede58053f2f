"""triton: the Triton model repository (ensemble preprocess -> dense -> postprocess) + bundle.json.

With the aotinductor backend the stage also reads the aoti stage's packages, with tensorrt_plan
the engine stage's plans (optional inputs: only specs that serve them wait for, and are keyed by,
those stages).

Cheap and self-contained: configs are rendered from ``bundles.triton`` and ``model``, the weights
and the exported ONNX are hard-linked from their stages' outputs (copied across filesystems), so
editing ``bundles.triton.*`` reruns this stage alone. See grc/serving/bundle.py for the layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grc.serving.bundle import write_bundle
from grc.stages.base import MANIFEST, Context, Stage

# backend -> the stage whose output it serves
SERVED_BY = {"aotinductor": "aoti", "tensorrt_plan": "engine"}


def served_stages(spec: Any) -> tuple[str, ...]:
    cfg = spec.bundles.triton
    return tuple(SERVED_BY[b] for b in (cfg.backend, *cfg.extra_backends) if b in SERVED_BY)


def engine_plans(folder: Path, log: Any) -> dict[int, Path]:
    """compute capability -> plan of the engine stage's built targets (one per SM: Triton's
    cc_model_filenames cannot tell two GPUs of one SM apart, e.g. H100 and H200)."""
    plans: dict[int, Path] = {}
    for entry in json.loads((folder / MANIFEST).read_text())["targets"]:
        if entry["status"] != "built":
            continue
        if entry["sm"] in plans:
            log(f"triton: engine {entry['name']} left out: sm{entry['sm']} is served by {plans[entry['sm']]}")
            continue
        plans[entry["sm"]] = folder / entry["plan"]
    return plans


def run(ctx: Context) -> dict[str, Any]:
    engines = engine_plans(ctx.inputs["engine"], ctx.log) if "engine" in ctx.inputs else None
    return write_bundle(ctx.spec, ctx.inputs["weights"], ctx.inputs["export"], ctx.out,
                        engines=engines, aoti=ctx.inputs.get("aoti"), log=ctx.log)  # fmt: skip


STAGE = Stage(
    name="triton",
    output="triton",
    reads=("bundles.triton", "model"),
    inputs=("weights", "export"),
    toolkits=("tritonclient", "protobuf"),
    run=run,
    doc="Triton model repository: ensemble of python preprocess, onnxruntime dense model, postprocess",
    enabled=lambda spec: spec.bundles.triton.enabled,
    optional_inputs=served_stages,
)
