"""The triton bundle's fused pipeline (bundles.triton.pipeline: fused): one python model per backend.

Each backend of (backend, *extra_backends) becomes ONE python model (grc/serving/triton/models/fused.py
around grc.serving.ranker.Ranker) running parse -> embedding lookup -> token projector -> dense ->
ranking: on a GPU the ensemble's per-step IPC hops through the stub's shared memory and the host
copies between steps would cost more than a dense step of a few ms, so there are none. The spec's
backend is named <model_name>, the others <model_name>-<backend>; inputs and outputs are the
ensemble's, so clients and ``grc deploy``'s smoke test are unchanged. With bundles.triton.history_cache on,
the spec's backend is served by one fused model per store (history_bundle.shard_names: the plain name, or
<model_name>-cache-<k> behind the router), each ONE instance with the optional ``user_id`` input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grc.serving.common import request as rq
from grc.serving.ranker import buckets as bk
from grc.serving.ranker.history import scoring_note
from grc.serving.triton import history_bundle
from grc.serving.triton.model_config import ModelConfig, tensor_output
from grc.spec.schema import Spec

MODULE = "fused"


def enabled(spec: Spec) -> bool:
    return spec.bundles.triton.pipeline == "fused"


def model_names(spec: Spec) -> dict[str, str]:
    """backend -> name of its fused model (the spec's backend gets the plain name)."""
    cfg = spec.bundles.triton
    name = cfg.model_name or spec.name
    return {cfg.backend: name, **{b: f"{name}-{b}" for b in cfg.extra_backends}}


def plan(spec: Spec) -> list[bk.Bucket]:
    """The spec's buckets, or the default ladder up to max_batch_size x max_seq_len."""
    cfg = spec.bundles.triton
    if cfg.gpu.buckets:
        return [bk.Bucket(tokens=b.tokens, users=b.users) for b in cfg.gpu.buckets]
    return bk.default_plan(cfg.max_batch_size, spec.model.hstu.max_seq_len)


def tolerance(spec: Spec) -> Any:
    """Served scores vs PyTorch float64: KIND_CPU computes in float32 (verify.export); KIND_GPU in the dense
    dtype (engine.aoti.dtype), with the aoti stage's parity tolerance for it."""
    from grc.stages.aoti import tolerance as aoti_tolerance

    cfg = spec.bundles.triton
    return aoti_tolerance(spec, spec.engine.aoti.dtype if cfg.instance_kind == "KIND_GPU" else "float32")


def problems(spec: Spec) -> list[str]:
    """What the fused pipeline of this spec cannot run, by field (empty: it can)."""
    from grc.aoti.model import MAX_TOKENS, MAX_USERS

    if not enabled(spec):
        return []
    cfg, out = spec.bundles.triton, []
    for i, b in enumerate(plan(spec)):
        where = f"bundles.triton.gpu.buckets[{i}]" if cfg.gpu.buckets else f"the default bucket {b.users}x{b.tokens}"
        if "aotinductor" in (cfg.backend, *cfg.extra_backends) and (b.tokens > MAX_TOKENS or b.users > MAX_USERS):
            out.append(
                f"{where}: {b.users} users x {b.tokens} tokens is outside the AOTInductor package's exported "
                f"range (users 1..{MAX_USERS}, tokens 2..{MAX_TOKENS}, grc/aoti/model.py)"
            )
    return out


def fused_config(
    spec: Spec, name: str, backend: str, packages: dict[str, str] | None, cache_shard: int | None = None
) -> ModelConfig:
    """config.pbtxt of a fused model. ``cache_shard`` k: one of the models that keep the history cache,
    ONE instance (one store its users reach, pinned to one GPU), with the optional user_id input."""
    from grc.serving.triton.bundle import _common, _input, _param

    cfg = spec.bundles.triton
    count = cfg.instance_count if cache_shard is None else 1
    msg = _common(spec, name, "python", cfg.instance_kind, count)
    msg.input.extend(_input(s.name, s.datatype, s.dims) for s in rq.request_inputs(spec.model))
    msg.output.extend(tensor_output(s.name, s.datatype, s.dims) for s in rq.response_outputs(spec.model))
    params: dict[str, str] = {
        "grc_model": spec.model.model_dump_json(),
        "backend": backend,
        "dtype": spec.engine.aoti.dtype,  # the dense dtype on a GPU (the aotinductor package's own metadata wins)
        "truncate_history": "true" if cfg.truncate_history else "false",
        "rank_weights": json.dumps(rq.rank_weights(spec.model, cfg).tolist()),
        "top_k": str(cfg.top_k),
        "intra_op_threads": str(cfg.intra_op_threads),
        "tables": cfg.gpu.tables,
        "tables_device_budget_mb": str(cfg.gpu.tables_device_budget_mb),
        "cuda_graphs": "true" if cfg.gpu.cuda_graphs else "false",
        "buckets": json.dumps([[b.users, b.tokens] for b in plan(spec)]),
    }
    if packages is not None:
        params["packages"] = json.dumps(packages, sort_keys=True)
    if cache_shard is not None:
        history_bundle.pin_to_one_gpu(spec, msg, cache_shard)
        history_bundle.add_user_id(msg)
        budget, max_user = history_bundle.budget_bytes(spec)
        params["history_budget_bytes"] = str(budget)
        params["history_max_user_bytes"] = str(max_user)
        params["history_store"] = spec.bundles.triton.history_cache.store
        params["history_scoring"] = scoring_note(backend)  # what computes the cached users, said
    for key, value in params.items():
        _param(msg, key, value)
    return msg


def write_models(repo: Any, spec: Spec, weights_dir: Path, aoti: Path | None, warmup: dict[str, Any] | None) -> None:
    """One fused model per backend into ``repo`` (bundle._Repository): weights linked, packages linked."""
    from grc.serving.triton.bundle import aoti_packages

    names = model_names(spec)
    # before anything is linked: a KIND_GPU bundle whose aoti stage built no GPU package fails here, naming why
    found = aoti_packages(spec, aoti) if "aotinductor" in names else {}
    for backend, name in names.items():
        packages = None if backend != "aotinductor" else {kind: rel for kind, (rel, _) in found.items()}
        cached = backend == spec.bundles.triton.backend and history_bundle.enabled(spec)
        # the spec's backend with the cache: one model per store (<name>, or <name>-cache-k behind the router)
        models = history_bundle.shard_names(spec) if cached else [name]
        for k, model in enumerate(models):
            if backend == "aotinductor":
                assert aoti is not None
                for rel, digest in found.values():
                    dst = repo.version_dir(model) / rel
                    repo.link(aoti / rel, dst)
                    repo.link((aoti / rel).parent / "metadata.json", dst.parent / "metadata.json")
                    if digest:
                        repo.digests[str(dst.relative_to(repo.out))] = digest
            for f in sorted(p for p in weights_dir.iterdir() if p.is_file()):
                repo.link(f, repo.version_dir(model) / "weights" / f.name)
            repo.add(fused_config(spec, model, backend, packages, k if cached else None), MODULE, warmup)
        if len(models) > 1:  # the router holds no weights, and has no warmup (its shards may load after it)
            repo.add(history_bundle.router_config(spec, models), history_bundle.ROUTER)


def readme_section(spec: Spec) -> str:
    names = model_names(spec)
    cfg = spec.bundles.triton
    rows = "\n".join(f"| `{n}` | {b} |" for b, n in names.items())
    ladder = ", ".join(f"{b.users}x{b.tokens}" for b in plan(spec))
    graphs = "on" if cfg.gpu.cuda_graphs else "off"
    cache_metrics = (
        "; the cached models (`history_cache`) also the cache's `grc_history_cache_*`, the arena's among them where "
        "the entries live in one (User-history cache, above)"
        if history_bundle.enabled(spec)
        else ""
    )
    return f"""
## Fused pipeline (bundles.triton.pipeline: fused)

Each model below is ONE python model (`grc.serving.triton.models.fused`): request check, embedding
lookups, token projector, dense step and ranking, on {cfg.instance_kind} instances. Same inputs and
outputs as the ensemble.

| model | dense step |
| --- | --- |
{rows}

On a GPU: tables `{cfg.gpu.tables}` (budget {cfg.gpu.tables_device_budget_mb} MiB), CUDA graphs
{graphs} for buckets (users x tokens) {ladder}.
Metrics: grc_cuda_graph_hits_total, grc_cuda_graph_misses_total, grc_padded_tokens_total{cache_metrics}.
"""


def host_problem(model_repository: Path) -> str | None:
    """Why this host cannot start the repository's KIND_GPU python models (None: it can, or there are none):
    they run torch on CUDA in the server's python backend, the interpreter grc runs in. Said before the server
    starts: on a host without a GPU Triton itself only says "has kind KIND_GPU but no GPUs are available"."""
    from grc.serving.triton.model_config import load_config
    from grc.serving.triton.model_config import pb as mc

    gpu_models = sorted(
        p.parent.name
        for p in model_repository.glob("*/config.pbtxt")
        if (msg := load_config(p)).backend == "python"
        and any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in msg.instance_group)
    )
    if not gpu_models:
        return None
    import torch

    from grc.serving.ranker.ranker import cuda_missing

    if torch.cuda.is_available():
        return None
    return cuda_missing(f"KIND_GPU python model(s) {', '.join(gpu_models)}")
