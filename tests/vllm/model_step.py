"""Run in the vLLM venv by test_vllm_model_step.py: the real ``GrcRankingModel`` (vLLM's config of the bundle's
model folder, its own ``load_weights``) scores steps of flattened prompts, as vLLM's model runner calls it.

argv: <bundle>/model, a JSON file of steps (each a list of prompts), the JSON file to write: per step, per prompt
``{"code": status, "position": p}`` for a refused prompt or ``{"scores": [[...]]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from vllm.config import ModelConfig, VllmConfig
from vllm.plugins import load_general_plugins

from grc.serving.vllm.model import GrcRankingModel
from grc.serving.vllm.plugin import tokens as tk


def main(folder: str, steps_file: str, out_file: str) -> None:
    load_general_plugins()  # as vLLM does at start-up: the bundle's plugin registers the grc config and model
    config = ModelConfig(model=folder, runner="pooling", skip_tokenizer_init=True, dtype="float32")
    model = GrcRankingModel(vllm_config=VllmConfig(model_config=config))
    model.load_weights([])
    results = []
    for prompts in json.loads(Path(steps_file).read_text()):
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int32)  # vLLM's ids are int32
        positions = torch.cat([torch.arange(len(p)) for p in prompts])
        out = model(ids, positions).numpy()
        starts = np.cumsum([0, *map(len, prompts)])[:-1]
        step = []
        for start, prompt in zip(starts, prompts, strict=True):
            code = int(out[start, 0]) - 1
            if code:
                step.append({"code": code, "position": float(out[start, 1])})
                continue
            decoded = tk.decode(model.layout, np.asarray(prompt))
            first = start + decoded.candidate_start
            step.append({"scores": out[first : first + len(decoded.cross), 1:].tolist()})
        results.append(step)
    with open(out_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
