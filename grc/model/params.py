"""Every parameter's name, shape and kind, and the dense FLOPs of a sample, from the spec alone
(nothing is allocated).

Dense shapes come from instantiating the real modules on the ``meta`` device, so the table that
``grc show`` prints and the tensors the weights stage writes cannot drift from the model code.
``dense_parameter_count`` and ``dense_flops_per_sample`` are closed forms of the same modules
(torch-free, for the disk budget a build checks before it starts); tests hold the count equal to
the meta-device model's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grc.spec.schema import ModelConfig

if TYPE_CHECKING:
    import torch

# The MTGR paper's Table 2 GFLOPs per sample (5.47 / 18.59 / 55.76) are exactly
# layers * (10*T*d^2 + 4*T^2*d) at T = 500 tokens: U, V, Q, K and the output projection all d wide,
# attention over all T x T pairs, 2 FLOPs per multiply-add. The paper states the totals only; the
# token count is what they imply.
PAPER_TOKENS = 500


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "dense" or "embedding"
    table: str | None = None
    block: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def dense_params(cfg: ModelConfig) -> list[ParamSpec]:
    import torch

    from grc.model.gr import GRModel

    with torch.device("meta"):
        model = GRModel(cfg)
    return [ParamSpec(name, tuple(t.shape), "dense") for name, t in model.state_dict().items()]


def table_params(cfg: ModelConfig, block_rows: int) -> list[ParamSpec]:
    from grc.model.tables import block_count, block_name  # imports torch: only when tables are listed

    out = []
    for table, tcfg in sorted(cfg.tables.items()):
        dim = cfg.table_dim(table)
        for b in range(block_count(tcfg.vocab_size, block_rows)):
            rows = min(block_rows, tcfg.vocab_size - b * block_rows)
            out.append(ParamSpec(block_name(table, b), (rows, dim), "embedding", table, b))
    return out


def all_params(cfg: ModelConfig, block_rows: int) -> list[ParamSpec]:
    return dense_params(cfg) + table_params(cfg, block_rows)


def parameter_summary(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """(group, kind, count) rows: one per embedding table, one per dense component, analytic."""
    rows: list[tuple[str, str, int]] = [
        (label, "embedding", vocab * dim) for label, (vocab, dim) in _table_groups(cfg).items()
    ]
    groups: dict[str, int] = {}
    for p in dense_params(cfg):
        parts = p.name.split(".")
        key = ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])
        key = "dense.layers.*" if key.startswith("dense.layers.") else key
        groups[key] = groups.get(key, 0) + p.numel
    rows += [(k, "dense", v) for k, v in groups.items()]
    return rows


# Bytes of one stored value per float dtype; quantized tables add their per-row fp16 factors
# (grc/model/tables.py): int8 a scale and an offset, fp8_e4m3 a scale.
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROW_FACTOR_BYTES = {"int8": 4, "fp8_e4m3": 2}
TABLE_PRECISIONS = ("float32", "bfloat16", "int8", "fp8_e4m3")  # the columns grc show prints


def table_bytes(rows: int, dim: int, dtype: str) -> int:
    """Bytes a table of ``rows`` x ``dim`` takes stored in ``dtype`` (what the weights stage writes)."""
    if dtype in ROW_FACTOR_BYTES:
        return rows * (dim + ROW_FACTOR_BYTES[dtype])
    return rows * dim * FLOAT_BYTES[dtype]


def _table_groups(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The parameter table's label of each embedding table -> (rows, dim)."""
    return {
        f"tables.{table} ({tcfg.vocab_size:,} x {cfg.table_dim(table)})": (tcfg.vocab_size, cfg.table_dim(table))
        for table, tcfg in sorted(cfg.tables.items())
    }


def parameter_bytes(cfg: ModelConfig, *rows: tuple[str, str, int]) -> dict[str, int]:
    """Bytes of ``parameter_summary`` rows stored in each of TABLE_PRECISIONS. int8 / fp8_e4m3
    quantize the tables only: dense parameters stay float32 in those columns."""
    groups = _table_groups(cfg)
    return {
        precision: sum(
            table_bytes(*groups[label], precision) if kind == "embedding" else count * FLOAT_BYTES.get(precision, 4)
            for label, kind, count in rows
        )
        for precision in TABLE_PRECISIONS
    }


def dense_parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the dense modules (projector, HSTU layers, final norm, task heads), counted
    from the spec: what ``dense_params`` finds on the meta device, without importing torch."""
    d, h = cfg.d_model, cfg.hstu
    groups = len(cfg.token_groups)
    uvqk = 2 * h.linear_dim + 2 * h.attention_dim
    layer = (
        2 * groups * d  # group layer norm in
        + d * uvqk
        + uvqk  # U, V, Q, K projection
        + h.num_heads * (2 * h.position_buckets - 1 + h.time_buckets)  # relative bias tables
        + 2 * h.linear_dim  # layer norm of A V
        + h.linear_dim * d
        + d  # output projection
    )
    history_in = sum(cfg.table_dim(t) for t in cfg.history)
    candidate_in = sum(cfg.table_dim(t) for t in cfg.candidate) + cfg.cross_features
    projector = sum(cfg.table_dim(t) * d + d for t in cfg.profile) + history_in * d + d + candidate_in * d + d
    heads = len(cfg.tasks) * (d * cfg.head_hidden + 2 * cfg.head_hidden + 1)
    return projector + h.num_layers * layer + 2 * groups * d + heads


@dataclass(frozen=True)
class SampleFlops:
    """Dense FLOPs of one sample (one user: profile + history + candidate tokens), 2 per
    multiply-add, matrix products only (norms, SiLU and the bias lookups are a few per element)."""

    tokens: int
    projections: int  # per HSTU layer: U, V, Q, K and the output projection, every token
    attention: int  # per HSTU layer: Q K^T and A V over all tokens x tokens pairs (masks not skipped)
    layers: int
    embedding_projection: int  # looked-up embeddings -> d_model tokens
    heads: int  # task heads (grc runs them on every token, then keeps the candidates')

    @property
    def hstu(self) -> int:
        """The HSTU stack: what the MTGR paper's per-sample figures count."""
        return self.layers * (self.projections + self.attention)

    @property
    def total(self) -> int:
        return self.hstu + self.embedding_projection + self.heads


def dense_flops_per_sample(cfg: ModelConfig, history: int, candidates: int) -> SampleFlops:
    """FLOPs grc's dense model spends on one user with ``history`` events and ``candidates``."""
    d, h = cfg.d_model, cfg.hstu
    profile = len(cfg.profile)
    tokens = profile + history + candidates
    history_in = sum(cfg.table_dim(t) for t in cfg.history)
    candidate_in = sum(cfg.table_dim(t) for t in cfg.candidate) + cfg.cross_features
    profile_in = sum(cfg.table_dim(t) for t in cfg.profile)
    return SampleFlops(
        tokens=tokens,
        projections=2 * tokens * d * (2 * h.linear_dim + 2 * h.attention_dim) + 2 * tokens * h.linear_dim * d,
        attention=2 * tokens * tokens * (h.attention_dim + h.linear_dim),
        layers=h.num_layers,
        embedding_projection=2 * d * (profile_in + history * history_in + candidates * candidate_in),
        heads=2 * tokens * len(cfg.tasks) * (d * cfg.head_hidden + cfg.head_hidden),
    )


def paper_sample(cfg: ModelConfig) -> SampleFlops:
    """A sample of ``PAPER_TOKENS`` tokens (one candidate), the basis of MTGR's Table 2."""
    return dense_flops_per_sample(cfg, PAPER_TOKENS - len(cfg.profile) - 1, 1)


def flops_report(cfg: ModelConfig) -> list[str]:
    """Lines for ``grc show``: GFLOPs per sample on the MTGR paper's basis (when the model takes
    that many tokens) and at max_seq_len with max_candidates."""
    longest = cfg.hstu.max_seq_len - len(cfg.profile) - cfg.max_candidates
    samples = [("max_seq_len", dense_flops_per_sample(cfg, longest, cfg.max_candidates))]
    if cfg.hstu.max_seq_len >= PAPER_TOKENS:
        samples.insert(0, ("the MTGR paper's Table 2 basis", paper_sample(cfg)))
    return [
        f"dense GFLOPs per sample of {f.tokens} tokens ({label}): HSTU layers {f.hstu / 1e9:.3g} (attention "
        f"{f.layers * f.attention / 1e9:.3g}), embedding projection {f.embedding_projection / 1e9:.3g}, task heads "
        f"{f.heads / 1e9:.3g}, total {f.total / 1e9:.3g}"
        for label, f in samples
    ]


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_tensor(p: ParamSpec, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic init of one tensor: a generator seeded by (seed, name), so any order, any
    sharding and any block size give the same values for the same tensor."""
    import torch

    gen = torch.Generator().manual_seed(_seed_for(seed, p.name))
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
    leaf = p.name.rsplit(".", 1)[-1]
    if p.kind == "embedding":
        value = noise * std
    elif leaf == "weight" and ("norm" in p.name):
        value = 1.0 + 0.1 * noise  # layer-norm scales near one, but not exactly: tests must see them
    elif leaf in ("bias", "b1", "b2"):
        value = 0.1 * noise
    elif leaf in ("pos_w", "ts_w"):
        value = 0.5 * noise  # relative bias on the scale of alpha*q.k, so a dropped bias shows
    else:
        fan_in = p.shape[1] if leaf == "w1" else p.shape[-1]
        value = noise / fan_in**0.5
    return value.to(dtype)
