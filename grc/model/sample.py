"""Random requests for verification and tests: fresh, non-zero, ragged."""

from __future__ import annotations

import torch

from grc.model.gr import Batch
from grc.spec.schema import ModelConfig


def random_batch(
    cfg: ModelConfig, users: int, history: int, candidates: int, gen: torch.Generator, exact: bool = False
) -> Batch:
    """``users`` users; user 0 has exactly ``history`` events and ``candidates`` candidates, the
    others random counts in [1, max], so every batch is ragged and hits the maxima. ``exact``: every
    user has the maxima (ranking checks compare full candidate lists)."""

    def counts(top: int) -> torch.Tensor:
        c = torch.randint(1, top + 1, (users,), generator=gen)
        c[0] = top
        return c.fill_(top) if exact else c

    def offsets(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.int64), c.cumsum(0)])

    def ids(table: str, n: int) -> torch.Tensor:
        return torch.randint(0, cfg.tables[table].vocab_size, (n,), generator=gen)

    h, c = counts(history), counts(candidates)
    th, tc = int(h.sum()), int(c.sum())
    now = torch.full((users,), 1_750_000_000, dtype=torch.int64) + torch.randint(0, 86_400, (users,), generator=gen)
    # history times: strictly before the request, gaps from seconds to weeks so every time bucket occurs
    gaps = (2.0 ** (torch.rand(th, generator=gen) * 21)).to(torch.int64)
    times = torch.repeat_interleave(now, h) - gaps
    return Batch(
        profile=torch.stack([ids(t, users) for t in cfg.profile], 1)
        if cfg.profile
        else torch.zeros(users, 0, dtype=torch.int64),
        history={t: ids(t, th) for t in cfg.history},
        history_time=times,
        history_offsets=offsets(h),
        candidates={t: ids(t, tc) for t in cfg.candidate},
        candidate_offsets=offsets(c),
        cross=torch.randn(tc, cfg.cross_features, generator=gen),
        request_time=now,
    )
