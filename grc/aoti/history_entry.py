"""The history cache's two entry points as AOTInductor packages: prefill and score, one user each.

    prefill(tokens [n, D], timestamps [n])
        -> keys [layers, n, H, Dqk], values [layers, n, H, Dv]
    score(tokens [m, D], timestamps [m], num_candidates [1], past_keys [layers, c, H, Dqk],
          past_values [layers, c, H, Dv], past_timestamps [c])
        -> scores [m, tasks] (zero except the last num_candidates rows), keys, values of the m new rows

They compute what ``GRDense.prefill`` / ``GRDense.score`` compute (the same layers' ``forward_cached``
with impl "triton": one ``grc.hstu_attention_cached`` node per layer), with shapes that
``torch.export`` can keep symbolic: the one user's offsets are built from the token counts, its
candidates are a mask rather than a selection, and the cached timestamps come as their own input (a
derived dimension cannot be the sum of two). What stays with the caller, as in ``GRDense.score``:
the cache's timestamps as the request stamps them (``UserKV.timestamps_at(now)``), after
``UserKV.reusable_at(now)`` said yes. ``check`` compares a compiled pair with GRDense in float64.
The aoti stage builds them beside each target's package with ``engine.aoti.history_entries``
(``build_checked``: compile, parity, the manifest's record); the served cache does not run them yet.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grc.model.gr import GRDense, token_groups

PREFILL, SCORE = "prefill", "score"


class Score(nn.Module):
    """One user's new rows against its cached ones; shapes only, no host reads."""

    def __init__(self, dense: GRDense):
        super().__init__()
        self.dense = dense

    def forward(
        self,
        tokens: torch.Tensor,
        timestamps: torch.Tensor,
        num_candidates: torch.Tensor,
        past_keys: torch.Tensor,
        past_values: torch.Tensor,
        past_timestamps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dense = self.dense
        cached, new = past_keys.shape[1], tokens.shape[0]
        device = tokens.device
        idx = torch.arange(new, device=device) + cached  # absolute positions of the new rows
        n_ctx = (cached + new) - num_candidates  # [1]
        group = token_groups(dense.cfg, idx, n_ctx)
        q_offsets = torch.arange(2, device=device) * new  # [0, new]
        kv_offsets = torch.arange(2, device=device) * (cached + new)
        kv_timestamps = torch.cat([past_timestamps, timestamps])
        x, keys, values = tokens, [], []
        for index, layer in enumerate(dense.hstu_layers):
            past = [(past_keys[index], past_values[index])]
            x, k, v = layer.forward_cached(
                x, group, past, q_offsets, kv_offsets, kv_timestamps, num_candidates, "triton", bounds=[0, new]
            )
            keys.append(k)
            values.append(v)
        scores = dense.heads(dense.final_norm(x, group)) * (idx >= n_ctx).unsqueeze(-1).to(x.dtype)
        return scores, torch.stack(keys), torch.stack(values)


class Prefill(Score):
    """The score step on an empty cache with no candidates: every layer's K/V of the tokens."""

    def forward(self, tokens: torch.Tensor, timestamps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h = self.dense.cfg.hstu
        empty_k = tokens.new_zeros((h.num_layers, 0, h.num_heads, h.head_qk))
        empty_v = tokens.new_zeros((h.num_layers, 0, h.num_heads, h.head_v))
        none = torch.zeros(1, dtype=torch.int64, device=tokens.device)
        _, keys, values = super().forward(tokens, timestamps, none, empty_k, empty_v, timestamps[:0])
        return keys, values


def sample_inputs(
    dense: GRDense, cached: int, new: int, candidates: int, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs of both entry points for one user: ``cached`` tokens to prefill (profile +
    history), then ``new`` rows of which the last ``candidates`` are candidates."""
    cfg = dense.cfg
    gen = torch.Generator().manual_seed(seed)
    now = 1_750_000_000
    total = cached + new
    tokens = torch.randn(total, cfg.d_model, generator=gen)
    history = total - candidates
    gaps = (2.0 ** (torch.rand(history, generator=gen) * 21)).to(torch.int64).sort(descending=True).values
    stamps = torch.cat([now - gaps, torch.full((candidates,), now)])
    stamps[: len(cfg.profile)] = now  # profile tokens carry the request time
    tokens, stamps = tokens.to(device, dtype), stamps.to(device)
    return {
        PREFILL: {"tokens": tokens[:cached], "timestamps": stamps[:cached]},
        SCORE: {
            "tokens": tokens[cached:],
            "timestamps": stamps[cached:],
            "num_candidates": torch.tensor([candidates], device=device),
            "past_timestamps": stamps[:cached],
        },
    }


def export_programs(dense: GRDense, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``torch.export`` of both entry points (dense cast to ``dtype`` on ``device``), token and
    cache lengths dynamic (2 .. max_seq_len)."""
    model = copy.deepcopy(dense).to(device=device, dtype=dtype).eval()
    top = model.cfg.hstu.max_seq_len
    rows, cached = torch.export.Dim("rows", min=2, max=top), torch.export.Dim("cached", min=2, max=top)
    sample = sample_inputs(model, 7, 5, 2, device, dtype, seed=0)
    with torch.no_grad():
        keys, values = Prefill(model)(**sample[PREFILL])
        prefill = torch.export.export(
            Prefill(model),
            (),
            sample[PREFILL],
            dynamic_shapes={"tokens": {0: rows}, "timestamps": {0: rows}},
            strict=False,
        )
        score = torch.export.export(
            Score(model),
            (),
            {**sample[SCORE], "past_keys": keys, "past_values": values},
            dynamic_shapes={
                "tokens": {0: rows},
                "timestamps": {0: rows},
                "num_candidates": None,
                "past_keys": {1: cached},
                "past_values": {1: cached},
                "past_timestamps": {0: cached},
            },
            strict=False,
        )
    return {PREFILL: prefill, SCORE: score}


def build(dense: GRDense, out: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Path]:
    """prefill.pt2 and score.pt2 in ``out`` (AOTInductor, through the aoti stage's compile step)."""
    from grc.aoti.build import compile_package

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, program in export_programs(dense, device, dtype).items():
        paths[name] = out / f"{name}.pt2"
        compile_package(program, paths[name], {"grc_entry": name, "dtype": str(dtype).removeprefix("torch.")})
    return paths


def check(
    packages: dict[str, Path], dense: GRDense, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, float]:
    """Relative errors (||x - ref|| / ||ref||) of the packages vs ``GRDense.prefill`` / ``score`` in
    float64 with the reference ops, on one fresh random user (cached prefix and new rows long
    enough to cross the kernels' blocks), the inputs rounded to ``dtype`` for both."""
    import kernels  # noqa: F401  registers torch.ops.grc.* (the CPU packages call them)

    index = device.index if device.index is not None else (0 if device.type == "cuda" else -1)
    run = {k: torch._inductor.aoti_load_package(str(p), device_index=index) for k, p in packages.items()}
    dense64 = copy.deepcopy(dense).to("cpu", torch.float64).eval()
    top = dense.cfg.hstu.max_seq_len
    candidates = min(dense.cfg.max_candidates, 9, top // 4)
    cached = min(70, top - candidates - 13)
    x = sample_inputs(dense, cached, 13 + candidates, candidates, device, dtype, seed)
    profile = len(dense.cfg.profile)
    now = int(x[SCORE]["timestamps"][-1])
    with torch.no_grad():
        keys, values = run[PREFILL](**x[PREFILL])
        scores, new_k, new_v = run[SCORE](**x[SCORE], past_keys=keys, past_values=values)
        cache = dense64.prefill(
            x[PREFILL]["tokens"].cpu().double(), x[PREFILL]["timestamps"].cpu(), profile, now, "pytorch"
        )
        s = x[SCORE]
        ref, (grown,) = dense64.score(
            [cache],
            s["tokens"].cpu().double(),
            torch.tensor([0, s["tokens"].shape[0]]),
            s["num_candidates"].cpu(),
            s["timestamps"].cpu(),
            [now],
            "pytorch",
        )

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        got, want = got.detach().cpu().double(), want.double()
        return float((got - want).norm() / want.norm())

    return {
        "prefill_keys": rel(keys, torch.stack(cache.keys)),
        "prefill_values": rel(values, torch.stack(cache.values)),
        "scores": rel(scores[-candidates:], ref),
        "score_keys": rel(torch.cat([keys, new_k], 1)[:, : grown.length], torch.stack(grown.keys)),
        "score_values": rel(torch.cat([values, new_v], 1)[:, : grown.length], torch.stack(grown.values)),
    }


FOLDER = "history"  # <target>/history/{prefill,score}.pt2


def build_checked(
    dense: GRDense,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    max_rel: float,
    seed: int,
    log: Any = print,
) -> dict[str, Any]:
    """Both packages into ``folder``/history, then ``check`` on a fresh user: every relative error (norm of the
    difference over the reference's) within ``max_rel`` or a StageError naming the worst. -> the manifest's record
    (package paths relative to ``folder``, their sha256, the errors)."""
    from grc.build.fingerprint import sha256_file
    from grc.errors import StageError

    log(f"aoti: {folder.name}: the history cache's prefill and score entry points (two more compiles)")
    paths = build(dense, folder / FOLDER, device, dtype)
    errors = check(paths, dense, device, dtype, seed)
    worst = max(errors, key=lambda k: errors[k])
    figures = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    if errors[worst] > max_rel:
        raise StageError(
            f"aoti: {folder.name}: the history entry points differ from GRDense.prefill / score in float64 beyond "
            f"the tolerance: {worst} relative error {errors[worst]:.3e} > {max_rel:.1e} ({figures})"
        )
    log(f"aoti: {folder.name}: history entry points within {max_rel:.1e} of float64 ({figures})")
    return {
        "packages": {name: f"{folder.name}/{FOLDER}/{path.name}" for name, path in paths.items()},
        "sha256": {f"{folder.name}/{FOLDER}/{path.name}": sha256_file(path) for path in paths.values()},
        "parity": {"reference": "GRDense.prefill / score, PyTorch float64", "relative_errors": errors,
                   "max_rel": max_rel},
        "served": False,  # the served cache runs ScoreGraphs / GRDense.score, not these packages
    }  # fmt: skip
