"""The fp32 reference a quantized or rounded build is judged against: the weights as their source
gave them, before the weights stage stored them in the spec's dtypes.

Seeded init: every tensor drawn again in float32 (init is seeded per tensor name, so this is the
exact value the stored one was rounded or quantized from). Checkpoint import: the checkpoint's own
tensors widened to float32. Table blocks are produced on demand, one at a time (a lookup touches
each block once), so the reference of a multi-GB table never sits in memory whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from grc.errors import StageError
from grc.model.gr import GRModel
from grc.model.params import ParamSpec, all_params, init_tensor
from grc.model.tables import Tables
from grc.spec.schema import InitConfig, ModelConfig
from grc.weights.artifact import locate_checkpoint, read_manifest, slice_loader

Rows = Callable[[torch.Tensor], torch.Tensor]


def reference_weights(cfg: ModelConfig, weights_dir: Path) -> tuple[GRModel, Tables]:
    """(the float32 model, its float32 tables) from the source the weights manifest records."""
    manifest = read_manifest(weights_dir)
    source, block_rows = manifest["source"], manifest["block_rows"]
    if "init" in source:
        init = InitConfig.model_validate(source["init"])
        loaders = {p.name: (p, _drawn(p, init)) for p in all_params(cfg, block_rows)}
    else:
        path = Path(source["checkpoint"])
        if not path.exists():
            raise StageError(f"verify: the checkpoint the weights were imported from is gone: {path}")
        entries, _, _ = locate_checkpoint(cfg, path, source["key_map"], block_rows)
        loaders = {p.name: (p, slice_loader(load, rows, torch.float32)) for p, load, rows in entries}
    model = GRModel(cfg)
    model.load_state_dict({name: loaders[name][1]() for name in model.state_dict()})
    blocks: dict[str, list[Rows]] = {}
    for p, load in (v for v in loaders.values() if v[0].kind == "embedding"):
        blocks.setdefault(str(p.table), []).append(_block_rows(load))
    vocab = {t: c.vocab_size for t, c in cfg.tables.items()}
    return model.eval(), Tables(blocks, vocab, block_rows)


def _drawn(p: ParamSpec, init: InitConfig) -> Callable[[], torch.Tensor]:
    return lambda: init_tensor(p, init.seed, init.std, torch.float32)


def _block_rows(load: Callable[[], torch.Tensor]) -> Rows:
    return lambda rows: load()[rows]
