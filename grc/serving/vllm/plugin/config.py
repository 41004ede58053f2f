"""The Hugging Face config class of a grc bundle's config.json (``model_type: grc``).

vLLM reads every model's config through transformers' AutoConfig, which refuses an unknown model_type;
``register()`` maps ``grc`` to this class. Imports transformers: only the vLLM venv loads this module.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from grc.serving.vllm.plugin import ARCHITECTURE, MODEL_TYPE

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "GrcConfig"]


class GrcConfig(PretrainedConfig):  # type: ignore[misc]
    """``grc_model`` is the spec's ``model`` section (JSON); the rest is what vLLM asks every config for."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        grc_model: dict[str, Any] | None = None,
        grc_spec: str = "",
        grc_mode: str = "ranking",
        grc_batch_invariant: bool = False,
        **kwargs: Any,
    ):
        self.grc_model = grc_model or {}
        self.grc_spec = grc_spec
        self.grc_mode = grc_mode
        self.grc_batch_invariant = grc_batch_invariant
        hstu = self.grc_model.get("hstu", {})
        # vLLM sizes buffers and logs from these; the model has no token embedding and no KV cache
        kwargs.setdefault("hidden_size", int(self.grc_model.get("d_model", 1)))
        kwargs.setdefault("num_attention_heads", int(hstu.get("num_heads", 1)))
        kwargs.setdefault("num_hidden_layers", int(hstu.get("num_layers", 1)))
        kwargs.setdefault("vocab_size", (1 << 31) - 1)  # prompt ids are any non-negative int32
        super().__init__(**kwargs)
