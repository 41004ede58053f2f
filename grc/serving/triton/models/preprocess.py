"""preprocess: raw request -> projected tokens of the dense model.

Checks every request (grc.serving.common.validate.parse: types, shapes, lengths that agree, ids inside
their tables, timestamps in range, history and candidate counts), looks the ids up in the
memory-mapped embedding tables and runs the token projector, for all requests of an execution at
once. A bad request gets its own error response; the others in the same execution are served
(grc.serving.triton.models.steps).

Out, per request of ``b`` users with ``L`` tokens each (profile + history + candidates):
tokens FP32 [b, L, D], timestamps INT64 [b, L], lengths INT64 [b, 1], num_candidates INT64 [b, 1].
With ``pad_to`` (the TensorRT step: the batcher concatenates requests, so shapes must agree)
tokens and timestamps are zero-padded to ``pad_to`` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from grc.serving.common import request as rq
from grc.serving.common.validate import RequestParser
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io
from grc.spec.schema import ModelConfig

OUTPUTS = ("tokens", "timestamps", "lengths", "num_candidates")


def merge(requests: list[dict[str, np.ndarray]], cfg: ModelConfig) -> Any:
    """Checked requests -> one ``grc.model.gr.Batch`` of all their users (jagged, in order)."""
    import torch

    from grc.model.gr import Batch

    parts = [rq.request_batch(r, cfg) for r in requests]

    def offsets(name: str) -> torch.Tensor:
        sizes = torch.cat([getattr(p, name)[1:] - getattr(p, name)[:-1] for p in parts])
        return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])

    return Batch(
        profile=torch.cat([p.profile for p in parts]),
        history={t: torch.cat([p.history[t] for p in parts]) for t in cfg.history},
        history_time=torch.cat([p.history_time for p in parts]),
        history_offsets=offsets("history_offsets"),
        candidates={t: torch.cat([p.candidates[t] for p in parts]) for t in cfg.candidate},
        candidate_offsets=offsets("candidate_offsets"),
        cross=torch.cat([p.cross for p in parts]),
        request_time=torch.cat([p.request_time for p in parts]),
    )


def project(
    requests: list[dict[str, np.ndarray]], projector: Any, tables: Any, cfg: ModelConfig, pad_to: int | None = None
) -> list[dict[str, Any]]:
    """Checked requests -> per request the dense model's inputs (one projector call for all)."""
    import torch

    with torch.no_grad():
        tok = projector(merge(requests, cfg), tables)
    tokens, stamps = tok.tokens.to(torch.float32).numpy(), tok.timestamps.numpy()
    offsets = tok.offsets.tolist()
    outs, user = [], 0
    for r in requests:
        b = r[rq.REQUEST_TIME].shape[0]
        start, end = offsets[user], offsets[user + b]
        length = (end - start) // b
        c = r[rq.candidate_input(cfg.candidate[0])].shape[1]
        t = tokens[start:end].reshape(b, length, -1)
        s = stamps[start:end].reshape(b, length)
        if pad_to is not None:
            t = np.concatenate([t, np.zeros((b, pad_to - length, t.shape[2]), np.float32)], 1)
            s = np.concatenate([s, np.zeros((b, pad_to - length), np.int64)], 1)
        outs.append(
            {
                "tokens": np.ascontiguousarray(t, np.float32),
                "timestamps": np.ascontiguousarray(s, np.int64),
                "lengths": np.full((b, 1), length, np.int64),
                "num_candidates": np.full((b, 1), c, np.int64),
            }
        )
        user += b
    return outs


def load_projector(cfg: ModelConfig, weights_dir: Path) -> Any:
    """The token projector with its weights, reading only its own tensors from the shards."""
    import torch

    from grc.model.gr import TokenProjector
    from grc.weights import read_manifest
    from grc.weights.safetensors_io import memmap_tensor, read_header, to_float32

    manifest = read_manifest(weights_dir)
    projector = TokenProjector(cfg)
    state, headers = {}, {}
    for name in projector.state_dict():
        key = f"projector.{name}"
        shard = weights_dir / manifest["tensors"][key]["shard"]
        if shard not in headers:
            headers[shard] = read_header(shard)
        header, start = headers[shard]
        info = header[key]
        state[name] = to_float32(memmap_tensor(shard, info, start), info["dtype"]).reshape(info["shape"]).clone()
    projector.load_state_dict(state)
    return projector.eval().to(torch.float32)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from grc.weights import open_tables

        torch.set_num_threads(1)  # one core per stub; Triton scales with instances
        params = io.parameters(args)
        self.name = args["model_name"]
        self.cfg = ModelConfig.model_validate_json(params["grc_model"])
        self.truncate = params.get("truncate_history", "true") == "true"
        self.parse = RequestParser(self.cfg, self.truncate)
        self.pad_to = int(params.get("pad_to", "0")) or None
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        self.projector = load_projector(self.cfg, weights)
        self.tables = open_tables(self.cfg, weights)
        self.names = [s.name for s in rq.request_inputs(self.cfg)]

    def execute(self, requests: list[Any]) -> list[Any]:
        return steps.execute(
            requests,
            self.name,
            self.names,
            self.parse,
            lambda batch: project(batch, self.projector, self.tables, self.cfg, self.pad_to),
        )
