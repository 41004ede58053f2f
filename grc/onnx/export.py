"""torch -> ONNX for the dense model (padded layout, dynamic users and tokens): the heavy half of
the export stage, imported only when the stage runs (a no-op build never loads torch)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from grc.errors import StageError
from grc.model.gr import GRDense

INPUTS = ("tokens", "lengths", "num_candidates", "timestamps")
OUTPUTS = ("scores",)
DATA = "model.onnx.data"


class PaddedDense(nn.Module):
    """The export entry point: GRDense.forward_padded with named tensor arguments."""

    def __init__(self, dense: GRDense):
        super().__init__()
        self.dense = dense

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, num_candidates: torch.Tensor, timestamps: torch.Tensor
    ) -> torch.Tensor:
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
    dynamic = {
        "tokens": {0: users_dim, 1: tokens_dim},
        "lengths": {0: users_dim},
        "num_candidates": {0: users_dim},
        "timestamps": {0: users_dim, 1: tokens_dim},
    }
    args = sample_inputs(cfg.d_model, max(users, 2), min(8, cfg.hstu.max_seq_len))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's axis-renaming chatter
        program = torch.onnx.export(
            PaddedDense(dense).eval(),
            args,
            dynamo=True,
            opset_version=opset,
            optimize=True,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=dynamic,
            verbose=False,
        )
    if program is None:
        raise StageError("export: torch.onnx.export returned no program")
    model = program.model_proto
    strip_paths(model)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > threshold_bytes
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=DATA,
        size_threshold=1024,
    )
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
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
