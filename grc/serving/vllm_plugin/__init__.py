"""grc's vLLM plugin: ``register()`` is the ``vllm.general_plugins`` entry point of the bundle's plugin package.

vLLM calls every general plugin in each of its processes (API server, engine core, workers, the registry's
model-inspection subprocess), so ``register`` is idempotent and cheap: the model class is registered by its
``module:Class`` name and imported only where a model is built. The package the bundle emits
(``bundles/vllm/plugin``) holds nothing but a call to this function: the served model is grc's own code
(``grc.serving.vllm_model``), so its scores are the PyTorch model's.

Submodules: ``tokens`` (the request encoding, numpy only), ``config`` (the HF config class, transformers).
"""

from __future__ import annotations

import contextlib
from typing import Any

MODEL_TYPE = "grc"  # config.json's model_type
ARCHITECTURE = "GrcRankingModel"  # config.json's architectures[0]
MODEL_CLASS = f"grc.serving.vllm_model:{ARCHITECTURE}"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from grc.serving.vllm_plugin.config import GrcConfig

    with contextlib.suppress(ValueError):  # already registered in this process
        AutoConfig.register(MODEL_TYPE, GrcConfig)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    _check_ids_without_tokenizer()


def _check_ids_without_tokenizer() -> None:
    """Refuse out-of-range prompt ids in the API server (HTTP 400) for grc models.

    With --skip-tokenizer-init vLLM 0.32 skips its id check (renderers/base.py ``validate_token_ids``), and an
    id outside int32 then kills the engine: OverflowError in the worker's input batch, EngineDeadError, every
    later request 500. The check restored here is vLLM's own: 0 <= id < the model's vocab_size (2**31 - 1).
    """
    try:
        from vllm.exceptions import VLLMValidationError
        from vllm.renderers.base import BaseRenderer
    except ImportError:  # another vLLM layout: nothing to patch
        return
    original = BaseRenderer.validate_token_ids
    if getattr(original, "_grc", False):
        return

    def validate_token_ids(self, token_ids, *, parameter=None):  # type: ignore[no-untyped-def]
        config: Any = getattr(self, "model_config", None)
        hf_config = getattr(config, "hf_config", None)
        if token_ids and self.tokenizer is None and getattr(hf_config, "model_type", None) == MODEL_TYPE:
            low, high, vocab = min(token_ids), max(token_ids), config.get_vocab_size()
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise VLLMValidationError(
                    f"Token id {bad} is out of vocabulary: grc prompt ids are int32 in [0, {vocab})",
                    parameter=parameter,
                )
            _check_request(hf_config, token_ids, VLLMValidationError, parameter)
            return None
        return original(self, token_ids, parameter=parameter)

    validate_token_ids._grc = True  # type: ignore[attr-defined]
    BaseRenderer.validate_token_ids = validate_token_ids  # type: ignore[method-assign]


def _check_request(hf_config: Any, token_ids: list[int], error: Any, parameter: object) -> None:
    """The model's own decoding, run in the API server first: a bad request gets HTTP 400 with the reason."""
    from grc.serving.vllm_plugin import tokens

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
