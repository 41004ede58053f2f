"""``python -m grc.engine.quantize_worker request.json``: ModelOpt's ONNX PTQ of one graph, in a
process of its own (ModelOpt on its path, onnxruntime sessions patched: see grc/engine/quantize.py).

Request: onnx (surgeried graph), output, mode (int8 | fp8), feeds (.npz of calibration inputs),
ops (op types to quantize), exclude (op types left unquantized), scratch, result (where the JSON report goes).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from grc.onnx.ort import EXT_DOMAIN, _register
from grc.onnx.surgery.passes import PLUGIN_NAMESPACE

# ModelOpt's calibrators: entropy (KL) ranges for int8's 256 levels; amax for fp8, whose exponent
# already spends its levels on the small values
CALIBRATION = {"int8": "entropy", "fp8": "max"}


def _move_domain(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        if node.domain == old:
            node.domain = new
    kept = {o.domain: o for o in model.opset_import if o.domain != old}
    kept.setdefault(new, onnx.helper.make_opsetid(new, 1))
    del model.opset_import[:]
    model.opset_import.extend(kept.values())


def _sessions_with_custom_ops() -> None:
    """Every onnxruntime session this process opens (ModelOpt opens several, with options of its
    own) registers the onnxruntime-extensions library that runs grc's attention op. This process
    only: it exists to run ModelOpt."""
    import onnxruntime as ort

    library = _register()
    base = ort.InferenceSession

    class Session(base):  # type: ignore[misc,valid-type]
        def __init__(self, path_or_bytes: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> None:
            sess_options = sess_options or ort.SessionOptions()
            sess_options.register_custom_ops_library(library)
            super().__init__(path_or_bytes, sess_options, *args, **kwargs)

    ort.InferenceSession = Session  # type: ignore[misc]


def run(request: dict[str, Any]) -> dict[str, Any]:
    import modelopt
    from modelopt.onnx.quantization import quantize

    scratch = Path(request["scratch"])
    model = onnx.load(request["onnx"])
    before = Counter(n.op_type for n in model.graph.node)
    _move_domain(model, PLUGIN_NAMESPACE, EXT_DOMAIN)
    staged = scratch / f"{request['mode']}-in.onnx"
    big = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(staged), save_as_external_data=big, location=f"{staged.name}.data")
    quantized = scratch / f"{request['mode']}-out.onnx"
    feeds = dict(np.load(request["feeds"]))
    _sessions_with_custom_ops()
    started = time.perf_counter()
    quantize(
        onnx_path=str(staged),
        quantize_mode=request["mode"],
        calibration_data=feeds,
        calibration_method=CALIBRATION[request["mode"]],
        op_types_to_quantize=list(request["ops"]),
        op_types_to_exclude=list(request["exclude"]),
        output_path=str(quantized),
        calibration_eps=["cpu"],
        # fp16 for the unquantized rest needs TensorRT to type the custom node: those ops stay fp32
        high_precision_dtype="fp32",
        use_external_data_format=big,
    )
    seconds = time.perf_counter() - started
    out = onnx.load(str(quantized))
    _move_domain(out, EXT_DOMAIN, PLUGIN_NAMESPACE)
    after = Counter(n.op_type for n in out.graph.node)
    for op in request["exclude"]:
        if after[op] != before[op]:
            raise RuntimeError(f"{op} nodes: {before[op]} before quantization, {after[op]} after")
    if not after["QuantizeLinear"]:
        raise RuntimeError("ModelOpt inserted no QuantizeLinear node: nothing was quantized")
    dst = Path(request["output"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(out, str(dst), save_as_external_data=big, location=f"{dst.name}.data")
    onnx.checker.check_model(str(dst))
    q_types = sorted(
        {
            onnx.TensorProto.DataType.Name(i.data_type)
            for i in out.graph.initializer
            if any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] == i.name for n in out.graph.node)
        }
    )
    return {
        "tool": "nvidia-modelopt",
        "version": modelopt.__version__,
        "mode": request["mode"],
        "calibration_method": CALIBRATION[request["mode"]],
        "calibration_eps": ["cpu"],
        "quantized_op_types": list(request["ops"]),
        "excluded_op_types": list(request["exclude"]),
        "quantize_nodes": after["QuantizeLinear"],
        "dequantize_nodes": after["DequantizeLinear"],
        "zero_point_types": q_types,
        "op_counts": dict(sorted(after.items())),
        "seconds": round(seconds, 3),
    }


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    try:
        result = {"ok": True, **run(request)}
    except Exception as exc:  # reported as data: the stage turns it into a StageError naming the graph
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    Path(request["result"]).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
