"""The model vLLM serves: grc's own GRModel behind vLLM's model interface (pooling runner, attention-free).

vLLM flattens the prompt tokens of every request it schedules in a step into one batch; with chunked prefill
and prefix caching off every request is scheduled whole, so its first token has position 0 and the requests'
boundaries are where ``positions == 0`` (the pooler checks them against vLLM's own cursor, built from
``query_start_loc``, and refuses a request whose boundaries disagree). Each request's prompt is decoded
(``plugin.tokens``), the valid requests of the step become one jagged ``grc.model.gr.Batch`` and run
through ``GRModel`` exactly as the PyTorch reference does: the embedding lookups (memory-mapped tables), the
token projector, and ``GRDense.forward_jagged`` over the step's jagged offsets (``impl="pytorch"`` on CPU, the
Triton kernel on CUDA).

forward returns [tokens, 1 + tasks]: at a request's first row, column 0 holds 1 + its status (0 ok, else an
error code of ``tokens.ERRORS``) and column 1 the offending prompt position; candidate j's scores sit at row
``candidate_start + j``, columns 1..tasks. A bad request never raises (an exception in the worker kills the
engine: EngineDeadError); the pooler returns ``[[-code, position]]`` for it instead of scores.

Weights: ``load_weights`` ignores vLLM's safetensors iterator (it would read every embedding row) and loads
the dense modules with ``grc.weights.load_model`` and the tables with ``open_tables`` from the model folder.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterable, Set
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.model_executor.models.interfaces import IsAttentionFree
from vllm.model_executor.models.interfaces_base import attn_type
from vllm.v1.pool.metadata import PoolingMetadata

from grc.model.gr import GRModel
from grc.model.tables import Tables
from grc.serving.vllm.plugin import tokens as tk
from grc.spec.schema import ModelConfig

log = logging.getLogger("grc.vllm")
STEP_LOG = os.environ.get("GRC_VLLM_STEP_LOG")  # a file: one "requests tokens ms" line per forward (tests, bench)
INTERNAL = 8  # status of every request of a step the model failed on (logged with its traceback)
tk.ERRORS.setdefault(INTERNAL, "the model failed on this step (see the server log)")


class DeviceTables(Tables):
    """Lookups stay on the CPU memory maps; the looked-up rows go to the model's device."""

    device: torch.device = torch.device("cpu")

    def lookup(self, name: str, ids: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        return super().lookup(name, ids.cpu(), dtype).to(self.device)


def _batch_to(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
        elif isinstance(value, dict):
            setattr(batch, name, {k: v.to(device) for k, v in value.items()})
    return batch


def segment_starts(positions: np.ndarray) -> list[int]:
    """First token of each request in the step (positions restart at 0 per request, see the module doc)."""
    starts = np.flatnonzero(positions == 0).tolist()
    return starts if starts and starts[0] == 0 else [0, *starts]


class CandidateScores(Pooler):
    """Per request: its candidates' score rows [c, tasks], or [[-code, position]] when it was refused."""

    def __init__(self, layout: tk.Layout):
        super().__init__()
        self.layout = layout

    def get_supported_tasks(self) -> Set[str]:
        return {"token_classify"}

    def get_pooling_updates(self, task: Any) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)  # the header tells c and where the scores are

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata) -> list[torch.Tensor | None]:
        cursor = pooling_metadata.get_pooling_cursor()
        firsts = cursor.first_token_indices_gpu.tolist()
        lasts = cursor.last_token_indices_gpu.tolist()
        finished = cursor.get_finished_mask()
        status = hidden_states[:, 0].detach().cpu().numpy()
        prompts = pooling_metadata.get_prompt_token_ids_cpu()
        out: list[torch.Tensor | None] = []
        for i, (first, last) in enumerate(zip(firsts, lasts, strict=True)):
            if not finished[i]:  # a partial prefill chunk (chunked prefill is off; kept for safety)
                out.append(None)
                continue
            code, position = int(status[first]) - 1, float(hidden_states[first, 1])
            if code < 0 or (status[first + 1 : last + 1] != 0).any():  # forward saw other boundaries
                code, position = 7, 0.0
            if code:
                out.append(torch.tensor([[-float(code), position]], dtype=torch.float32))
                continue
            ids = prompts[i]
            h, c = int(ids[1]), int(ids[2])
            start = first + self.layout.candidate_start(h)
            out.append(hidden_states[start : start + c, 1:])
        return out


@attn_type("attention_free")
class GrcRankingModel(nn.Module, IsAttentionFree):
    """vLLM model class of a grc bundle (config.json: ``architectures: [GrcRankingModel]``)."""

    is_pooling_model = True
    is_attention_free = True  # no KV cache, no vLLM attention layer: HSTU attention runs inside forward

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf = vllm_config.model_config.hf_config
        self.folder = Path(vllm_config.model_config.model)
        self.cfg = ModelConfig.model_validate(hf.grc_model)
        self.layout = tk.Layout.of(hf.grc_model)
        self.grc = GRModel(self.cfg)
        self.tables: DeviceTables | None = None
        self.tasks = len(self.cfg.tasks)
        self.batch_invariant = bool(getattr(hf, "grc_batch_invariant", False))
        self.pooler = CandidateScores(self.layout)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Required by vLLM's interface; prompt ids are not embeddings of one table here (see tokens.py).
        return torch.zeros(input_ids.shape[0], self.cfg.d_model, device=input_ids.device)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from grc.weights import load_model, open_tables

        device = next(self.grc.parameters()).device
        dtype = next(self.grc.parameters()).dtype
        reference = load_model(self.cfg, self.folder)  # float32, the reference's own loader
        self.grc.load_state_dict(reference.state_dict())
        self.grc.to(device=device, dtype=dtype).eval()
        tables = open_tables(self.cfg, self.folder)
        self.tables = DeviceTables(tables.blocks, tables.vocab, tables.block_rows)
        self.tables.device = device
        log.info("grc: loaded %s from %s (%s, %s)", type(self.grc).__name__, self.folder, device, dtype)
        return {f"grc.{name}" for name, _ in self.grc.named_parameters()}

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        param = next(self.grc.parameters())
        # float32 whatever the model's dtype: status codes and prompt positions must stay exact
        out = torch.zeros(n, 1 + self.tasks, dtype=torch.float32, device=param.device)
        real = n
        if is_forward_context_available():
            pad = get_forward_context().is_padding
            if pad is not None and pad.shape[0] >= n:
                real = int((~pad[:n]).sum())
        if real == 0:
            return out
        ids = input_ids[:real].detach().cpu().numpy().astype(np.int64)
        starts = segment_starts(positions[:real].detach().cpu().numpy())
        ends = [*starts[1:], real]
        decoded: list[tuple[int, tk.Decoded]] = []
        for start, end in zip(starts, ends, strict=True):
            try:
                decoded.append((start, tk.decode(self.layout, ids[start:end])))
                out[start, 0] = 1.0
            except tk.RequestError as exc:
                out[start, 0], out[start, 1] = 1.0 + exc.code, float(exc.position)
            except Exception:  # a decoder bug must not kill the engine either
                log.error("grc: decoding a request failed:\n%s", traceback.format_exc())
                out[start, 0] = 1.0 + INTERNAL
        started = time.perf_counter()
        if decoded:
            try:
                self._score(decoded, out)
            except Exception:  # never let one step kill the engine: its requests are refused instead
                log.error("grc: scoring a step of %d requests failed:\n%s", len(decoded), traceback.format_exc())
                for start, _ in decoded:
                    out[start, 0] = 1.0 + INTERNAL
        if STEP_LOG:
            with open(STEP_LOG, "a") as f:
                f.write(f"{len(starts)} {real} {(time.perf_counter() - started) * 1000:.3f}\n")
        return out

    @torch.inference_mode()
    def _score(self, decoded: list[tuple[int, tk.Decoded]], out: torch.Tensor) -> None:
        assert self.tables is not None, "load_weights has not run"
        param = next(self.grc.parameters())
        impl = "triton" if param.device.type == "cuda" else "pytorch"
        # one jagged batch per step (vLLM's flattened tokens), or one forward per request (batch_invariant)
        groups = [[d] for _, d in decoded] if self.batch_invariant else [[d for _, d in decoded]]
        scores = torch.cat([self.grc(_batch_to(tk.batch_of(g), param.device), self.tables, impl=impl) for g in groups])
        rows = torch.cat(
            [torch.arange(start + d.candidate_start, start + d.candidate_start + len(d.cross)) for start, d in decoded]
        ).to(out.device)
        out[rows, 1:] = scores.to(out.dtype)
