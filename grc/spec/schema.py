"""The spec language: pydantic v2 models, one per YAML section.

Every model forbids unknown keys so a typo is an error with a suggestion, not a silently ignored
field. Cross-field rules (heads divide dims, tables exist) live in validators whose messages name
what was expected and what was found; the loader adds ``file:line`` and the field path.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grc.spec import limits as lim


class _Section(BaseModel):
    """Unknown keys are errors; numbers are strict (``true`` is no integer, ``"3"`` no number) and
    finite (no NaN or inf); sizes carry the bounds of grc.spec.limits, published in the JSON schema."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Width = Annotated[int, Field(ge=1, le=lim.MAX_WIDTH)]
SeqLen = Annotated[int, Field(ge=1, le=lim.MAX_SEQ_LEN)]
Users = Annotated[int, Field(ge=1, le=lim.MAX_USERS)]
MiB = Annotated[int, Field(ge=1, le=lim.MAX_MIB)]
MiBFraction = Annotated[float, Field(gt=0, le=lim.MAX_MIB)]  # a budget that may be below 1 MiB (tests)
Seed = Annotated[int, Field(ge=0, le=lim.MAX_SEED)]
Instances = Annotated[int, Field(ge=1, le=lim.MAX_INSTANCES)]
PromptTokens = Annotated[int, Field(ge=1, le=lim.MAX_PROMPT_TOKENS)]
Rows = Annotated[int, Field(ge=1, le=lim.MAX_VOCAB)]
Version = Annotated[int, Field(ge=1, le=lim.MAX_VERSION)]
GpuId = Annotated[int, Field(ge=0, le=lim.MAX_GPU_ID)]
RankWeight = Annotated[float, Field(ge=-lim.MAX_RANK_WEIGHT, le=lim.MAX_RANK_WEIGHT)]
Name = Annotated[str, Field(pattern=lim.NAME_PATTERN)]
Identifier = Annotated[str, Field(pattern=lim.IDENTIFIER_PATTERN)]


# --------------------------------------------------------------------------- model
class HSTUConfig(_Section):
    """One HSTU stack. Dims are totals over heads; per-head dims are ``dim // num_heads``."""

    num_layers: Annotated[int, Field(ge=1, le=lim.MAX_LAYERS)] = 2
    num_heads: Annotated[int, Field(ge=1, le=lim.MAX_HEADS)] = 2
    attention_dim: Width = Field(64, description="Q/K width over all heads")
    linear_dim: Width = Field(64, description="U/V width over all heads")
    max_seq_len: SeqLen = Field(
        256, description="N in A = SiLU(QK^T*alpha + rab)/N; also the longest sequence a request may carry"
    )
    position_buckets: SeqLen = Field(
        64,
        description="P: relative positions clamp to [-(P-1), P-1]; at most max_seq_len (positions never differ more)",
    )
    time_buckets: Annotated[int, Field(ge=1, le=lim.MAX_TIME_BUCKETS)] = Field(
        24, description="NB: time-delta bucket = min(floor(log2(1+|dt|)), NB-1)"
    )
    alpha: float | None = Field(
        None, gt=0, le=lim.MAX_ALPHA, description="QK scale; default 1/sqrt(attention_dim/num_heads)"
    )
    history_mask: Literal["causal", "full"] = "causal"
    eps: float = Field(1e-6, gt=0, le=1, description="layer-norm epsilon")

    @model_validator(mode="after")
    def _heads_divide_dims(self) -> HSTUConfig:
        for name in ("attention_dim", "linear_dim"):
            dim = getattr(self, name)
            if dim % self.num_heads:
                raise ValueError(f"num_heads: must divide {name} {dim} (got {self.num_heads})")
        if self.position_buckets > self.max_seq_len:
            raise ValueError(
                f"position_buckets: at most max_seq_len {self.max_seq_len}: positions within a sequence "
                f"never differ by more, so the extra buckets are never used (got {self.position_buckets})"
            )
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

    vocab_size: Rows
    dim: Width | None = None


class ModelConfig(_Section):
    """HSTU or MTGR. Tokens per user: profile (one per profile table), history, then candidates."""

    kind: Literal["hstu", "mtgr"] = "mtgr"
    d_model: Width = 64
    embedding_dim: Width = 32
    hstu: HSTUConfig = HSTUConfig()
    tables: dict[Identifier, TableConfig] = Field(
        default_factory=dict, max_length=lim.MAX_TABLES, description="name (an identifier) -> table"
    )
    profile: list[str] = Field(
        default_factory=list, max_length=lim.MAX_LIST, description="tables looked up once per user, one token each"
    )
    history: list[str] = Field(
        default_factory=lambda: ["item"], max_length=lim.MAX_LIST, description="tables concatenated per history event"
    )
    candidate: list[str] = Field(
        default_factory=lambda: ["item"], max_length=lim.MAX_LIST, description="tables concatenated per candidate"
    )
    cross_features: Annotated[int, Field(ge=0, le=lim.MAX_WIDTH)] = Field(
        0, description="dense user x candidate features per candidate"
    )
    tasks: list[Identifier] = Field(
        default_factory=lambda: ["ctr", "engagement", "retention", "monetization"], max_length=lim.MAX_TASKS
    )
    head_hidden: Width = 64
    max_candidates: SeqLen = 64

    @model_validator(mode="after")
    def _tokens_name_tables(self) -> ModelConfig:
        for group in ("profile", "history", "candidate"):
            for i, name in enumerate(getattr(self, group)):
                if name not in self.tables:
                    near = difflib.get_close_matches(name, list(self.tables), n=1)
                    defined = ", ".join(sorted(self.tables)) or "none"
                    hint = f"; did you mean {near[0]!r}?" if near else f" (defined: {defined})"
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
# Tables may also be stored quantized row-wise (grc/model/tables.py): int8 with an fp16 scale and
# offset per row, fp8_e4m3 with an fp16 scale per row; rows are dequantized to float32 on lookup.
TableDType = Literal["float32", "bfloat16", "float16", "int8", "fp8_e4m3"]
TABLE_DTYPE_HELP = "int8: row-wise scale and offset; fp8_e4m3: row-wise scale; dequantized on lookup"


class InitConfig(_Section):
    seed: Seed = 0
    dtype: DType = Field("float32", description="dense parameters")
    embedding_dtype: TableDType = Field(
        "float32", description=f"embedding tables (most of the bytes); {TABLE_DTYPE_HELP}"
    )
    std: float = Field(0.02, gt=0, le=1, description="standard deviation of embedding rows")


class WeightsConfig(_Section):
    init: InitConfig | None = None
    checkpoint: Path | None = Field(
        None, strict=False, description="safetensors file/dir or torch state_dict (weights_only)"
    )
    key_map: dict[str, str] = Field(default_factory=dict, description="checkpoint key prefix -> grc key prefix")
    embedding_dtype: TableDType | None = Field(
        None,
        description=f"checkpoint import: store the tables in this precision (default: the checkpoint's float "
        f"dtype; seeded init uses init.embedding_dtype); {TABLE_DTYPE_HELP}",
    )
    shard_size_mb: MiB = Field(1024, description="start a new safetensors shard past this size")
    table_block_rows: Rows = Field(
        1 << 20, description="embedding tables are stored in row blocks of this many rows (row-wise sharding)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> WeightsConfig:
        if self.init is not None and self.checkpoint is not None:
            raise ValueError("checkpoint: give either init or checkpoint, not both")
        if self.embedding_dtype is not None and self.checkpoint is None:
            raise ValueError(
                f"embedding_dtype: sets the table precision of a checkpoint import; with seeded init use "
                f"weights.init.embedding_dtype (got {self.embedding_dtype!r} without a checkpoint)"
            )
        return self

    @property
    def source(self) -> InitConfig | Path:
        return self.checkpoint if self.checkpoint is not None else (self.init or InitConfig())


# --------------------------------------------------------------------------- later stages
class ExportConfig(_Section):
    opset: int = Field(18, ge=17, le=21)
    external_data_threshold_mb: Annotated[int, Field(ge=1, le=lim.MAX_ONNX_INLINE_MIB)] = Field(
        2048, description="initializers go to a .data file past this (protobuf cannot exceed 2 GiB)"
    )
    sample_users: Users = Field(2, description="batch used to trace the export")


SURGERY_PASSES = ("fold_constants", "fuse_hstu_attention", "fuse_layer_norm", "drop_training_ops", "cleanup")


class SurgeryConfig(_Section):
    passes: list[Literal[SURGERY_PASSES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(SURGERY_PASSES), max_length=lim.MAX_LIST
    )


class Tolerance(_Section):
    """Scores are probabilities in [0, 1], so max_abs of 1 or more accepts any output: below 1 checks."""

    max_abs: float = Field(1e-4, gt=0, lt=1)
    max_rel: float = Field(1e-3, gt=0, le=1, description="max |a-b| / max(|b|) over each output")


class VerifyShape(_Section):
    users: Users
    history: SeqLen
    candidates: SeqLen


class RankingGates(_Section):
    """Ranking quality of every backend against the fp32 PyTorch model with unquantized weights, on
    held-out synthetic users (their own seed: never the users a quantizer calibrates on). The
    defaults pass fp32 and bf16 tables and int8 / fp8_e4m3 ones, and fail a broken quantization."""

    seed: Seed = Field(20261201, description="held-out users' seed; must differ from verify.seed")
    users: Users = Field(32, description="held-out users, each with a full history and candidate list")
    history: SeqLen = Field(32, description="history events per user (capped to fit max_seq_len)")
    candidates: SeqLen | None = Field(None, description="candidates per user; default model.max_candidates")
    top_k: Annotated[int, Field(ge=1, le=lim.MAX_SEQ_LEN)] = Field(10, description="k of the top-k overlap")
    min_top_k_overlap: float = Field(0.95, ge=0, le=1, description="mean over users of |top-k ∩ top-k_fp32| / k")
    min_kendall_tau: float = Field(0.95, ge=-1, le=1, description="mean over users of Kendall's tau-b")
    max_mean_abs: float = Field(0.01, gt=0, le=1, description="mean |Δscore| per task")
    max_abs: float = Field(0.05, gt=0, le=1, description="max |Δscore| per task")


class VerifyConfig(_Section):
    seed: Seed = 1234
    export: Tolerance = Tolerance()
    surgery: Tolerance = Tolerance()
    ranking: RankingGates = RankingGates()
    shapes: list[VerifyShape] = Field(
        default_factory=lambda: [
            VerifyShape(users=1, history=3, candidates=1),
            VerifyShape(users=3, history=20, candidates=5),
        ],
        min_length=1,
        max_length=lim.MAX_LIST,
        description="batches compared with the PyTorch reference (at least one: verify must check something)",
    )


# GPU model -> compute capability, so a target may name the card instead of the SM. Keys are
# lower case without spaces, dashes or an "nvidia" prefix ("RTX 4090" -> "rtx4090").
KNOWN_GPUS: dict[str, int] = {
    "t4": 75,
    "rtx2080": 75,
    "a100": 80,
    "a30": 80,
    "a800": 80,
    "a10": 86,
    "a10g": 86,
    "a40": 86,
    "a6000": 86,
    "rtxa6000": 86,
    "rtx3090": 86,
    "rtx3080": 86,
    "l4": 89,
    "l40": 89,
    "l40s": 89,
    "rtx4090": 89,
    "rtx6000ada": 89,
    "h100": 90,
    "h200": 90,
    "h20": 90,
    "h800": 90,
    "gh200": 90,
    "b200": 100,
    "gb200": 100,
    "rtx5090": 120,
    "rtxpro6000": 120,
}
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
QUANTIZED_PRECISIONS = ("int8", "fp8")
# the oldest SM whose tensor cores run each quantized precision (TensorRT-RTX builds Q/DQ graphs
# for these; older SMs have no such tensor-core instructions)
MIN_SM = {"int8": 80, "fp8": 89}


def gpu_key(gpu: str) -> str:
    key = gpu.lower().replace(" ", "").replace("-", "").replace("_", "")
    return key.removeprefix("nvidia")


def _check_precision_sm(precision: str, sm: int, where: str, target: str = "this target") -> None:
    """int8 / fp8 engines come from a calibrated Q/DQ graph (the quantize stage); a target whose
    GPU has no tensor-core instructions for the precision cannot run it, whatever the builder."""
    need = MIN_SM.get(precision)
    if need is not None and sm < need:
        what = (
            "FP8 (e4m3) tensor cores arrived with Ada, sm89"
            if precision == "fp8"
            else ("INT8 Q/DQ engines are built for Ampere (sm80) and newer")
        )
        raise ValueError(f"{where}: {precision} needs sm{need} or newer ({what}); {target} is sm{sm}")


class EngineTarget(_Section):
    """One engine to build: a GPU (or a compute capability) and optionally its own precision."""

    name: Name = Field(description="folder under engines/ (e.g. sm80, l4, h100)")
    sm: str | None = Field(None, description="compute capability, e.g. sm80, sm89, sm90; derived from gpu when omitted")
    gpu: str | None = Field(None, description=f"GPU model; known: {', '.join(sorted(KNOWN_GPUS))}")
    toolkit: Literal["auto", "tensorrt", "tensorrt_rtx"] = Field(
        "auto", description="auto: full TensorRT when installed and this host has the target GPU, else TensorRT-RTX"
    )
    precision: Precision | None = Field(None, description="overrides engine.precision for this target")

    @model_validator(mode="after")
    def _sm_or_gpu(self) -> EngineTarget:
        if self.sm is None and self.gpu is None:
            raise ValueError("sm: give sm (e.g. sm89) or gpu (e.g. l4) (got neither)")
        if self.sm is not None and not re.fullmatch(r"sm_?\d{2,3}", self.sm.lower()):
            raise ValueError(f"sm: expected sm<major><minor>, e.g. sm80, sm89, sm90 (got {self.sm!r})")
        if self.gpu is not None:
            known = KNOWN_GPUS.get(gpu_key(self.gpu))
            if known is None and self.sm is None:
                near = difflib.get_close_matches(gpu_key(self.gpu), list(KNOWN_GPUS), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else "; or give sm"
                raise ValueError(f"gpu: unknown GPU model{hint} (got {self.gpu!r})")
            if known is not None and self.sm is not None and known != self.compute_capability:
                raise ValueError(f"sm: {self.gpu} is sm{known} (got {self.sm!r})")
        if self.precision is not None:
            _check_precision_sm(self.precision, self.compute_capability, "precision")
        return self

    @property
    def compute_capability(self) -> int:
        """80 for sm80 / sm_80 / an A100."""
        if self.sm is not None:
            return int(self.sm.lower().removeprefix("sm").lstrip("_"))
        return KNOWN_GPUS[gpu_key(self.gpu or "")]


class ShapeRange(_Section):
    """min <= opt <= max of one dynamic dimension; TensorRT tunes for opt."""

    min: SeqLen = Field(description="smallest value an engine accepts")
    opt: SeqLen = Field(description="value the builder optimises for")
    max: SeqLen = Field(description="largest value an engine accepts")

    @model_validator(mode="after")
    def _ordered(self) -> ShapeRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"opt: expected min <= opt <= max (got {self.min}, {self.opt}, {self.max})")
        return self


class EngineProfile(_Section):
    """One optimization profile over the graph's dynamic axes (users x tokens)."""

    users: ShapeRange = Field(ShapeRange(min=1, opt=4, max=16), description="users (batch) per request")
    tokens: ShapeRange | None = Field(
        None,
        description="padded tokens per user: profile + history + candidates (the candidate count is inside); "
        "default 1 / min(128, N) / N with N = model.hstu.max_seq_len",
    )

    @model_validator(mode="after")
    def _users_bound(self) -> EngineProfile:
        if self.users.max > lim.MAX_USERS:
            raise ValueError(f"users.max: at most {lim.MAX_USERS} users per request (got {self.users.max})")
        return self


class Calibration(_Section):
    """Synthetic users a quantizer measures activation ranges on (int8 / fp8 engines, the fp8
    AOTInductor package): their own seed, never the held-out users verify.ranking scores."""

    seed: Seed = Field(20261202, description="calibration users' seed; must differ from verify.ranking.seed")
    users: Users = Field(16, description="calibration users")
    history: SeqLen = Field(32, description="history events per user (capped to fit max_seq_len)")
    candidates: SeqLen | None = Field(None, description="candidates per user; default model.max_candidates")


class AotiConfig(_Section):
    """AOTInductor packages of the dense jagged model (the ``aoti`` stage): ``torch.export`` with the
    HSTU ops as grc custom ops, compiled ahead of time into one ``.pt2`` per target."""

    enabled: bool = Field(False, description="build the aoti stage (artifacts/<spec>/engines-aoti/)")
    targets: list[str] = Field(
        default_factory=lambda: ["cpu", "cuda"],
        max_length=lim.MAX_LIST,
        description="cpu (float32, reference ops), cuda (this host's GPU) or sm<NN> (only on a GPU of that "
        "compute capability); a GPU target on a host without that GPU is recorded as skipped",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of GPU packages (weights, tokens, scores); cpu packages are float32"
    )
    precision: Literal["fp8"] | None = Field(
        None,
        description="fp8: the GPU packages' HSTU output GEMMs in float8 e4m3 through torch._scaled_mm "
        "(per-channel weight scales, per-tensor activation scales calibrated on engine.calibration's users; "
        "the uvqk and head GEMMs stay in dtype: in fp8 they miss the ranking gates, grc.model.fp8.PACKAGE_GEMMS), "
        "the rest in dtype (bfloat16); needs sm89+. Unset: every op in dtype. "
        "The cpu package stays float32",
    )
    parity: Tolerance | None = Field(
        None,
        description="package vs PyTorch float64 reference; default: verify.export for float32, "
        "engine.parity / the engine defaults for 16-bit (fp8: the fp8 default)",
    )
    fuse: bool = Field(
        False,
        description="export the fused Triton projections and candidate heads (kernels/fused_*.py; their PyTorch "
        "twins in cpu packages); off until a device run shows they pay",
    )
    silu_apart: bool = Field(
        False,
        description="the unfused layer's SiLU as a kernel of its own (grc::silu, kernels/silu.py), so the compiled "
        "code keeps ONE activated UVQK buffer and u, v, q, k are views of it (Inductor otherwise writes each apart); "
        "off until a device run shows it pays; not with fuse (the fused GEMM applies SiLU itself)",
    )
    attention: Literal["auto", "triton", "hopper"] = Field(
        "auto",
        description="the attention kernel in GPU packages: auto (on an sm90 GPU the Gluon kernel, "
        "kernels/hstu_hopper.py, at head dims 128 / 256 where it measured faster, called from the package as the "
        "opaque grc::hstu_attention_hopper op; the Triton kernel compiled in elsewhere), triton (the Triton kernel "
        "everywhere) or hopper (the Gluon kernel, and the build fails naming why where it cannot run); the eager "
        "paths pick by GRC_ATTENTION_KERNEL with the same choices",
    )
    history_entries: bool = Field(
        False,
        description="also compile the history cache's prefill and score entry points per target "
        "(<target>/history/{prefill,score}.pt2, grc/aoti/history_entry.py), each pair checked against "
        "GRDense.prefill / score in float64 at build; two more compiles per target; not served yet",
    )

    @model_validator(mode="after")
    def _targets(self) -> AotiConfig:
        if self.precision == "fp8" and self.dtype != "bfloat16":
            raise ValueError(
                f"dtype: precision fp8 writes its GEMMs' outputs in bfloat16 (torch._scaled_mm with row-wise "
                f"scales), so dtype must be bfloat16 (got {self.dtype!r})"
            )
        if self.silu_apart and self.fuse:
            raise ValueError(
                "silu_apart: with fuse the UVQK GEMM applies SiLU in its epilogue (one buffer already); set one of "
                "the two"
            )
        if self.precision == "fp8" and self.fuse:
            raise ValueError(
                "fuse: the fused Triton projections (kernels/fused_linear.py) are bfloat16 GEMMs with the norm and "
                "SiLU/residual folded in; they have no float8 form, so precision fp8 and fuse: true cannot both be "
                "set (choose one)"
            )
        for t in self.targets:
            if self.precision == "fp8" and re.fullmatch(r"sm\d{2,3}", t):
                _check_precision_sm("fp8", int(t[2:]), f"targets: {t}")
        for i, t in enumerate(self.targets):
            if t not in ("cpu", "cuda") and not re.fullmatch(r"sm\d{2,3}", t):
                raise ValueError(f"targets[{i}]: expected cpu, cuda or sm<NN> such as sm90 (got {t!r})")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets: each target once (got {self.targets})")
        return self


class EngineConfig(_Section):
    """TensorRT engines: one per target, with grc::HSTUAttention carried by the plugin library."""

    targets: list[EngineTarget] = Field(
        default_factory=list, max_length=lim.MAX_LIST, description="engines to build; empty: no engine stage"
    )
    precision: Precision = Field(
        "fp16",
        description="fp32, fp16 or bf16: the graph is cast before the build; int8 / fp8: the quantize stage's "
        "calibrated Q/DQ graph (int8 on sm80+, fp8 on sm89+). Engine I/O stays fp32",
    )
    calibration: Calibration = Field(Calibration(), description="users the int8 / fp8 quantizers calibrate on")
    profiles: list[EngineProfile] = Field(
        default_factory=lambda: [EngineProfile()],
        max_length=lim.MAX_LIST,
        description="optimization profiles (at least one)",
    )
    optimization_level: int = Field(3, ge=0, le=5, description="builder optimization level (TensorRT's default 3)")
    workspace_mb: MiB | None = Field(None, description="workspace memory pool limit; none: the device's")
    timing_cache: bool = Field(
        True,
        description="keep a timing cache per target under the grc cache folder (full TensorRT only: in "
        "TensorRT-RTX timing-cache calls are no-ops)",
    )
    embed_plugin: bool = Field(
        False, description="serialize the plugin library into the plan (the runtime then needs no separate .so)"
    )
    parity: Tolerance | None = Field(
        None, description="engine vs onnxruntime tolerance; default by precision (fp32 2e-3, fp16 3e-2, bf16 6e-2)"
    )
    aoti: AotiConfig = Field(AotiConfig(), description="AOTInductor packages (the aoti stage), next to TensorRT")

    @model_validator(mode="after")
    def _targets_and_profiles(self) -> EngineConfig:
        for i, target in enumerate(self.targets):
            if target.precision is None:
                _check_precision_sm(
                    self.precision, target.compute_capability, "precision", f"targets[{i}] {target.name!r}"
                )
        names = [t.name for t in self.targets]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"targets[{i}]: target name {name!r} is used twice (got {names})")
        if not self.profiles:
            raise ValueError("profiles: expected at least one optimization profile (got [])")
        return self

    def precision_of(self, target: EngineTarget) -> str:
        return target.precision or self.precision

    def tolerance_of(self, precision: str) -> Tolerance:
        if self.parity is not None:
            return self.parity
        default = DEFAULT_TOLERANCE[precision]
        return Tolerance(max_abs=default, max_rel=default)


# engine / package vs its reference (onnxruntime on the same graph, or PyTorch float64): quantized
# graphs round every GEMM input, so their bound is the ranking gates' max |Δscore| (verify.ranking)
DEFAULT_TOLERANCE = {"fp32": 2e-3, "fp16": 3e-2, "bf16": 6e-2, "int8": 5e-2, "fp8": 5e-2}


TritonBackend = Literal["onnxruntime", "tensorrt_plan", "aotinductor", "pytorch", "pytorch_kernels"]
# Backends the fused pipeline runs (one python model: lookup -> projector -> dense -> ranking): the
# ensemble's separate dense steps (onnxruntime, tensorrt_plan) are not in it.
FUSED_BACKENDS = ("aotinductor", "pytorch", "pytorch_kernels")
# Backends only the fused pipeline has (the ensemble has no plain-PyTorch dense step).
FUSED_ONLY_BACKENDS = ("pytorch", "pytorch_kernels")


class TritonSample(_Section):
    """The generated request used for model warmup, the deploy smoke test and the curl example
    (cut to the model's max_candidates and max_seq_len where it asks for more)."""

    history: SeqLen = Field(16, description="history events in the sample request")
    candidates: SeqLen = Field(8, description="candidates in the sample request")
    seed: Seed = Field(0, description="seed of the sample's random ids and timestamps")


class HistoryCacheConfig(_Section):
    """The user-history cache of the triton bundle (README: "User-history cache")."""

    enabled: bool = Field(
        False,
        description="serve <model_name> from one python model that keeps each user's per-layer K/V (requests "
        "carrying user_id) and computes only new history events and candidates; the ensembles stay, named "
        "<model_name>-<backend>",
    )
    budget_mb: MiBFraction = Field(1024.0, description="bytes of cached K/V kept per instance, in MiB (LRU eviction)")
    max_user_mb: MiBFraction | None = Field(
        None, description="largest entry kept for one user, in MiB; default: budget_mb / 8"
    )
    instances: Instances = Field(
        1,
        description="cache stores, each one model instance of its own (<model_name>-cache-<k>) behind a router "
        "that sends each user_id to one of them (a hash of the id); 1: the client name is the one cached model",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dense model and cached K/V dtype on KIND_GPU instances (grc's Triton kernels); KIND_CPU "
        "instances run float32",
    )
    store: Literal["auto", "arena", "copies"] = Field(
        "auto",
        description="where an instance keeps entries (both pipelines). arena: as rows of one buffer of budget_mb "
        "allocated at load (device memory on KIND_GPU, host memory on KIND_CPU), which the cached step reads and "
        "grows in place (on KIND_GPU in CUDA graphs); copies: one tensor per entry (on KIND_GPU copied into the "
        "graphed step's buffers and the grown entry out: the earlier path, kept to compare); auto: arena on KIND_GPU "
        "with CUDA graphs, copies elsewhere",
    )


class GpuBucket(_Section):
    """One CUDA-graph bucket: a graph captured at load for ``users`` users and ``tokens`` tokens."""

    users: Users = Field(
        description="user slots of the bucket (real users, padding users, empty users); at most max_batch_size + "
        "ceil(tokens / max_seq_len): the real users and the padding users its tokens can need"
    )
    tokens: Annotated[int, Field(ge=2, le=lim.MAX_USERS * lim.MAX_SEQ_LEN)] = Field(
        description="tokens of the bucket (a batch's tokens, padded up to this)"
    )


class TritonGpuConfig(_Section):
    """The fused pipeline on a GPU (README: "Serving on a GPU")."""

    tables: Literal["auto", "device", "pinned_host"] = Field(
        "auto",
        description="where the embedding tables live: device (GPU memory, lookups are GPU gathers), pinned_host "
        "(pinned host memory, rows gathered by a GPU kernel through its unified address), auto: device when the "
        "tables fit tables_device_budget_mb, else pinned_host (decided at load, said in the log)",
    )
    tables_device_budget_mb: MiB = Field(
        16_384, description="most table bytes (codes and scales) tables: auto puts on the GPU, in MiB"
    )
    cuda_graphs: bool = Field(
        True, description="capture a CUDA graph of the dense step per bucket at load (aotinductor, pytorch_kernels)"
    )
    buckets: list[GpuBucket] = Field(
        default_factory=list,
        max_length=lim.MAX_LIST,
        description="(users, tokens) of the CUDA graphs; a batch runs in the smallest that holds it, padded; "
        "empty: a geometric ladder up to max_batch_size x max_seq_len",
    )


class TritonBundleConfig(_Section):
    """The Triton model repository: ensemble <model_name> = preprocess -> dense model -> postprocess."""

    enabled: bool = Field(True, description="write the triton bundle (artifacts/<spec>/triton/)")
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="name of the ensemble clients call; default: the spec name",
    )
    backend: TritonBackend = Field(
        "onnxruntime",
        description="dense model step of the ensemble: onnxruntime (the exported ONNX in a python-backend model, "
        "CPU or GPU), tensorrt_plan (the engine stage's TensorRT engines, one per compute capability) or "
        "aotinductor (the aoti stage's .pt2 packages in a python-backend model: the cpu package on KIND_CPU, "
        "the GPU package on KIND_GPU; needs engine.aoti.enabled); the fused pipeline only: pytorch "
        "(GRDense.forward_padded, the hand-written baseline) or pytorch_kernels (grc's Triton kernels, no package)",
    )
    extra_backends: list[TritonBackend] = Field(
        default_factory=list,
        max_length=lim.MAX_LIST,
        description="further dense steps carried in the same repository, each behind its own ensemble "
        "<model_name>-<backend>",
    )
    max_batch_size: Users = Field(8, description="most users one execution of a model takes (every step)")
    preferred_batch_sizes: list[Users] = Field(
        default_factory=lambda: [4, 8],
        max_length=lim.MAX_LIST,
        description="batch sizes the dynamic batcher sends at once when it can",
    )
    max_queue_delay_us: Annotated[int, Field(ge=0, le=lim.MAX_QUEUE_DELAY_US)] = Field(
        2000, description="how long the dynamic batcher may hold a request to form a bigger batch"
    )
    instance_count: Instances = Field(1, description="instances of the dense step (model copies)")
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = Field(
        "KIND_CPU",
        description="where the dense step runs (the fused pipeline: the whole request path); KIND_GPU: the fused "
        "pipeline, or tensorrt_plan in the ensemble",
    )
    pipeline: Literal["fused", "ensemble"] = Field(
        "ensemble",
        description="fused: one python model per backend runs lookup, projector, dense and ranking (on a GPU: no "
        "IPC hop and host copy between steps); ensemble: preprocess -> dense -> postprocess. Default: fused on "
        "KIND_GPU when every backend is one the fused model runs, else ensemble",
    )
    gpu: TritonGpuConfig = Field(TritonGpuConfig(), description="the fused pipeline on a GPU")
    gpus: list[GpuId] = Field(
        default_factory=list, max_length=lim.MAX_LIST, description="GPU ids of KIND_GPU instances; empty: every GPU"
    )
    pipeline_instance_count: Instances = Field(1, description="instances of preprocess and of postprocess")
    intra_op_threads: Annotated[int, Field(ge=0, le=lim.MAX_THREADS)] = Field(
        1,
        description="host threads per instance (onnxruntime's, torch's intra-op pool; on a GPU instance torch's host "
        "copies); 0: the library picks (every core)",
    )
    top_k: SeqLen = Field(10, description="ranked candidates returned per request (fewer if fewer are sent)")
    rank_weights: dict[Identifier, RankWeight] = Field(
        default_factory=dict,
        description="task -> weight of the ranking score sum(weight * score); tasks left out weigh 0; empty: all 1",
    )
    truncate_history: bool = Field(
        True, description="keep the latest events of a history too long for max_seq_len (false: refuse the request)"
    )
    warmup: bool = Field(True, description="model_warmup with the generated sample request in every python model")
    history_cache: HistoryCacheConfig = Field(HistoryCacheConfig(), description="the user-history cache")
    sample: TritonSample = Field(TritonSample(), description="the generated sample request")
    model_version: Version = Field(1, description="version directory the bundle writes")
    version_policy: Literal["latest", "all", "specific"] = Field(
        "latest", description="which versions Triton serves: latest (one), all, or the listed versions"
    )
    versions: list[Version] = Field(
        default_factory=list, max_length=lim.MAX_LIST, description="versions served by version_policy specific"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_pipeline(cls, data: Any) -> Any:
        """Default on KIND_GPU: fused when it runs every listed backend (the history cache included), or when a
        backend runs only there (pytorch, pytorch_kernels); else, and on KIND_CPU, the ensemble. A pipeline named
        in the spec is kept, and what it cannot run is refused (``_pipeline_rules``), so a spec that served as an
        ensemble on a GPU still does."""
        if not isinstance(data, dict) or "pipeline" in data:
            return data
        backends = [data.get("backend", "onnxruntime"), *(data.get("extra_backends") or [])]
        fusable = all(b in FUSED_BACKENDS for b in backends)
        fused = data.get("instance_kind") == "KIND_GPU" and (fusable or any(b in FUSED_ONLY_BACKENDS for b in backends))
        return {**data, "pipeline": "fused" if fused else "ensemble"}

    @model_validator(mode="after")
    def _consistent(self) -> TritonBundleConfig:
        self._pipeline_rules()
        big = [b for b in self.preferred_batch_sizes if b > self.max_batch_size]
        if big:
            raise ValueError(f"preferred_batch_sizes: each must be <= max_batch_size {self.max_batch_size} (got {big})")
        if self.backend in self.extra_backends or len(set(self.extra_backends)) != len(self.extra_backends):
            raise ValueError(
                f"extra_backends: list backends other than {self.backend!r}, once each (got {self.extra_backends})"
            )
        if self.gpus and self.instance_kind != "KIND_GPU":
            raise ValueError(f"gpus: only KIND_GPU instances take GPU ids (instance_kind is {self.instance_kind})")
        if self.rank_weights and not any(self.rank_weights.values()):
            raise ValueError(f"rank_weights: at least one weight must be non-zero (got {self.rank_weights})")
        if self.version_policy == "specific" and self.model_version not in self.versions:
            raise ValueError(
                f"versions: version_policy specific must list model_version {self.model_version}, "
                f"the version the bundle writes (got {self.versions})"
            )
        if self.versions and self.version_policy != "specific":
            raise ValueError(f"versions: only version_policy specific uses versions (policy is {self.version_policy})")
        return self

    def _pipeline_rules(self) -> None:
        """What the chosen pipeline cannot run, named by its field."""
        backends = (self.backend, *self.extra_backends)
        if self.pipeline == "fused":
            other = [b for b in backends if b not in FUSED_BACKENDS]
            if other:
                raise ValueError(
                    f"pipeline: fused runs the dense step as {', '.join(FUSED_BACKENDS)} inside one python model; "
                    f"{', '.join(other)} is a separate step of the ensemble: set pipeline: ensemble or drop it "
                    f"(got backends {list(backends)})"
                )
            cache = self.history_cache
            if cache.enabled and self.instance_count != cache.instances:
                # each store is one fused model of ONE instance; the router sends every user to its own
                raise ValueError(
                    f"history_cache.instances: with pipeline fused the cached model runs one store per instance, "
                    f"each a model of its own behind a router that sends every user_id to one; set "
                    f"history_cache.instances to instance_count (got instances {cache.instances}, "
                    f"instance_count {self.instance_count})"
                )
            if cache.enabled and "dtype" in cache.model_fields_set:
                raise ValueError(
                    "history_cache.dtype: the fused model keeps the K/V in its own dense dtype (engine.aoti.dtype "
                    "on KIND_GPU, float32 on KIND_CPU), so cached and uncached users compute alike; remove it "
                    "(it sets the ensemble's cached model)"
                )
        else:
            only = [b for b in backends if b in FUSED_ONLY_BACKENDS]
            if only:
                raise ValueError(
                    f"pipeline: ensemble has no {', '.join(only)} step; the fused pipeline runs it "
                    f"(set pipeline: fused)"
                )
        if self.instance_kind == "KIND_CPU":
            if self.gpu.tables == "pinned_host":
                raise ValueError(
                    "gpu.tables: pinned_host feeds a GPU gather; KIND_CPU instances read the "
                    "memory-mapped tables (use auto or device)"
                )
            if self.gpu.cuda_graphs and "gpu" in self.model_fields_set and "cuda_graphs" in self.gpu.model_fields_set:
                raise ValueError("gpu.cuda_graphs: CUDA graphs need KIND_GPU instances (instance_kind is KIND_CPU)")


class VllmBundleConfig(_Section):
    """The vLLM bundle: a model folder ``vllm serve`` loads through grc's plugin, served by the pooling runner."""

    enabled: bool = Field(True, description="write the vllm bundle (artifacts/<spec>/bundles/vllm/)")
    mode: Literal["ranking", "retrieval"] = Field(
        "ranking",
        description="ranking: per-candidate multi-task scores through the pooling runner (/pooling, task "
        "token_classify). retrieval (next-item generation) is not served: see the README's vLLM section",
    )
    served_model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="the model name clients send; default: the spec name",
    )
    max_num_seqs: Users = Field(16, description="most requests vLLM schedules in one step (continuous batching)")
    max_model_len: PromptTokens | None = Field(
        None, description="longest prompt in tokens; default: the longest valid request of the model (bundle.json)"
    )
    max_num_batched_tokens: PromptTokens | None = Field(
        None,
        description="most prompt tokens in one step; at least max_model_len (chunked prefill is off: a request is "
        "scheduled whole); default: max(max_model_len, 8192)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dense model dtype in vLLM (embedding rows are looked up in float32 and cast)"
    )
    gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="vLLM's memory fraction; on the CPU backend a fraction of RAM it checks is free at start "
        "(the default 0.92 fails on a shared host; the model needs no KV cache)",
    )
    truncate_history: bool = Field(
        True, description="the client encoder keeps the latest events of a history too long for max_seq_len"
    )
    batch_invariant: bool = Field(
        False,
        description="run the dense model once per request instead of once per vLLM step: scores bit-identical "
        "whoever shares the step (batched, they differ by float32 rounding only, ~1e-7), at a per-request cost",
    )
    sample: TritonSample = Field(TritonSample(), description="the generated sample request (smoke test, curl)")
    extra_args: list[str] = Field(default_factory=list, description="more flags for the vLLM server, verbatim")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment of the vLLM server, e.g. VLLM_CPU_OMP_THREADS_BIND: nobind (on a 2-core host the "
        "default binding pins the worker to one core and leaves the API server and engine loop the other)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> VllmBundleConfig:
        if self.mode == "retrieval":
            raise ValueError(
                "mode: retrieval (next-item generation) needs a generative head over the item vocabulary and "
                "decode steps that see the whole history; grc models have task heads only, and vLLM keeps no "
                "state for an attention-free model between decode steps (no KV cache for pointwise attention), "
                "so use mode ranking (got 'retrieval')"
            )
        if self.max_model_len and self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens: must be >= max_model_len {self.max_model_len} (chunked prefill is off, "
                f"so a request is scheduled whole) (got {self.max_num_batched_tokens})"
            )
        for flag in ("--enable-chunked-prefill", "--enable-prefix-caching"):
            if flag in self.extra_args:
                raise ValueError(
                    f"extra_args: {flag} breaks the request boundaries the model reads (each request must be "
                    f"scheduled whole, from position 0) (got {self.extra_args})"
                )
        return self


class BundlesConfig(_Section):
    triton: TritonBundleConfig = TritonBundleConfig()
    vllm: VllmBundleConfig = VllmBundleConfig()


# --------------------------------------------------------------------------- the spec
# Fields that specs once carried and grc no longer reads: a clear error beats a silent no-op.
REMOVED_FIELDS = {
    "kernels": "removed: nothing read it. Each stage runs the HSTU ops it is built on (export and verify the "
    "padded PyTorch form, aoti grc's custom ops with the Triton kernels on CUDA, engines the TensorRT plugin), "
    "so no spec field can choose them; delete the line",
}


class Spec(_Section):
    name: Name = Field(description="artifact folder name: artifacts/<name>/ (a safe path component)")
    description: str = ""
    model: ModelConfig
    weights: WeightsConfig = WeightsConfig()
    export: ExportConfig = ExportConfig()
    surgery: SurgeryConfig = SurgeryConfig()
    verify: VerifyConfig = VerifyConfig()
    engine: EngineConfig = EngineConfig()
    bundles: BundlesConfig = BundlesConfig()

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        for key, why in REMOVED_FIELDS.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(f"{key}: {why}")
        return data

    @model_validator(mode="after")
    def _within_the_model(self) -> Spec:
        """Rules joining a later section to the model: found by ``grc validate``, not by a stage."""
        model, hstu = self.model, self.model.hstu
        for task in self.bundles.triton.rank_weights:
            if task not in model.tasks:
                raise ValueError(
                    f"bundles.triton.rank_weights.{task}: names task {task!r}, which model.tasks does "
                    f"not define (tasks: {', '.join(model.tasks)})"
                )
        for i, profile in enumerate(self.engine.profiles):
            if profile.tokens is not None and profile.tokens.max > hstu.max_seq_len:
                raise ValueError(
                    f"engine.profiles[{i}].tokens.max: {profile.tokens.max} exceeds model.hstu.max_seq_len "
                    f"{hstu.max_seq_len}, the longest padded row the model accepts"
                )
        ranking = self.verify.ranking
        if self.engine.calibration.seed in (ranking.seed, self.verify.seed):
            raise ValueError(
                f"engine.calibration.seed: calibration users need their own seed, not verify.ranking.seed "
                f"{ranking.seed} or verify.seed {self.verify.seed} (a quantizer must not see the users it is judged on)"
            )
        if ranking.seed == self.verify.seed:
            raise ValueError(f"verify.ranking.seed: held-out users need their own seed, not verify.seed {ranking.seed}")
        if ranking.candidates is not None and ranking.candidates > model.max_candidates:
            raise ValueError(
                f"verify.ranking.candidates: {ranking.candidates} exceeds model.max_candidates {model.max_candidates}"
            )
        for i, shape in enumerate(self.verify.shapes):
            tokens = len(model.profile) + shape.history + shape.candidates
            if tokens > hstu.max_seq_len:
                raise ValueError(
                    f"verify.shapes[{i}].history: {len(model.profile)} profile + {shape.history} history + "
                    f"{shape.candidates} candidate tokens exceed model.hstu.max_seq_len {hstu.max_seq_len}"
                )
            if shape.candidates > model.max_candidates:
                raise ValueError(
                    f"verify.shapes[{i}].candidates: {shape.candidates} exceeds model.max_candidates "
                    f"{model.max_candidates}"
                )
        rows = self.weights.table_block_rows
        blocks = sum(-(-t.vocab_size // rows) for t in model.tables.values())
        if blocks > lim.MAX_TABLE_BLOCKS:
            raise ValueError(
                f"weights.table_block_rows: {rows:,} rows per block cut the tables into {blocks:,} blocks; "
                f"at most {lim.MAX_TABLE_BLOCKS:,} (each is one tensor): raise table_block_rows"
            )
        return self

    @model_validator(mode="after")
    def _served_artifacts(self) -> Spec:
        triton, aoti = self.bundles.triton, self.engine.aoti

        def field(backend: str) -> str:  # where the spec names it
            return "bundles.triton." + ("backend" if triton.backend == backend else "extra_backends")

        if "tensorrt_plan" in (triton.backend, *triton.extra_backends) and triton.enabled and not self.engine.targets:
            raise ValueError(
                f"{field('tensorrt_plan')}: tensorrt_plan serves the engine stage's TensorRT engines; "
                "list the GPUs in engine.targets"
            )
        if "aotinductor" in (triton.backend, *triton.extra_backends) and triton.enabled:
            gpu = [t for t in aoti.targets if t != "cpu"]
            if not aoti.enabled:
                raise ValueError(
                    f"{field('aotinductor')}: aotinductor serves the aoti stage's packages; "
                    "set engine.aoti.enabled: true"
                )
            if triton.instance_kind == "KIND_CPU" and "cpu" not in aoti.targets:
                raise ValueError(
                    f"bundles.triton.instance_kind: KIND_CPU serves the cpu package, and "
                    f"engine.aoti.targets has none (got {aoti.targets})"
                )
            if triton.instance_kind == "KIND_GPU" and not gpu:
                raise ValueError(
                    f"bundles.triton.instance_kind: KIND_GPU serves a GPU package, and "
                    f"engine.aoti.targets has none (got {aoti.targets})"
                )
        seq = self.model.hstu.max_seq_len
        most = triton.max_batch_size * seq
        for i, bucket in enumerate(triton.gpu.buckets):
            where = f"bundles.triton.gpu.buckets[{i}]"
            if bucket.tokens > most:
                raise ValueError(
                    f"{where}.tokens: {bucket.tokens} exceeds max_batch_size {triton.max_batch_size} "
                    f"x model.hstu.max_seq_len {seq} = {most}"
                )
            slots = triton.max_batch_size + -(-bucket.tokens // seq)  # real users + the padding users tokens need
            if bucket.users > slots:
                raise ValueError(
                    f"{where}.users: {bucket.users} slots, and a batch of {bucket.tokens} tokens uses at "
                    f"most {slots} (max_batch_size {triton.max_batch_size} + one padding user per "
                    f"max_seq_len {seq} padding tokens)"
                )
        return self
