"""The PyTorch model a served bundle is checked against: the bundle's own weights, float64 unless told, jagged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from grc.spec.schema import ModelConfig


class ReferenceModel:
    """The scores a served model must give; each server's ``Reference`` turns its request format into a batch."""

    def __init__(self, cfg: ModelConfig, weights_dir: Path, dtype: Any = None):
        import torch

        from grc.weights import load_model, open_tables

        self.cfg = cfg
        self.dtype = dtype or torch.float64
        self.model = load_model(cfg, weights_dir).to(self.dtype)
        self.tables = open_tables(cfg, weights_dir)

    def run(self, batch: Any) -> np.ndarray:
        """[candidates of all users, tasks] float64 for a jagged ``grc.model`` batch."""
        import torch

        with torch.no_grad():
            return np.asarray(self.model(batch, self.tables).double().numpy())
