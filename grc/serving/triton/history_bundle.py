"""The triton bundle's history-cached model (bundles.triton.history_cache): its config and notes.

With the cache on, the name clients call (<model_name>) takes the ensemble's inputs plus an optional
``user_id`` (INT64 [batch, 1]); the ensembles stay, each named <model_name>-<backend>. With one
instance it is the python model ``history_cached`` (grc/serving/triton/models/history_cached.py);
with ``instances: N`` it is the router ``history_router`` in front of N cached models
<model_name>-cache-<k>, one instance and one store each. With ``pipeline: fused`` the cached models are
fused models of the spec's backend (fused_bundle.py writes them with ``add_user_id``, ``pin_to_one_gpu``
and ``budget_bytes`` from here), under the same names and behind the same router.
"""

from __future__ import annotations

import json
from pathlib import Path

from grc.serving.common import request as rq
from grc.serving.common.history_cache import weights_digest
from grc.serving.ranker.history import scoring_note
from grc.serving.triton.model_config import ModelConfig, tensor_output
from grc.serving.triton.models.metrics import HISTORY_ARENA, HISTORY_CACHE
from grc.spec.schema import Spec

MODULE = "history_cached"
ROUTER = "history_router"
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


def shard_names(spec: Spec) -> list[str]:
    """The history-cached models: the client name itself with one instance, else one model per
    instance (``<name>-cache-<k>``) behind the router."""
    name, count = client_name(spec), spec.bundles.triton.history_cache.instances
    return [name] if count == 1 else [f"{name}-cache-{k}" for k in range(count)]


def model_configs(spec: Spec, weights_dir: Path) -> list[tuple[ModelConfig, str]]:
    """(config, python module) of every model the cache adds: its shards, and the router when
    there are several."""
    names = shard_names(spec)
    out = [(cached_model_config(spec, weights_dir, name, k), MODULE) for k, name in enumerate(names)]
    if len(names) > 1:
        out.append((router_config(spec, names), ROUTER))
    return out


def _signature(spec: Spec, msg: ModelConfig) -> None:
    """The client's inputs plus the optional user_id, and the client's outputs."""
    from grc.serving.triton.bundle import _input

    msg.input.extend(_input(s.name, s.datatype, s.dims) for s in rq.request_inputs(spec.model))
    add_user_id(msg)
    msg.output.extend(tensor_output(s.name, s.datatype, s.dims) for s in rq.response_outputs(spec.model))


def add_user_id(msg: ModelConfig) -> None:
    """The optional ``user_id`` input (INT64 [batch, 1]) of every model that keeps the cache."""
    from grc.serving.triton.bundle import _input

    user = _input(USER_ID, "INT64", [1])
    user.optional = True
    msg.input.append(user)


def pin_to_one_gpu(spec: Spec, msg: ModelConfig, shard: int) -> None:
    """A KIND_GPU cached model's one instance on one device (Triton would start one instance per
    listed or visible GPU otherwise): shard k on ``gpus[k % len(gpus)]``, GPU 0 when none are listed."""
    cfg = spec.bundles.triton
    if cfg.instance_kind == "KIND_GPU":
        gpus = cfg.gpus or [0]
        del msg.instance_group[0].gpus[:]
        msg.instance_group[0].gpus.append(gpus[shard % len(gpus)])


def budget_bytes(spec: Spec) -> tuple[int, int]:
    """(the store's byte budget, the largest entry kept for one user), per cached model."""
    cache = spec.bundles.triton.history_cache
    return int(cache.budget_mb * MIB), int((cache.max_user_mb or cache.budget_mb / 8) * MIB)


def cached_model_config(spec: Spec, weights_dir: Path, name: str | None = None, shard: int = 0) -> ModelConfig:
    """config.pbtxt of a history-cached model: ONE instance (one store its users reach), on GPUs
    pinned to one device (``pin_to_one_gpu``)."""
    from grc.serving.triton.bundle import _common, _param

    cfg, cache = spec.bundles.triton, spec.bundles.triton.history_cache
    msg = _common(spec, name or client_name(spec), "python", cfg.instance_kind, 1)
    pin_to_one_gpu(spec, msg, shard)
    _signature(spec, msg)
    budget, max_user = budget_bytes(spec)
    _param(msg, "grc_model", spec.model.model_dump_json())
    _param(msg, "truncate_history", "true" if cfg.truncate_history else "false")
    _param(msg, "budget_bytes", str(budget))
    _param(msg, "max_user_bytes", str(max_user))
    _param(msg, "weights_digest", weights_digest(weights_dir))
    _param(msg, "dtype", cache.dtype)
    _param(msg, "store", cache.store)
    _param(msg, "rank_weights", json.dumps(rq.rank_weights(spec.model, cfg).tolist()))
    _param(msg, "top_k", str(cfg.top_k))
    _param(msg, "intra_op_threads", str(cfg.intra_op_threads))
    return msg


def router_config(spec: Spec, shards: list[str]) -> ModelConfig:
    """config.pbtxt of the router (CPU instances, as many as shards, so that shards run concurrently)."""
    from grc.serving.triton.bundle import _common, _param

    msg = _common(spec, client_name(spec), "python", "KIND_CPU", len(shards))
    _signature(spec, msg)
    _param(msg, "shards", json.dumps(shards))
    _param(msg, "inputs", json.dumps([i.name for i in msg.input]))
    _param(msg, "outputs", json.dumps([o.name for o in msg.output]))
    return msg


def fused(spec: Spec) -> bool:
    """The cache is kept by the fused model of the spec's backend (pipeline: fused), not history_cached."""
    return spec.bundles.triton.pipeline == "fused"


def scoring(spec: Spec) -> str:
    """What computes the users sent with a user_id."""
    if fused(spec):
        return f"fused model ({spec.bundles.triton.backend}): {scoring_note(spec.bundles.triton.backend)}"
    return "history_cached: GRDense.score (reference ops on KIND_CPU, grc's Triton kernels on KIND_GPU), every user"


def describe(spec: Spec) -> dict[str, object]:
    cache = spec.bundles.triton.history_cache
    return {
        "model": client_name(spec),
        "module": "fused" if fused(spec) else MODULE,
        "scoring": scoring(spec),
        "input": {"name": USER_ID, "datatype": "INT64", "shape": ["batch", 1], "optional": True},
        "instances": cache.instances,
        "models": shard_names(spec),
        "budget_mb": cache.budget_mb,
        "max_user_mb": cache.max_user_mb or cache.budget_mb / 8,
        "store": cache.store,
        # what the cached models declare (models/metrics.py): the store's, and the arena's only by a model whose
        # store keeps its entries in the arena
        "metrics": [name for name, _, _ in HISTORY_CACHE.values()],
        "arena_metrics": [name for name, _, _ in HISTORY_ARENA.values()],
    }


def readme_section(spec: Spec) -> str:
    name = client_name(spec)
    shards = shard_names(spec)
    cache = spec.bundles.triton.history_cache
    others = (
        "The other backends' fused models (`<name>-<backend>`) keep no cache."
        if fused(spec)
        else f"The ensembles without the cache are `{name}-<backend>`."
    )
    module = "fused" if fused(spec) else MODULE
    routing = (
        f"`{name}` is the python model `{module}`, one instance: every request of a user reaches its one store."
        if len(shards) == 1
        else f"`{name}` is a router (`{ROUTER}`) in front of {len(shards)} cached models, `{shards[0]}` .. "
        f"`{shards[-1]}`, one instance and one store each: it sends each `{USER_ID}` to the same one every time "
        f"(splitmix64 of the id, mod {len(shards)}), and splits a request of users on several."
    )
    return f"""
## User-history cache

{routing} Send `{USER_ID}` (INT64 [batch, 1]) with a request and the user's per-layer keys and values are
kept; the user's next request whose history starts with the same events (ids, timestamps, order) computes
only its new events and candidates. Without `{USER_ID}` nothing is cached. Scores are the same either
way. {others} Cache figures: `grc_history_cache_*` on the
metrics port (`/metrics`), labelled with the cached model's name: hits, misses and evictions (`_total`) and the
bytes held; where the entries live in one arena (`history_cache.store`: {cache.store}; `auto` is the arena on
KIND_GPU with CUDA graphs) also the arena's: `grc_history_cache_splits_total` (steps it could not place whole, run
in halves), `grc_history_cache_unplaced_total` (users it could not place even alone: scored, not kept),
`grc_history_cache_moves_total` and `grc_history_cache_in_place_total` (entries a step copied to new rows, or grew
where they lie) and `grc_history_cache_arena_bytes` (its size, against `budget_mb`). A store of copies has no arena
and does not declare them.
What computes the users sent with `{USER_ID}`: {scoring(spec)}.
"""
