"""triton: the Triton model repository (ensemble preprocess -> dense -> postprocess) + bundle.json.

Cheap and self-contained: configs are rendered from ``bundles.triton`` and ``model``, the weights
and the exported ONNX are hard-linked from their stages' outputs (copied across filesystems), so
editing ``bundles.triton.*`` reruns this stage alone. See grc/serving/bundle.py for the layout.
"""

from __future__ import annotations

from typing import Any

from grc.serving.bundle import write_bundle
from grc.stages.base import Context, Stage


def run(ctx: Context) -> dict[str, Any]:
    # Hook: a tensorrt_plan backend needs the engine stage's plans (write_bundle(engines=...)).
    return write_bundle(ctx.spec, ctx.inputs["weights"], ctx.inputs["export"], ctx.out, log=ctx.log)


STAGE = Stage(
    name="triton",
    output="triton",
    reads=("bundles.triton", "model"),
    inputs=("weights", "export"),
    toolkits=("tritonclient", "protobuf"),
    run=run,
    doc="Triton model repository: ensemble of python preprocess, onnxruntime dense model, postprocess",
    enabled=lambda spec: spec.bundles.triton.enabled,
)
