"""Graph conversions done before an engine build, each reported.

TensorRT-RTX networks are strongly typed: there is no fp16/bf16 builder flag, a tensor's type is
the one the ONNX graph gives it. So ``fp16``/``bf16`` engines come from a converted copy of the
surgeried graph: float32 initializers and constants in the low type, float casts retargeted, and a
Cast at each float graph input and output so the engine's I/O stays float32 (a serving client
feeds the same tensors whatever the precision). The artifact from surgery is never modified.

The int64 inputs (lengths, num_candidates, timestamps) need no conversion: the TensorRT-RTX parser
keeps them as INT64 bindings (it warns "Make sure input ... has Int64 binding") and the plugin
accepts int64 or int32 index inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from grc.errors import StageError

LOW = {
    "fp16": (TensorProto.FLOAT16, np.dtype(np.float16)),
    "bf16": (TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
}
FP16_MAX = 65504.0
# ops whose float output type is an attribute we do not rewrite: refuse rather than build a mixed graph
TYPED_ATTR_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial"}


def _low_tensor(t: TensorProto, dtype: np.dtype, report: dict[str, Any]) -> TensorProto:
    values = numpy_helper.to_array(t).astype(np.float32)
    if dtype == np.float16:
        over = int((np.abs(values) > FP16_MAX).sum())
        if over:
            report["clipped_to_fp16_range"][t.name or "?"] = over
            values = np.clip(values, -FP16_MAX, FP16_MAX)
    out = numpy_helper.from_array(values.astype(dtype), t.name)
    return out


def convert(src: Path, dst: Path, precision: str) -> dict[str, Any]:
    """Write ``src`` converted to ``precision`` at ``dst``; return what was changed (for the metadata)."""
    if precision == "fp32":
        return {"precision": "fp32", "conversions": []}
    elem, dtype = LOW[precision]
    model = onnx.load(str(src))  # loads external data too: the dense graph is small, embedding tables are not in it
    graph = model.graph
    report: dict[str, Any] = {
        "precision": precision,
        "initializers": 0,
        "constants": 0,
        "casts_retargeted": 0,
        "input_casts": [],
        "output_casts": [],
        "clipped_to_fp16_range": {},
    }
    for node in graph.node:
        if node.op_type in TYPED_ATTR_OPS or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
        ):
            raise StageError(
                f"engine: cannot convert node {node.name} ({node.op_type}) to {precision}: "
                "typed-attribute or control-flow ops are not supported by the precision pass"
            )
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_low_tensor(init, dtype, report))
            report["initializers"] += 1
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_low_tensor(attr.t, dtype, report))  # Constant value, ConstantOfShape value
                report["constants"] += 1
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = elem
                report["casts_retargeted"] += 1
    float_inputs = [i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    casts = []
    for name in float_inputs:
        low = f"{name}.{precision}"
        for node in graph.node:
            node.input[:] = [low if x == name else x for x in node.input]
        casts.append(onnx.helper.make_node("Cast", [name], [low], name=f"grc.cast_in.{name}", to=elem))
        report["input_casts"].append(name)
    tail = []
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        low = f"{out.name}.{precision}"
        for node in graph.node:
            node.output[:] = [low if x == out.name else x for x in node.output]
            node.input[:] = [low if x == out.name else x for x in node.input]
        tail.append(
            onnx.helper.make_node("Cast", [low], [out.name], name=f"grc.cast_out.{out.name}", to=TensorProto.FLOAT)
        )
        report["output_casts"].append(out.name)
    nodes = casts + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # intermediate types changed; the parser infers them again
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights beside the graph
    onnx.save_model(model, str(dst), save_as_external_data=big, location=f"{dst.name}.data")
    report["conversions"] = [
        f"{report['initializers']} float32 initializers and {report['constants']} constants -> {precision}",
        f"{report['casts_retargeted']} Cast(to=float32) -> {precision}",
        f"Cast at inputs {report['input_casts']} and outputs {report['output_casts']} (engine I/O stays float32)",
    ]
    return report
