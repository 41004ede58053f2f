"""grc.onnx.ort.session runs Q/DQ graphs as written (DequantizeLinear -> float op -> QuantizeLinear), not
through onnxruntime's fused int8 kernels, whose u8 x s8 sums saturate at 16 bits on x86 CPUs without VNNI (this
test fails through a plain session on such a host: checked on the session-8 AMD EPYC box). What verify's ranking
gates judge is the quantized graph, the same on every CI host."""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from grc.onnx.ort import session


def test_a_qdq_matmul_computes_the_dequantized_product(tmp_path: Path) -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    k = 64
    # activations near the top of uint8 and weights of full int8 range: pairs of u8 x s8 products overflow int16
    w = rng.integers(-127, 128, (k, 8)).astype(np.int8)
    x = rng.uniform(200.0, 255.0, (4, k)).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "ws"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        inits,
    )
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    sess = session(path)
    assert sess.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    (y,) = sess.run(None, {"x": x})
    expected = np.clip(np.rint(x), 0, 255).astype(np.int64) @ w.astype(np.int64)  # exact integer sums
    assert np.array_equal(y.astype(np.int64), expected), f"seed {seed}"
