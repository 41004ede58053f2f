"""triton: the Triton model repository (ensemble preprocess -> dense -> postprocess) + bundle.json.

With the aotinductor backend the stage also reads the aoti stage's packages (an optional input:
only specs that serve them wait for, and are keyed by, that stage).

Cheap and self-contained: configs are rendered from ``bundles.triton`` and ``model``, the weights
and the exported ONNX are hard-linked from their stages' outputs (copied across filesystems), so
editing ``bundles.triton.*`` reruns this stage alone. See grc/serving/bundle.py for the layout.
"""

from __future__ import annotations

from typing import Any

from grc.serving.bundle import write_bundle
from grc.stages.base import Context, Stage


def serves_aoti(spec: Any) -> bool:
    cfg = spec.bundles.triton
    return "aotinductor" in (cfg.backend, *cfg.extra_backends)


def run(ctx: Context) -> dict[str, Any]:
    # Hook: a tensorrt_plan backend needs the engine stage's plans (write_bundle(engines=...)).
    return write_bundle(ctx.spec, ctx.inputs["weights"], ctx.inputs["export"], ctx.out,
                        aoti=ctx.inputs.get("aoti"), log=ctx.log)  # fmt: skip


STAGE = Stage(
    name="triton",
    output="triton",
    reads=("bundles.triton", "model"),
    inputs=("weights", "export"),
    toolkits=("tritonclient", "protobuf"),
    run=run,
    doc="Triton model repository: ensemble of python preprocess, onnxruntime dense model, postprocess",
    enabled=lambda spec: spec.bundles.triton.enabled,
    optional_inputs=lambda spec: ("aoti",) if serves_aoti(spec) else (),
)
