"""Random valid jagged requests for the dense model: what parity checks and benchmarks feed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grc.model.gr import GRDense
from grc.model.params import ParamSpec, init_tensor
from grc.spec.schema import ModelConfig

REQUEST_TIME = 1_750_000_000


@dataclass
class JaggedInputs:
    """The dense graph's inputs: tokens [T, D], offsets [B+1], num_candidates [B], timestamps [T]."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    num_candidates: torch.Tensor
    timestamps: torch.Tensor

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens, self.offsets, self.num_candidates, self.timestamps

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> JaggedInputs:
        tokens = self.tokens.to(device=device, dtype=dtype or self.tokens.dtype)
        return JaggedInputs(tokens, self.offsets.to(device), self.num_candidates.to(device), self.timestamps.to(device))

    @property
    def users(self) -> int:
        return self.offsets.numel() - 1


def random_inputs(
    cfg: ModelConfig,
    users: int,
    history: int,
    candidates: int,
    gen: torch.Generator,
    ragged: bool = True,
) -> JaggedInputs:
    """``users`` users of profile + history + candidate tokens (MTGR order). ragged: user 0 has
    exactly ``history`` / ``candidates``, the others random counts in [1, max]; else all equal.
    History events lie seconds to weeks before the request, so every time bucket occurs."""

    def counts(top: int) -> torch.Tensor:
        if not ragged:
            return torch.full((users,), top, dtype=torch.int64)
        c = torch.randint(1, top + 1, (users,), generator=gen)
        c[0] = top
        return c

    n_prof = len(cfg.profile)
    hist, cand = counts(history), counts(candidates)
    lengths = n_prof + hist + cand
    offsets = torch.zeros(users + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    now = REQUEST_TIME + torch.randint(0, 86_400, (users,), generator=gen)
    stamps = []
    for b in range(users):
        gaps = (2.0 ** (torch.rand(int(hist[b]), generator=gen) * 21)).to(torch.int64)
        stamps += [now[b].expand(n_prof), now[b] - gaps, now[b].expand(int(cand[b]))]
    total = int(offsets[-1])
    return JaggedInputs(
        tokens=torch.randn(total, cfg.d_model, generator=gen),
        offsets=offsets,
        num_candidates=cand,
        timestamps=torch.cat(stamps).to(torch.int64),
    )


def seeded_dense(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> GRDense:
    """The dense model with the weights stage's seeded init (same values as ``grc build`` writes
    for init.seed = seed), built in memory: no tables, nothing written."""
    dense = GRDense(cfg)
    state = {
        name: init_tensor(ParamSpec(f"dense.{name}", tuple(t.shape), "dense"), seed, std, torch.float32)
        for name, t in dense.state_dict().items()
    }
    dense.load_state_dict(state)
    return dense.eval()
