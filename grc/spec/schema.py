"""The spec language: pydantic v2 models, one per YAML section.

Every model forbids unknown keys so a typo is an error with a suggestion, not a silently ignored
field. Cross-field rules (heads divide dims, tables exist) live in validators whose messages name
what was expected and what was found; the loader adds ``file:line`` and the field path.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- model
class HSTUConfig(_Section):
    """One HSTU stack. Dims are totals over heads; per-head dims are ``dim // num_heads``."""

    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 2
    attention_dim: PositiveInt = Field(64, description="Q/K width over all heads")
    linear_dim: PositiveInt = Field(64, description="U/V width over all heads")
    max_seq_len: PositiveInt = Field(
        256, description="N in A = SiLU(QK^T*alpha + rab)/N; also the longest sequence a request may carry"
    )
    position_buckets: PositiveInt = Field(64, description="P: relative positions clamp to [-(P-1), P-1]")
    time_buckets: PositiveInt = Field(24, description="NB: time-delta bucket = min(floor(log2(1+|dt|)), NB-1)")
    alpha: float | None = Field(None, description="QK scale; default 1/sqrt(attention_dim/num_heads)")
    history_mask: Literal["causal", "full"] = "causal"
    eps: float = 1e-6

    @model_validator(mode="after")
    def _heads_divide_dims(self) -> HSTUConfig:
        for name in ("attention_dim", "linear_dim"):
            dim = getattr(self, name)
            if dim % self.num_heads:
                raise ValueError(f"num_heads: must divide {name} {dim} (got {self.num_heads})")
        return self

    @property
    def head_qk(self) -> int:
        return self.attention_dim // self.num_heads

    @property
    def head_v(self) -> int:
        return self.linear_dim // self.num_heads

    @property
    def scale(self) -> float:
        return self.alpha if self.alpha is not None else self.head_qk**-0.5


class TableConfig(_Section):
    """An embedding table: ``vocab_size`` rows; width ``dim`` or the model's ``embedding_dim``."""

    vocab_size: PositiveInt
    dim: PositiveInt | None = None


class ModelConfig(_Section):
    """HSTU or MTGR. Tokens per user: profile (one per profile table), history, then candidates."""

    kind: Literal["hstu", "mtgr"] = "mtgr"
    d_model: PositiveInt = 64
    embedding_dim: PositiveInt = 32
    hstu: HSTUConfig = HSTUConfig()
    tables: dict[str, TableConfig] = Field(default_factory=dict)
    profile: list[str] = Field(default_factory=list, description="tables looked up once per user, one token each")
    history: list[str] = Field(default_factory=lambda: ["item"], description="tables concatenated per history event")
    candidate: list[str] = Field(default_factory=lambda: ["item"], description="tables concatenated per candidate")
    cross_features: int = Field(0, ge=0, description="dense user x candidate features per candidate")
    tasks: list[str] = Field(default_factory=lambda: ["ctr", "engagement", "retention", "monetization"])
    head_hidden: PositiveInt = 64
    max_candidates: PositiveInt = 64

    @model_validator(mode="after")
    def _tokens_name_tables(self) -> ModelConfig:
        for group in ("profile", "history", "candidate"):
            for i, name in enumerate(getattr(self, group)):
                if name not in self.tables:
                    near = difflib.get_close_matches(name, list(self.tables), n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else f" (defined: {', '.join(sorted(self.tables)) or 'none'})"
                    raise ValueError(f"{group}[{i}]: names table {name!r}, which model.tables does not define{hint}")
        if self.kind == "hstu" and self.profile:
            raise ValueError("profile: kind hstu has no profile tokens; use kind mtgr or remove model.profile")
        if not self.history or not self.candidate:
            raise ValueError("history and candidate must each name at least one table")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: expected a non-empty list of distinct names (got {self.tasks})")
        if self.max_candidates + len(self.profile) >= self.hstu.max_seq_len:
            raise ValueError(
                f"max_candidates: {self.max_candidates} + {len(self.profile)} profile tokens leave no room for "
                f"history within hstu.max_seq_len {self.hstu.max_seq_len}"
            )
        return self

    def table_dim(self, name: str) -> int:
        return self.tables[name].dim or self.embedding_dim

    @property
    def token_groups(self) -> list[str]:
        """Token kinds that get their own layer-norm parameters (MTGR's group layer norm)."""
        return ["profile", "history", "candidate"] if self.kind == "mtgr" else ["all"]


# --------------------------------------------------------------------------- weights
DType = Literal["float32", "bfloat16", "float16"]


class InitConfig(_Section):
    seed: int = 0
    dtype: DType = Field("float32", description="dense parameters")
    embedding_dtype: DType = Field("float32", description="embedding tables (most of the bytes)")
    std: float = Field(0.02, gt=0)


class WeightsConfig(_Section):
    init: InitConfig | None = None
    checkpoint: Path | None = Field(None, description="safetensors file/dir or torch state_dict (weights_only)")
    key_map: dict[str, str] = Field(default_factory=dict, description="checkpoint key prefix -> grc key prefix")
    shard_size_mb: PositiveInt = Field(1024, description="start a new safetensors shard past this size")
    table_block_rows: PositiveInt = Field(
        1 << 20, description="embedding tables are stored in row blocks of this many rows (row-wise sharding)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> WeightsConfig:
        if self.init is not None and self.checkpoint is not None:
            raise ValueError("checkpoint: give either init or checkpoint, not both")
        return self

    @property
    def source(self) -> InitConfig | Path:
        return self.checkpoint if self.checkpoint is not None else (self.init or InitConfig())


# --------------------------------------------------------------------------- later stages
class ExportConfig(_Section):
    opset: int = Field(18, ge=17, le=21)
    external_data_threshold_mb: PositiveInt = Field(2048, description="initializers go to a .data file past this")
    sample_users: PositiveInt = Field(2, description="batch used to trace the export")


SURGERY_PASSES = ("fold_constants", "fuse_hstu_attention", "fuse_layer_norm", "drop_training_ops", "cleanup")


class SurgeryConfig(_Section):
    passes: list[Literal[SURGERY_PASSES]] = Field(default_factory=lambda: list(SURGERY_PASSES))  # type: ignore[valid-type]


class Tolerance(_Section):
    max_abs: float = Field(1e-4, gt=0)
    max_rel: float = Field(1e-3, gt=0, description="max |a-b| / max(|b|) over each output")


class VerifyShape(_Section):
    users: PositiveInt
    history: PositiveInt
    candidates: PositiveInt


class VerifyConfig(_Section):
    seed: int = 1234
    export: Tolerance = Tolerance()
    surgery: Tolerance = Tolerance()
    shapes: list[VerifyShape] = Field(
        default_factory=lambda: [
            VerifyShape(users=1, history=3, candidates=1),
            VerifyShape(users=3, history=20, candidates=5),
        ]
    )


class EngineTarget(_Section):
    name: str
    sm: str = Field(description="compute capability, e.g. sm80, sm89, sm90")
    gpu: str | None = None


class EngineConfig(_Section):
    targets: list[EngineTarget] = Field(default_factory=list)
    precision: Literal["fp32", "fp16", "bf16"] = "fp16"


class TritonBundleConfig(_Section):
    enabled: bool = True
    max_batch_size: PositiveInt = 8
    preferred_batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [4, 8])
    max_queue_delay_us: int = Field(2000, ge=0)
    instance_count: PositiveInt = 1
    top_k: PositiveInt = 10


class VllmBundleConfig(_Section):
    enabled: bool = True
    max_num_seqs: PositiveInt = 16


class BundlesConfig(_Section):
    triton: TritonBundleConfig = TritonBundleConfig()
    vllm: VllmBundleConfig = VllmBundleConfig()


# --------------------------------------------------------------------------- the spec
class Spec(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="artifact folder name")
    description: str = ""
    kernels: Literal["pytorch", "triton"] = Field("pytorch", description="HSTU attention/norm implementation")
    model: ModelConfig
    weights: WeightsConfig = WeightsConfig()
    export: ExportConfig = ExportConfig()
    surgery: SurgeryConfig = SurgeryConfig()
    verify: VerifyConfig = VerifyConfig()
    engine: EngineConfig = EngineConfig()
    bundles: BundlesConfig = BundlesConfig()
