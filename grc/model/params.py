"""Every parameter's name, shape and kind, from the spec alone (nothing is allocated).

Dense shapes come from instantiating the real modules on the ``meta`` device, so the table that
``grc show`` prints and the tensors the weights stage writes cannot drift from the model code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from grc.model.gr import GRModel
from grc.model.tables import block_count, block_name
from grc.spec.schema import ModelConfig


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
    with torch.device("meta"):
        model = GRModel(cfg)
    return [ParamSpec(name, tuple(t.shape), "dense") for name, t in model.state_dict().items()]


def table_params(cfg: ModelConfig, block_rows: int) -> list[ParamSpec]:
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
    rows: list[tuple[str, str, int]] = []
    for table, tcfg in sorted(cfg.tables.items()):
        rows.append(
            (
                f"tables.{table} ({tcfg.vocab_size:,} x {cfg.table_dim(table)})",
                "embedding",
                tcfg.vocab_size * cfg.table_dim(table),
            )
        )
    groups: dict[str, int] = {}
    for p in dense_params(cfg):
        parts = p.name.split(".")
        key = ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:2])
        key = "dense.layers.*" if key.startswith("dense.layers.") else key
        groups[key] = groups.get(key, 0) + p.numel
    rows += [(k, "dense", v) for k, v in groups.items()]
    return rows


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def init_tensor(p: ParamSpec, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic init of one tensor: a generator seeded by (seed, name), so any order, any
    sharding and any block size give the same values for the same tensor."""
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
