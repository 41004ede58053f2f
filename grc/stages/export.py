"""export: the dense model (HSTU stack + heads) -> ONNX, padded layout, dynamic users and tokens.

Inputs of the graph (B users, N tokens, D = d_model):
  tokens [B, N, D] float32, lengths [B] int64, num_candidates [B] int64, timestamps [B, N] int64
Output: scores [B, N, tasks] float32, zero except at each user's candidate tokens.
The padded layout is what engines and ONNX runtimes take; the jagged model computes the same
numbers (tests). Embedding tables are not in the graph (see grc/model/gr.py).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from grc.errors import StageError
from grc.model.gr import GRDense
from grc.stages.base import Context, Stage
from grc.weights import load_model

MODEL = "model.onnx"
DATA = "model.onnx.data"
INPUTS = ("tokens", "lengths", "num_candidates", "timestamps")
OUTPUTS = ("scores",)


class PaddedDense(nn.Module):
    """The export entry point: GRDense.forward_padded with named tensor arguments."""

    def __init__(self, dense: GRDense):
        super().__init__()
        self.dense = dense

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, num_candidates: torch.Tensor,
                timestamps: torch.Tensor) -> torch.Tensor:
        return self.dense.forward_padded(tokens, lengths, num_candidates, timestamps)


def sample_inputs(d_model: int, users: int, tokens: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.full((users,), tokens, dtype=torch.int64)
    lengths[1:] = tokens - 1  # ragged, so no length is specialised into the graph
    return (
        torch.randn(users, tokens, d_model, generator=gen),
        lengths,
        torch.ones(users, dtype=torch.int64),
        torch.randint(0, 1 << 30, (users, tokens), generator=gen),
    )


def export_onnx(dense: GRDense, path: Path, opset: int, users: int, threshold_bytes: int) -> onnx.ModelProto:
    """Trace with torch.export (dynamo exporter), save (external data past the threshold), check."""
    cfg = dense.cfg
    users_dim = torch.export.Dim("users", min=1, max=4096)
    tokens_dim = torch.export.Dim("tokens", min=2, max=cfg.hstu.max_seq_len)
    dynamic = {"tokens": {0: users_dim, 1: tokens_dim}, "lengths": {0: users_dim},
               "num_candidates": {0: users_dim}, "timestamps": {0: users_dim, 1: tokens_dim}}
    args = sample_inputs(cfg.d_model, max(users, 2), min(8, cfg.hstu.max_seq_len))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's axis-renaming chatter
        program = torch.onnx.export(
            PaddedDense(dense).eval(), args, dynamo=True, opset_version=opset, optimize=True,
            input_names=list(INPUTS), output_names=list(OUTPUTS), dynamic_shapes=dynamic, verbose=False,
        )
    if program is None:
        raise StageError("export: torch.onnx.export returned no program")
    model = program.model_proto
    strip_paths(model)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > threshold_bytes
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)  # the path form handles > 2 GB models
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    return onnx.load(str(path), load_external_data=False)


def strip_paths(model: onnx.ModelProto) -> None:
    """Drop the exporter's Python stack traces: they hold this checkout's absolute paths, and the
    same inputs must give the same bytes in any clone (the build cache relies on it)."""
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


def signature(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def file_digests(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).exists()}


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    model = load_model(spec.model, ctx.inputs["weights"])
    onnx_model = export_onnx(model.dense, ctx.out / MODEL, spec.export.opset, spec.export.sample_users,
                             spec.export.external_data_threshold_mb << 20)
    sig = signature(onnx_model)
    ctx.log(f"export: {len(onnx_model.graph.node)} nodes, opset {spec.export.opset}, "
            f"inputs {', '.join(i['name'] + str(i['shape']) for i in sig['inputs'])}")
    return {
        "model": MODEL,
        "external_data": DATA if (ctx.out / DATA).exists() else None,
        "opset": spec.export.opset,
        "layout": "padded",
        **sig,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "weights_sha256": [s["sha256"] for s in ctx.input_manifest("weights")["shards"]],
        "sha256": file_digests(ctx.out, (MODEL, DATA)),
    }


STAGE = Stage(
    name="export",
    output="onnx",
    reads=("model", "export"),
    inputs=("weights",),
    toolkits=("torch", "onnx", "onnxscript"),
    run=run,
    doc="dense model -> ONNX (padded layout, dynamic users/tokens), checked and shape-inferred",
)
