"""The dense model step on AOTInductor: the aoti stage's .pt2 package in a python-backend model.

Same tensors in and out as the ONNX step (grc/serving/triton/models/dense_onnx.py): padded
[b, L, D] tokens with per-user lengths. The package takes the jagged layout, so the users of all
requests in one execute() are flattened into ONE jagged batch (no padding work at all), run once,
and the scores are scattered back per request. A candidate's score cannot depend on who shares
its batch: the model masks by user and divides attention by the constant max_seq_len.

The instance's kind picks the package: KIND_CPU the cpu one (float32), KIND_GPU the GPU one on
the instance's device (in the dtype it was built for; scores are returned as FP32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from grc.serving.common.validate import check_dense
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io
from grc.serving.triton.models.dense_onnx import INPUTS
from grc.serving.triton.models.host import set_host_threads


def to_jagged(requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Padded per-request inputs -> the package's jagged inputs over all their users."""
    tokens, stamps, lengths, cands = [], [], [], []
    for r in requests:
        for u, n in enumerate(r["lengths"].reshape(-1).tolist()):
            tokens.append(r["tokens"][u, :n])
            stamps.append(r["timestamps"][u, :n])
            lengths.append(n)
        cands.extend(r["num_candidates"].reshape(-1).tolist())
    offsets = np.zeros(len(lengths) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    return {
        "tokens": np.ascontiguousarray(np.concatenate(tokens), np.float32),
        "offsets": offsets,
        "num_candidates": np.asarray(cands, np.int64),
        "timestamps": np.ascontiguousarray(np.concatenate(stamps), np.int64),
    }


def from_jagged(scores: np.ndarray, requests: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Jagged scores [T, tasks] -> per request [b, L, tasks], zero at padding."""
    out, start = [], 0
    for r in requests:
        b, n = r["tokens"].shape[:2]
        padded = np.zeros((b, n, scores.shape[1]), np.float32)
        for u, length in enumerate(r["lengths"].reshape(-1).tolist()):
            padded[u, :length] = scores[start : start + length]
            start += length
        out.append(padded)
    return out


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from grc.aoti.build import DTYPES
        from grc.aoti.runtime import load

        params = io.parameters(args)
        self.name = args["model_name"]
        gpu = args.get("model_instance_kind") == "GPU"
        packages = json.loads(params["packages"])
        package = Path(args["model_repository"]) / args["model_version"] / packages["gpu" if gpu else "cpu"]
        meta = json.loads((package.parent / "metadata.json").read_text())
        self.device = torch.device(f"cuda:{int(args['model_instance_device_id'])}" if gpu else "cpu")
        self.dtype = DTYPES[meta["dtype"]]
        set_host_threads(params)
        self.width = int(params["d_model"])
        self.max_seq_len = int(params["max_seq_len"])
        self.run = load(package, self.device)

    def execute(self, requests: list[Any]) -> list[Any]:
        import torch

        from grc.aoti.model import INPUTS as PACKAGE_ARGS  # the package's argument order

        def run(batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            feeds = to_jagged(batch)
            args = [torch.from_numpy(feeds[k]).to(self.device) for k in PACKAGE_ARGS]
            args[0] = args[0].to(self.dtype)
            with torch.no_grad():
                scores = self.run(*args).float().cpu().numpy()
            return [{"scores": s} for s in from_jagged(scores, batch)]

        return steps.execute(requests, self.name, INPUTS, lambda r: check_dense(r, self.width, self.max_seq_len), run)
