"""The user-history cache inside the fused model (bundles.triton.history_cache with pipeline: fused).

Users sent with a ``user_id`` are scored through the cache step shared with the ensemble path's
cached model (grc/serving/common/history_step.py: a hit computes only its new history events and
candidates against the cached K/V, a miss the whole sequence against an empty cache, one
``GRDense.score`` call for all of them, the grown entries stored). Users without an id run the fused
model's own dense step (its backend, CUDA graphs included) and cache nothing.

What computes the users with an id, per backend (said at load, in the model's config parameters
and in the bundle's README): ``pytorch`` -> GRDense.score with the reference ops (impl "pytorch");
``pytorch_kernels`` -> GRDense.score with grc's Triton kernels (impl "triton", the cached-keys
attention kernel); ``aotinductor`` -> the same as pytorch_kernels: the fused model does not run the
prefill/score packages (``engine.aoti.history_entries`` builds and checks them, nothing serves them yet),
so the model's package serves users without an id only. On a GPU with the model's CUDA graphs on (and a
graphed backend), the cached step is replayed from CUDA graphs too, one per padded shape captured at its first use,
over entries kept as rows of one device arena (``UserCaches.use_store``, store ``arena``:
grc/serving/common/arena_graphs.py) or as tensors copied in and out (store ``copies``: score_graphs.py); elsewhere it
runs eagerly, its plan built from host values (the store checked reuse on the host events) and sent to the device in
one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from grc.serving.common.history_cache import weights_digest
from grc.serving.common.history_step import UserCaches
from grc.spec.schema import ModelConfig

if TYPE_CHECKING:
    import torch

    from grc.model.gr import GRDense

IMPLS = {"pytorch": "pytorch", "pytorch_kernels": "triton", "aotinductor": "triton"}
WARMED = " (warmed up at load: the attention kernel autotuned for every key a step can meet)"  # ScoreGraphs.warm_up


def scoring_note(backend: str) -> str:
    """What scores the users sent with a user_id, for a fused model of ``backend``."""
    impl = IMPLS[backend]
    what = "grc's Triton kernels (cached-keys attention)" if impl == "triton" else "the PyTorch reference ops"
    note = (
        f"users with user_id: GRDense.score with {what} (impl {impl}), in CUDA graphs where the model's graphs "
        f"are on{WARMED if impl == 'triton' else ''}, else eager; users without: the {backend} step"
    )
    if backend == "aotinductor":
        note += (
            "; the served model runs no prefill/score package (engine.aoti.history_entries builds them, nothing "
            "serves them yet), so cached scoring runs the pytorch_kernels implementation"
        )
    return note


def configured(params: dict[str, str]) -> bool:
    """Whether a fused model's config.pbtxt parameters ask for the cache (fused_bundle writes them)."""
    return bool(params.get("history_budget_bytes"))


@dataclass
class History:
    """One instance's store and the dense model its cached step runs (on the instance's device, in its
    dense dtype: cached and uncached users are computed in the same precision)."""

    caches: UserCaches
    dense: GRDense
    note: str

    @classmethod
    def from_params(
        cls,
        params: dict[str, str],
        cfg: ModelConfig,
        dense: GRDense,
        dtype: torch.dtype,
        backend: str,
        weights_dir: Path,
    ) -> History | None:
        """The cache the config asks for (``configured``), or None."""
        if not configured(params):
            return None
        max_user = int(params["history_max_user_bytes"]) if params.get("history_max_user_bytes") else None
        caches = UserCaches(
            cfg,
            int(params["history_budget_bytes"]),
            max_user,
            weights_digest(weights_dir),  # the linked weights: the bundle's own
            str(dtype).removeprefix("torch."),
            IMPLS[backend],
        )
        return cls(caches, dense.eval(), scoring_note(backend))
