"""``Ranker``: the whole request path of one backend in one process, all requests of a batch in ONE pass.

    check (validate.parse, on the host)
      -> one host->device copy of ids, timestamps, layout (layout.py)
      -> embedding lookups (tables.py) -> token projector -> dense (dense.py) on the device
      -> one device->host copy of the candidates' scores -> ranking and top k (postprocess.rank_candidates)

The outputs per request are exactly the ensemble's postprocess outputs (names, dtypes, shapes).
``from_model_dir`` reads a fused model's version folder and its config.pbtxt parameters, so a
benchmark calling it in-process runs what the server runs. Not thread-safe: one Ranker per
instance (Triton runs one execute() at a time per instance).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grc.serving.common import request as rq
from grc.serving.common.validate import parse
from grc.serving.ranker import buckets as bk
from grc.serving.ranker import dense as dn
from grc.serving.ranker import layout as lay
from grc.serving.ranker.tables import open_lookup
from grc.serving.triton.models.postprocess import rank_candidates
from grc.spec.schema import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Ranker:
    def __init__(
        self,
        cfg: ModelConfig,
        projector: Any,
        tables: Any,
        dense: dn.Runner,
        dense_dtype: torch.dtype,
        device: torch.device,
        weights: np.ndarray,
        top_k: int,
        truncate: bool,
        stats: dn.GraphStats,
    ):
        self.cfg, self.projector, self.tables, self.dense = cfg, projector, tables, dense
        self.dense_dtype, self.device, self.weights, self.top_k = dense_dtype, device, weights, top_k
        self.truncate, self.graph_stats = truncate, stats
        self.requests = 0
        self.users = 0
        self.tokens = 0
        self.rank_us = 0  # wall time inside rank(): host work, copies, and waiting for the device
        self.dense_device_us = 0  # device time of the dense step (CUDA events; padding and graph replay included)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_model_dir(
        cls, model_dir: Path, device: str, params: dict[str, str], log: Callable[[str], None] = print
    ) -> Ranker:
        """A fused model's version folder (weights/, packages) and its config.pbtxt parameters."""
        from grc.weights import load_model

        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(cuda_missing(f"device {device}"))
        cfg = ModelConfig.model_validate_json(params["grc_model"])
        backend = params["backend"]
        if backend not in dn.BACKENDS:
            raise ValueError(f"backend: the fused model runs {', '.join(dn.BACKENDS)} (got {backend!r})")
        weights_dir = model_dir / "weights"
        model = load_model(cfg, weights_dir)
        projector = model.projector.to(dev)
        dtype = DTYPES[params.get("dtype", "float32")] if dev.type == "cuda" else torch.float32
        if backend == "aotinductor":
            package = model_dir / json.loads(params["packages"])["gpu" if dev.type == "cuda" else "cpu"]
            dtype = DTYPES[json.loads((package.parent / "metadata.json").read_text())["dtype"]]
            fn = dn.aotinductor(package, dev)
        else:
            dense = model.dense.to(device=dev, dtype=dtype)
            fn = dn.pytorch(dense) if backend == "pytorch" else dn.pytorch_kernels(dense)
        stats = dn.GraphStats()
        graphs = dev.type == "cuda" and params.get("cuda_graphs", "true") == "true" and backend in dn.GRAPHED
        if graphs:
            plan = [bk.Bucket(tokens=t, users=u) for u, t in json.loads(params["buckets"])]
            fn = dn.Bucketed(fn, plan, cfg.hstu.max_seq_len, cfg.d_model, dtype, dev, True, stats)
            log(
                f"{backend}: {len(plan)} CUDA graphs captured (buckets users x tokens: "
                f"{', '.join(f'{b.users}x{b.tokens}' for b in sorted(plan))})"
            )
        tables = open_lookup(
            cfg,
            weights_dir,
            dev,
            params.get("tables", "auto"),
            int(params.get("tables_device_budget_mb", "16384")),
            log,
        )
        rank_w = np.asarray(json.loads(params["rank_weights"]), dtype=np.float32)
        return cls(
            cfg,
            projector,
            tables,
            fn,
            dtype,
            dev,
            rank_w,
            int(params["top_k"]),
            params.get("truncate_history", "true") == "true",
            stats,
        )

    # ------------------------------------------------------------------ serving

    def check(self, raw: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """One request checked (raises validate.RequestError naming the problem)."""
        return parse(raw, self.cfg, self.truncate)

    def rank(self, checked: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Checked requests -> per request the ensemble's outputs, in one pipeline pass."""
        started = time.perf_counter()
        layout = lay.build(checked, self.cfg)
        cuda = self.device.type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []
        with torch.no_grad():
            feeds = lay.on_device(layout, self.device, self.cfg.cross_features)
            tokens = self._tokens(feeds, layout.tokens).to(self.dense_dtype)
            if cuda:
                events[0].record()
            scores = self.dense(tokens, feeds["offsets"], feeds["num_candidates"], feeds["timestamps"])
            if cuda:
                events[1].record()
            picked = scores.index_select(0, feeds["candidate_dst"]).float().cpu().numpy()  # waits for the device
        if cuda:
            self.dense_device_us += int(events[0].elapsed_time(events[1]) * 1000)
        self.requests += len(checked)
        self.users += layout.users
        self.tokens += layout.tokens
        outs, row = [], 0
        first = rq.candidate_input(self.cfg.candidate[0])
        for r, (b, c) in zip(checked, layout.shapes, strict=True):
            per_task = picked[row : row + b * c].reshape(b, c, -1)
            outs.append(rank_candidates(per_task, r[first], self.weights, self.top_k))
            row += b * c
        self.rank_us += int((time.perf_counter() - started) * 1e6)
        return outs

    def _tokens(self, feeds: dict[str, torch.Tensor], total: int) -> torch.Tensor:
        """Lookups and the token projector, scattered into the jagged [T, D] batch."""
        cfg, proj = self.cfg, self.projector
        dtype = proj.history.weight.dtype
        tokens = torch.empty(total, cfg.d_model, dtype=dtype, device=self.device)

        def rows(kind: str, table: str) -> torch.Tensor:
            return self.tables.lookup(table, feeds[f"{kind}:{table}"]).to(dtype)

        for t in cfg.profile:
            tokens.index_copy_(0, feeds[f"profile_dst:{t}"], proj.profile[t](rows("profile", t)))
        history = proj.history(torch.cat([rows("history", t) for t in cfg.history], -1))
        tokens.index_copy_(0, feeds["history_dst"], history)
        parts = [rows("candidate", t) for t in cfg.candidate]
        if cfg.cross_features:
            parts.append(feeds["cross"].to(dtype))
        tokens.index_copy_(0, feeds["candidate_dst"], proj.candidate(torch.cat(parts, -1)))
        return tokens

    def stats(self) -> dict[str, int]:
        s = self.graph_stats
        return {
            "graph_hits": s.graph_hits,
            "graph_misses": s.graph_misses,
            "padded_tokens": s.padded_tokens,
            "requests": self.requests,
            "users": self.users,
            "tokens": self.tokens,
            "rank_us": self.rank_us,
            "dense_device_us": self.dense_device_us,
        }


def cuda_missing(what: str) -> str:
    """Why a GPU model cannot run in this interpreter (no silent CPU fallback)."""
    import sys

    return (
        f"{what} needs a CUDA GPU (torch.cuda.is_available() is False): torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}) in {sys.executable}; run it on a "
        f"host with an NVIDIA GPU and a CUDA build of torch, or set bundles.triton.instance_kind: KIND_CPU"
    )
