"""verify: the exported and the surgeried ONNX in onnxruntime vs the PyTorch model (float64),
then the ranking gates of every backend against the fp32 model with unquantized weights.

Parity: fresh random requests per spec shape (1 and many users, short and long histories, 1 and
many candidates), through the real embedding tables and projector, so the dense graph sees
realistic tokens; ``verify.export`` / ``verify.surgery`` bound the differences.
Ranking (``verify.ranking``, grc/verify/ranking.py): held-out users with full candidate lists, scored by
each backend from the stored weights (tables as stored: rounded or quantized, dequantized on
lookup) and by the fp32 PyTorch model from the weights' source (grc/weights/reference.py); top-k
overlap, Kendall's tau, mean and max |Δscore| per task. Any figure outside its bound fails the
build with the table of figures; the figures go to the manifest under ``figures`` and ``ranking``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from grc.engine.quantize import quantized_precisions
from grc.errors import StageError
from grc.stages.base import Context, Stage
from grc.stages.export import MODEL

if TYPE_CHECKING:  # torch and onnxruntime load only when the stage runs
    import numpy as np

    from grc.model.gr import GRModel, Tokens
    from grc.model.tables import Tables
    from grc.verify.compare import Figure
    from grc.verify.ranking import RankFigure


def padded_feeds(tok: Tokens) -> dict[str, np.ndarray]:
    import torch

    from grc.model.jagged import lengths_of, to_padded

    lengths = lengths_of(tok.offsets)
    n = int(lengths.max())
    return {
        "tokens": to_padded(tok.tokens, tok.offsets, n).to(torch.float32).numpy(),
        "lengths": lengths.numpy(),
        "num_candidates": tok.num_candidates.numpy(),
        "timestamps": to_padded(tok.timestamps, tok.offsets, n).numpy(),
    }


def reference(model: GRModel, tok: Tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.dense.forward_jagged(tok.tokens, tok.offsets, tok.num_candidates, tok.timestamps).numpy()


def ranking(
    ctx: Context, model: GRModel, tables: Tables, backends: dict[str, Any], dense: dict[str, str] | None = None
) -> list[RankFigure]:
    """Every backend's ranking of held-out users against the fp32 model from the weights' source.
    ``dense``: backend -> what its dense graph computes in, where not the weights' dtype (e.g. the
    quantize stage's int8 Q/DQ graph)."""
    import numpy as np
    import torch

    from grc.model.jagged import to_jagged
    from grc.model.sample import random_batch
    from grc.verify.ranking import Gates, candidate_scores, rank_figures, user_shape
    from grc.weights import read_manifest
    from grc.weights.reference import reference_weights

    cfg, gates = ctx.spec.model, ctx.spec.verify.ranking
    history, candidates = user_shape(cfg, gates.history, gates.candidates)
    batch = random_batch(cfg, gates.users, history, candidates, torch.Generator().manual_seed(gates.seed), exact=True)
    ref_model, ref_tables = reference_weights(cfg, ctx.inputs["weights"])
    with torch.no_grad():
        expected = ref_model(batch, ref_tables).numpy()
        tok = model.projector(batch, tables)
        stored = {"pytorch": model.dense.forward_jagged(tok.tokens, tok.offsets, tok.num_candidates, tok.timestamps)}
    feeds = padded_feeds(tok)
    for name, sess in backends.items():
        (padded,) = sess.run(["scores"], feeds)
        stored[name] = to_jagged(torch.from_numpy(padded), tok.offsets)
    manifest = read_manifest(ctx.inputs["weights"])
    dense_dtype = manifest["source"].get("init", {}).get("dtype", "float32")
    tables_dtype = manifest.get("table_dtype", "?")
    limits = Gates(gates.top_k, gates.min_top_k_overlap, gates.min_kendall_tau, gates.max_mean_abs, gates.max_abs)
    offsets = batch.candidate_offsets.numpy()
    figures = []
    for name, scores in stored.items():
        actual = candidate_scores(scores.to(torch.float64).numpy(), tok.offsets, tok.num_candidates)
        precision = f"tables {tables_dtype}, dense {(dense or {}).get(name, dense_dtype)}"
        figures += rank_figures(name, precision, list(cfg.tasks), actual, np.asarray(expected), offsets, limits)
    return figures


def quantized_graphs(ctx: Context) -> dict[str, tuple[Path, str]]:
    """backend name -> (the quantize stage's Q/DQ graph, what its dense part computes in)."""
    if "quantize" not in ctx.inputs:
        return {}
    entries = ctx.input_manifest("quantize")["precisions"]
    return {
        f"onnxrt-{p}": (ctx.inputs["quantize"] / e["model"], f"{p} Q/DQ (calibration {e['calibration']['digest'][:8]})")
        for p, e in entries.items()
    }


def run(ctx: Context) -> dict[str, Any]:
    import torch

    from grc.model.jagged import to_jagged
    from grc.model.sample import random_batch
    from grc.onnx.ort import session
    from grc.verify.compare import compare, format_figures
    from grc.verify.ranking import format_rank_figures
    from grc.weights import load_model, open_tables

    spec = ctx.spec
    cfg = spec.model
    model = load_model(cfg, ctx.inputs["weights"]).double()
    tables = open_tables(cfg, ctx.inputs["weights"])
    backends = {"export": session(ctx.inputs["export"] / MODEL), "surgery": session(ctx.inputs["surgery"] / MODEL)}
    tolerances = {"export": spec.verify.export, "surgery": spec.verify.surgery}
    gen = torch.Generator().manual_seed(spec.verify.seed)
    figures: list[Figure] = []
    for shape in spec.verify.shapes:
        longest = len(cfg.profile) + shape.history + shape.candidates
        if longest > cfg.hstu.max_seq_len or shape.candidates > cfg.max_candidates:
            raise StageError(
                f"verify.shapes: {shape} exceeds model limits (max_seq_len {cfg.hstu.max_seq_len}, "
                f"max_candidates {cfg.max_candidates})"
            )
        batch = random_batch(cfg, shape.users, shape.history, shape.candidates, gen)
        with torch.no_grad():
            tok = model.projector(batch, tables)
        expected = reference(model, tok)
        feeds = padded_feeds(tok)
        case = f"{shape.users}u x {shape.history}h x {shape.candidates}c"
        for name, sess in backends.items():
            (scores,) = sess.run(["scores"], feeds)
            actual = to_jagged(torch.from_numpy(scores), tok.offsets).numpy()
            figures.append(compare(name, case, "scores", actual, expected, tolerances[name]))
    table = format_figures(figures)
    ctx.console.print(table)
    if not all(f.ok for f in figures):
        raise StageError(f"verify: outputs differ from the PyTorch reference beyond the spec's tolerance:\n{table}")
    quantized = quantized_graphs(ctx)
    ranked = {**backends, **{name: session(path) for name, (path, _) in quantized.items()}}
    dense = {name: label for name, (_, label) in quantized.items()}
    ranks = ranking(ctx, load_model(cfg, ctx.inputs["weights"]), tables, ranked, dense)
    rank_table = format_rank_figures(ranks)
    ctx.console.print(rank_table)
    if not all(f.ok for f in ranks):
        raise StageError(f"verify: ranking gates (verify.ranking) failed against the fp32 model:\n{rank_table}")
    return {
        "figures": [f.as_dict() for f in figures],
        "reference": "PyTorch float64, jagged layout",
        "ranking": {
            "reference": "PyTorch float32 with the weights' source values (seeded init drawn again, or the checkpoint)",
            "gates": spec.verify.ranking.model_dump(),
            "figures": [f.as_dict() for f in ranks],
        },
    }


STAGE = Stage(
    name="verify",
    output="verify",
    reads=("verify", "model"),
    inputs=("weights", "export", "surgery"),
    # the int8 / fp8 graphs engines are built from: scored by the ranking gates in onnxruntime
    optional_inputs=lambda spec: ("quantize",) if quantized_precisions(spec) else (),
    toolkits=("torch", "onnxruntime", "onnxruntime-extensions"),
    run=run,
    doc="onnxruntime (exported and surgeried ONNX) vs PyTorch float64 on fresh random requests; ranking gates",
)
