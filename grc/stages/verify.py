"""verify: the exported and the surgeried ONNX in onnxruntime vs the PyTorch model (float64).

Fresh random requests per spec shape (1 and many users, short and long histories, 1 and many
candidates), through the real embedding tables and projector, so the dense graph sees realistic
tokens. Tolerances come from the spec's ``verify`` section; any figure over them fails the build
with the table of figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from grc.errors import StageError
from grc.stages.base import Context, Stage
from grc.stages.export import MODEL

if TYPE_CHECKING:  # torch and onnxruntime load only when the stage runs
    import numpy as np

    from grc.compare import Figure
    from grc.model.gr import GRModel, Tokens


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


def run(ctx: Context) -> dict[str, Any]:
    import torch

    from grc.compare import compare, format_figures
    from grc.model.jagged import to_jagged
    from grc.model.sample import random_batch
    from grc.runtime.ort import session
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
    return {"figures": [f.as_dict() for f in figures], "reference": "PyTorch float64, jagged layout"}


STAGE = Stage(
    name="verify",
    output="verify",
    reads=("verify", "model"),
    inputs=("weights", "export", "surgery"),
    toolkits=("torch", "onnxruntime", "onnxruntime-extensions"),
    run=run,
    doc="onnxruntime (exported and surgeried ONNX) vs PyTorch float64 on fresh random requests",
)
