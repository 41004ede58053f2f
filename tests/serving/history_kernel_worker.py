"""Runs the history-cached model's scorer with impl "triton" under TRITON_INTERPRET=1 (the Triton
kernels on CPU tensors), the same through the CUDA-graph layout run eagerly ("padded": ScoreGraphs with
graphs=False, pad users and empty user slots included) and with the PyTorch reference, on the same users,
and prints one JSON line.

Started as a subprocess by test_history_cached_device.py: TRITON_INTERPRET must be set before the
kernels are imported. Usage: history_kernel_worker.py <spec.yaml> <weights dir> <seed>
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from grc.model.sample import random_batch  # noqa: E402
from grc.serving.common import request as rq  # noqa: E402
from grc.serving.common.score_graphs import ScoreGraphs  # noqa: E402
from grc.serving.common.validate import parse  # noqa: E402
from grc.serving.ranker.dense import GraphStats  # noqa: E402
from grc.serving.triton.models.history_cached import CachedScorer  # noqa: E402
from grc.spec.loader import load_spec  # noqa: E402


def main() -> None:
    spec_path, weights, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cfg = load_spec(spec_path).spec.model
    gen = torch.Generator().manual_seed(seed)
    full = rq.user_request(random_batch(cfg, 1, 30, 5, gen), 0, cfg)
    history = {rq.history_input(t) for t in cfg.history} | {rq.HISTORY_TIME}
    earlier = {k: a[:, :20] if k in history else a for k, a in full.items()}  # a first visit, 10 events fewer
    scores: dict[str, list[list[float]]] = {}
    stats: dict[str, dict[str, int]] = {}
    tuned: list[tuple[int, bool]] = []
    for impl in ("triton", "padded", "pytorch"):
        scorer = CachedScorer(cfg, weights, 1 << 24, None, "cpu", "digest", impl="triton" if impl == "padded" else impl)
        if impl == "padded":  # warmed up as a server warms it (its small step's shape stays among the kept ones)
            scorer.caches.graphs = ScoreGraphs(scorer.dense, "triton", GraphStats(), max_users=2, graphs=False)
            tuned = scorer.caches.graphs.warm_up(torch.empty(0, dtype=scorer.dtype))
            warm = scorer.caches.graphs.stats
            stats["after_warm_up"] = {"graph_hits": warm.graph_hits, "padded_tokens": warm.padded_tokens}
        user = np.array([7], np.int64)
        for visit, arrays in (("miss", earlier), ("hit", full)):
            got = scorer.score(parse(dict(arrays), cfg, True), user)
            scores[f"{impl}_{visit}"] = got.reshape(-1).tolist()
        uncached = scorer.score(parse(dict(full), cfg, True), None)
        scores[f"{impl}_uncached"] = uncached.reshape(-1).tolist()
        s = scorer.cache.stats()
        stats[impl] = {"hits": s.hits, "misses": s.misses}
        if scorer.caches.graphs is not None:
            stats[impl]["padded_tokens"] = scorer.caches.graphs.stats.padded_tokens
    print(json.dumps({"scores": scores, "stats": stats, "tuned": tuned}))


if __name__ == "__main__":
    main()
