"""The dense model step on onnxruntime: the exported ONNX (padded layout) in a python-backend model.

With dynamic batching one execute() receives several requests of different lengths (the inputs
are ``allow_ragged_batch``). They are padded into ONE [users, longest, D] batch and ONE
session.run, and the scores are split back per request. Padding cannot change a score: the model
masks padded tokens and divides attention by the constant max_seq_len (grc/model/hstu.py), so a
candidate's score does not depend on who shares its batch (tests check it through the server).

In, per request of b users of L tokens: tokens FP32 [b, L, D], timestamps INT64 [b, L],
lengths INT64 [b, 1], num_candidates INT64 [b, 1]. Out: scores FP32 [b, L, tasks].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from grc.serving.common.validate import check_dense
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io

INPUTS = ("tokens", "timestamps", "lengths", "num_candidates")


def pad_batch(requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-request dense inputs -> the ONNX feeds of all their users, padded to the longest."""
    longest = max(r["tokens"].shape[1] for r in requests)
    users = sum(r["tokens"].shape[0] for r in requests)
    width = requests[0]["tokens"].shape[2]
    tokens = np.zeros((users, longest, width), np.float32)
    stamps = np.zeros((users, longest), np.int64)
    row = 0
    for r in requests:
        b, n = r["tokens"].shape[:2]
        tokens[row : row + b, :n] = r["tokens"]
        stamps[row : row + b, :n] = r["timestamps"]
        row += b
    return {
        "tokens": tokens,
        "lengths": np.concatenate([r["lengths"].reshape(-1) for r in requests]).astype(np.int64),
        "num_candidates": np.concatenate([r["num_candidates"].reshape(-1) for r in requests]).astype(np.int64),
        "timestamps": stamps,
    }


def split_scores(scores: np.ndarray, requests: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    out, row = [], 0
    for r in requests:
        b, n = r["tokens"].shape[:2]
        out.append(np.ascontiguousarray(scores[row : row + b, :n], np.float32))
        row += b
    return out


def make_session(path: Path, threads: int, gpu: int | None) -> Any:
    """A session for the exported graph (or a surgeried one: then grc's custom op is registered, CPU only)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    if any(n.domain == "grc" for n in model.graph.node):
        if gpu is not None:  # the custom op is a Python function on the CPU: never a silent CPU session
            raise RuntimeError(
                f"{path.name} has grc custom ops (grc::HSTUAttention), which onnxruntime runs on the "
                "CPU only (a Python custom op); a KIND_GPU instance cannot serve it: use instance_kind "
                "KIND_CPU, or the tensorrt_plan backend on the GPU"
            )
        from grc.onnx.ort import session

        return session(path, threads)
    if gpu is not None:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"KIND_GPU instance, but onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                f"(install onnxruntime-gpu, or use instance_kind KIND_CPU)"
            )
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": gpu})]  # GPU or an error, no CPU fallback
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = io.parameters(args)
        self.name = args["model_name"]
        gpu = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        self.session = make_session(path, int(params.get("intra_op_threads", "1")), gpu)
        self.width = int(next(i for i in self.session.get_inputs() if i.name == "tokens").shape[2])
        self.max_seq_len = int(params["max_seq_len"])

    def execute(self, requests: list[Any]) -> list[Any]:
        def run(batch: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
            (scores,) = self.session.run(["scores"], pad_batch(batch))
            return [{"scores": s} for s in split_scores(scores, batch)]

        return steps.execute(requests, self.name, INPUTS, lambda r: check_dense(r, self.width, self.max_seq_len), run)
