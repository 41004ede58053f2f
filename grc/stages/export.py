"""export: the dense model (HSTU stack + heads) -> ONNX, padded layout, dynamic users and tokens.

Inputs of the graph (B users, N tokens, D = d_model):
  tokens [B, N, D] float32, lengths [B] int64, num_candidates [B] int64, timestamps [B, N] int64
Output: scores [B, N, tasks] float32, zero except at each user's candidate tokens.
The padded layout is what engines and ONNX runtimes take; the jagged model computes the same
numbers (tests). Embedding tables are not in the graph (see grc/model/gr.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from grc.stages.base import Context, Stage

MODEL = "model.onnx"
DATA = "model.onnx.data"


def file_digests(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).exists()}


def run(ctx: Context) -> dict[str, Any]:
    import onnx
    import torch

    from grc.onnx.export import export_onnx, signature
    from grc.weights import DENSE_VIEW, load_model

    spec = ctx.spec
    model = load_model(spec.model, ctx.inputs["weights"])
    onnx_model = export_onnx(
        model.dense,
        ctx.out / MODEL,
        spec.export.opset,
        spec.export.sample_users,
        spec.export.external_data_threshold_mb << 20,
    )
    sig = signature(onnx_model)
    ctx.log(
        f"export: {len(onnx_model.graph.node)} nodes, opset {spec.export.opset}, "
        f"inputs {', '.join(i['name'] + str(i['shape']) for i in sig['inputs'])}"
    )
    return {
        "model": MODEL,
        "external_data": DATA if (ctx.out / DATA).exists() else None,
        "opset": spec.export.opset,
        "layout": "padded",
        **sig,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "weights_dense_sha256": hashlib.sha256((ctx.inputs["weights"] / DENSE_VIEW).read_bytes()).hexdigest(),
        "sha256": file_digests(ctx.out, (MODEL, DATA)),
    }


STAGE = Stage(
    name="export",
    output="onnx",
    reads=("model", "export"),
    inputs=("weights",),
    input_files={"weights": "dense.json"},  # the tables are not in the graph (DENSE_VIEW in grc/weights/artifact.py)
    toolkits=("torch", "onnx", "onnxscript"),
    run=run,
    doc="dense model -> ONNX (padded layout, dynamic users/tokens), checked and shape-inferred",
)
