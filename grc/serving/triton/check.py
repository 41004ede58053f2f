"""Talk to a served bundle and check its answers against the PyTorch model.

Used by ``grc deploy --target triton``, the serving tests and bench/triton_load.py.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grc.serving.common import request as rq
from grc.serving.common.reference import ReferenceModel
from grc.spec.schema import ModelConfig, Spec, Tolerance

WIRE = {
    np.dtype(np.int64): "INT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.int32): "INT32",
    np.dtype(np.float64): "FP64",
}


def infer_inputs(client_module: Any, arrays: dict[str, np.ndarray]) -> list[Any]:
    """tritonclient InferInputs (``tritonclient.http`` or ``tritonclient.grpc``) of numpy arrays."""
    out = []
    for name, array in arrays.items():
        tensor = client_module.InferInput(name, list(array.shape), WIRE[array.dtype])
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        out.append(tensor)
    return out


def clients_missing() -> str | None:
    """Why the smoke test's two clients (HTTP and gRPC) cannot run here, or None. tritonclient's own error
    for a missing HTTP client names no install command, and it would come after a server was started."""
    problems = []
    for protocol in ("http", "grpc"):
        try:
            __import__(f"tritonclient.{protocol}")
        except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError for a missing extra
            problems.append(f"tritonclient.{protocol} ({type(exc).__name__}: {exc})")
    if not problems:
        return None
    return (
        f"the smoke test sends its request over HTTP and gRPC, and {' and '.join(problems)} cannot be imported; "
        "install the serving clients with: pip install 'tritonclient[http,grpc]==2.73.0' (grc's `serve` extra)"
    )


def infer(
    url: str, protocol: str, model: str, arrays: dict[str, np.ndarray], timeout_s: float = 60.0
) -> dict[str, np.ndarray]:
    """One request over ``http`` or ``grpc``; every response output as numpy."""
    if protocol == "http":
        import tritonclient.http as client_module

        with client_module.InferenceServerClient(url, network_timeout=timeout_s) as client:
            result = client.infer(model, infer_inputs(client_module, arrays))
    else:
        import tritonclient.grpc as client_module  # type: ignore[no-redef]

        with client_module.InferenceServerClient(url) as client:
            result = client.infer(model, infer_inputs(client_module, arrays), client_timeout=timeout_s)
    return {name: result.as_numpy(name) for name in rq.OUTPUTS}


class Reference(ReferenceModel):
    """The PyTorch model on the bundle's weights: the [b, c, tasks] a Triton request's ``scores`` must hold."""

    def __init__(self, cfg: ModelConfig, weights_dir: Path, truncate_history: bool = True):
        super().__init__(cfg, weights_dir)
        self.truncate = truncate_history

    def scores(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        from grc.serving.common.validate import parse

        checked = parse(dict(arrays), self.cfg, self.truncate)
        batch = rq.request_batch(checked, self.cfg)
        return self.run(batch).reshape(batch.users, -1, len(self.cfg.tasks))


@dataclass
class Check:
    max_abs: float
    max_rel: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_response(
    response: dict[str, np.ndarray],
    expected: np.ndarray,
    arrays: dict[str, np.ndarray],
    cfg: ModelConfig,
    weights: np.ndarray,
    top_k: int,
    tolerance: Tolerance,
) -> Check:
    """Every score against the reference, and the ranking consistent with the scores."""
    problems = []
    got = response["scores"].astype(np.float64)
    if got.shape != expected.shape:
        return Check(float("inf"), float("inf"), [f"scores: shape {list(got.shape)}, expected {list(expected.shape)}"])
    diff = np.abs(got - expected)
    max_abs = float(diff.max(initial=0.0))
    max_rel = max_abs / max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    if max_abs > tolerance.max_abs or max_rel > tolerance.max_rel:
        problems.append(
            f"scores differ from PyTorch: max_abs {max_abs:.3e} (tolerance {tolerance.max_abs:.1e}), "
            f"max_rel {max_rel:.3e} (tolerance {tolerance.max_rel:.1e})"
        )
    order = response["ranked_candidates"]
    k = min(top_k, expected.shape[1])
    combined = (expected * weights).sum(-1)
    if order.shape != (expected.shape[0], k):
        problems.append(f"ranked_candidates: shape {list(order.shape)}, expected {[expected.shape[0], k]}")
        return Check(max_abs, max_rel, problems)
    ranked = np.take_along_axis(combined, order, axis=1)
    slack = tolerance.max_abs * max(float(np.abs(weights).sum()), 1.0) * 2
    if (np.diff(ranked, axis=1) > slack).any():
        problems.append(f"ranked_candidates are not best first: ranking scores {ranked.round(6).tolist()}")
    best = np.sort(combined, axis=1)[:, ::-1][:, :k]
    if np.abs(ranked - best).max(initial=0.0) > slack:
        problems.append("ranked_candidates are not the top k of the reference ranking scores")
    if np.abs(response["ranked_scores"] - ranked).max(initial=0.0) > slack:
        problems.append("ranked_scores differ from the weighted reference scores")
    ids = arrays[rq.candidate_input(cfg.candidate[0])]
    if not np.array_equal(response["ranked_items"], np.take_along_axis(ids, order, axis=1)):
        problems.append("ranked_items are not the ids of ranked_candidates")
    if not np.allclose(response["ranked_task_scores"], np.take_along_axis(got, order[:, :, None], axis=1)):
        problems.append("ranked_task_scores are not the scores of ranked_candidates")
    return Check(max_abs, max_rel, problems)


def spec_check(
    spec: Spec, response: dict[str, np.ndarray], expected: np.ndarray, arrays: dict[str, np.ndarray]
) -> Check:
    cfg = spec.bundles.triton
    return check_response(
        response, expected, arrays, spec.model, rq.rank_weights(spec.model, cfg), cfg.top_k, spec.verify.export
    )


# --------------------------------------------------------------------------- metrics


def metrics_text(url: str, timeout_s: float = 5.0) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout_s) as response:
        return str(response.read().decode())


def metric(text: str, name: str, model: str) -> float | None:
    found = re.search(rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def batch_sizes(grpc_url: str, model: str) -> dict[int, int]:
    """Executions per batch size of ``model`` so far (Triton's statistics extension)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        stats = client.get_inference_statistics(model).model_stats
    return {int(b.batch_size): int(b.compute_infer.count) for s in stats for b in s.batch_stats}
