"""The stages, in data-flow order. Each module declares one ``STAGE``; the graph wires them."""

from __future__ import annotations

from grc.stages import engine, export, plugins, quantize, surgery, verify, weights
from grc.stages.base import Stage

STAGES: list[Stage] = [
    weights.STAGE,
    export.STAGE,
    surgery.STAGE,
    quantize.STAGE,
    verify.STAGE,
    plugins.STAGE,
    engine.STAGE,
]
STAGES.append(__import__("grc.stages.triton_bundle", fromlist=["STAGE"]).STAGE)  # bundles.triton
STAGES.append(__import__("grc.stages.vllm_bundle", fromlist=["STAGE"]).STAGE)  # bundles.vllm
STAGES.append(__import__("grc.stages.aoti", fromlist=["STAGE"]).STAGE)  # engine.aoti (AOTInductor)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage named {name!r}; stages: {', '.join(s.name for s in STAGES)}")
