"""onnxruntime sessions for grc graphs, including the fused ``grc::HSTUAttention`` node.

The custom op runs through onnxruntime-extensions' Python custom ops, which ORT only looks up in
the extensions' own domain (``ai.onnx.contrib``). So the session is built from an in-memory copy
whose grc-domain nodes are moved to that domain; the artifact on disk keeps ``grc`` (what the
TensorRT parser and the plugin expect). The op's body is the same padded PyTorch function the
model uses, so a surgeried graph is checked against the math, not against itself.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from grc.model.attention import hstu_attention_padded
from grc.onnx.surgery.passes import ATTENTION_OP, PLUGIN_NAMESPACE

EXT_DOMAIN = "ai.onnx.contrib"


@cache
def _register() -> str:
    """Declare the Python custom op once per process; return the extensions library path."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    f, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    attrs = {
        "num_heads": i64,
        "head_dim_qk": i64,
        "head_dim_v": i64,
        "alpha": f,
        "norm": f,
        "causal": i64,
        "position_buckets": i64,
        "time_buckets": i64,
    }

    @onnx_op(op_type=ATTENTION_OP, inputs=[f, f, f, i64, i64, i64, f, f], outputs=[f], attrs=attrs)
    def hstu_attention(q, k, v, lengths, num_candidates, timestamps, pos_w, ts_w, **kw):  # type: ignore[no-untyped-def]
        out = hstu_attention_padded(
            torch.from_numpy(q),
            torch.from_numpy(k),
            torch.from_numpy(v),
            torch.from_numpy(lengths),
            torch.from_numpy(num_candidates),
            torch.from_numpy(timestamps),
            torch.from_numpy(pos_w),
            torch.from_numpy(ts_w),
            float(kw["alpha"]),
            float(kw["norm"]),
            bool(int(kw["causal"])),
        )
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    return str(get_library_path())


def has_custom_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == PLUGIN_NAMESPACE for n in model.graph.node)


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session for an exported or surgeried model (custom ops registered when present)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Q/DQ graphs (engine.precision int8 / fp8) run as written, DequantizeLinear -> float op -> QuantizeLinear:
    # onnxruntime would otherwise fuse them into its own int8 kernels, which on x86 CPUs without VNNI (AVX2 only)
    # multiply u8 x s8 with saturating 16-bit sums (vpmaddubsw, onnxruntime's quantization docs): on such a host
    # (session 8: AMD EPYC, avx2, no avx512/vnni) hstu-tiny's int8 graph measured Kendall tau 0.76-0.84, where
    # earlier hosts measured 0.93-0.95 and this form measures 0.96-0.97 (tests/engine/test_quantized_engines.py).
    # The ranking gates judge the quantized graph (TensorRT sums int8 products exactly), not a CPU's int8 kernels.
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    model = onnx.load(str(path), load_external_data=False)
    if not has_custom_ops(model):
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    opts.register_custom_ops_library(_register())
    for node in model.graph.node:
        if node.domain == PLUGIN_NAMESPACE:
            node.domain = EXT_DOMAIN
            keep = [a for a in node.attribute if not a.name.startswith("plugin_")]
            del node.attribute[:]
            node.attribute.extend(keep)
    model.opset_import.append(onnx.helper.make_opsetid(EXT_DOMAIN, 1))
    with tempfile.TemporaryDirectory(prefix="grc-ort-") as tmp:
        # keep external data where it is: link it beside the rewritten graph
        for data in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
            os.symlink(path.parent / data, Path(tmp) / data)
        onnx.save_model(model, str(Path(tmp) / path.name))
        return ort.InferenceSession(str(Path(tmp) / path.name), opts, providers=["CPUExecutionProvider"])
