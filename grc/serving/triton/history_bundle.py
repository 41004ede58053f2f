"""The triton bundle's history-cached model (bundles.triton.history_cache): its config and notes.

With the cache on, the name clients call (<model_name>) is the python model ``history_cached``
(grc/serving/triton/models/history_cached.py), which takes the ensemble's inputs plus an optional
``user_id`` (INT64 [batch, 1]); the ensembles stay, each named <model_name>-<backend>.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from grc.serving.common import request as rq
from grc.serving.triton.model_config import ModelConfig, tensor_output
from grc.spec.schema import Spec

MODULE = "history_cached"
USER_ID = "user_id"
MIB = 1 << 20


def enabled(spec: Spec) -> bool:
    return spec.bundles.triton.enabled and spec.bundles.triton.history_cache.enabled


def client_name(spec: Spec) -> str:
    return spec.bundles.triton.model_name or spec.name


def problems(spec: Spec) -> list[str]:
    """Why this spec's model cannot be served from the cache (empty: it can)."""
    if enabled(spec) and spec.model.hstu.history_mask != "causal":
        return [
            f"bundles.triton.history_cache: needs model.hstu.history_mask causal (got "
            f"{spec.model.hstu.history_mask}: every history row attends to later events, so a new event "
            f"changes the cached rows); set history_cache.enabled: false"
        ]
    return []


def weights_digest(weights_dir: Path) -> str:
    """The weights' identity: the digest of their manifest (which records every shard's sha256)."""
    return hashlib.sha256((weights_dir / "manifest.json").read_bytes()).hexdigest()


def cached_model_config(spec: Spec, weights_dir: Path) -> ModelConfig:
    """config.pbtxt of the history-cached model: one instance (one store every user reaches)."""
    from grc.serving.triton.bundle import _common, _input, _param

    cfg, cache = spec.bundles.triton, spec.bundles.triton.history_cache
    msg = _common(spec, client_name(spec), "python", cfg.instance_kind, 1)
    msg.input.extend(_input(s.name, s.datatype, s.dims) for s in rq.request_inputs(spec.model))
    user = _input(USER_ID, "INT64", [1])
    user.optional = True
    msg.input.append(user)
    msg.output.extend(tensor_output(s.name, s.datatype, s.dims) for s in rq.response_outputs(spec.model))
    budget = int(cache.budget_mb * MIB)
    max_user = int((cache.max_user_mb or cache.budget_mb / 8) * MIB)
    _param(msg, "grc_model", spec.model.model_dump_json())
    _param(msg, "truncate_history", "true" if cfg.truncate_history else "false")
    _param(msg, "budget_bytes", str(budget))
    _param(msg, "max_user_bytes", str(max_user))
    _param(msg, "weights_digest", weights_digest(weights_dir))
    _param(msg, "dtype", cache.dtype)
    _param(msg, "rank_weights", json.dumps(rq.rank_weights(spec.model, cfg).tolist()))
    _param(msg, "top_k", str(cfg.top_k))
    _param(msg, "intra_op_threads", str(cfg.intra_op_threads))
    return msg


def describe(spec: Spec) -> dict[str, object]:
    cache = spec.bundles.triton.history_cache
    return {
        "model": client_name(spec),
        "input": {"name": USER_ID, "datatype": "INT64", "shape": ["batch", 1], "optional": True},
        "budget_mb": cache.budget_mb,
        "max_user_mb": cache.max_user_mb or cache.budget_mb / 8,
        "metrics": [
            "grc_history_cache_hits_total",
            "grc_history_cache_misses_total",
            "grc_history_cache_evictions_total",
            "grc_history_cache_bytes",
        ],
    }


def readme_section(spec: Spec) -> str:
    name = client_name(spec)
    return f"""
## User-history cache

`{name}` is the python model `{MODULE}`: send `{USER_ID}` (INT64 [batch, 1]) with a request and the
user's per-layer keys and values are kept; the user's next request whose history starts with the same
events (ids, timestamps, order) computes only its new events and candidates. Without `{USER_ID}`
nothing is cached. Scores are the same either way. The ensembles without the cache are
`{name}-<backend>`. Cache figures: `grc_history_cache_*` on the metrics port (`/metrics`).
"""
