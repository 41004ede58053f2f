"""quantize: surgeried ONNX -> a calibrated Q/DQ graph per quantized engine precision (int8, fp8).

Runs only when some engine target asks for int8 or fp8. Calibration users: synthetic requests
drawn with ``engine.calibration.seed`` (never verify's or verify.ranking's users), embedded
through the stored tables and projector exactly as verify's users are, so the ranges are those of
real tokens. ModelOpt's ONNX PTQ quantizes the graph on the CPU (grc/engine/quantize.py says why
ModelOpt and how); ``grc::HSTUAttention`` stays an unquantized custom node. Writes
``<precision>/model.onnx`` and the manifest: tool and version, calibration users and their digest
(sha256 of the feed arrays), Q/DQ node counts. verify scores each graph in onnxruntime against the
fp32 model (the ranking gates); the engine stage builds the int8 / fp8 engines from them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grc.build.fingerprint import sha256_file
from grc.engine.quantize import feeds_digest, modelopt_site, quantize, quantized_precisions
from grc.stages.base import Context, Stage

if TYPE_CHECKING:
    import numpy as np

MODEL = "model.onnx"


def calibration_feeds(ctx: Context) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The calibration users as the graph's padded inputs, and what the manifest says of them."""
    import torch

    from grc.model.sample import random_batch
    from grc.stages.verify import padded_feeds
    from grc.verify.ranking import user_shape
    from grc.weights import load_model, open_tables

    cfg, cal = ctx.spec.model, ctx.spec.engine.calibration
    history, candidates = user_shape(cfg, cal.history, cal.candidates)
    batch = random_batch(cfg, cal.users, history, candidates, torch.Generator().manual_seed(cal.seed), exact=True)
    model = load_model(cfg, ctx.inputs["weights"])
    with torch.no_grad():
        feeds = padded_feeds(model.projector(batch, open_tables(cfg, ctx.inputs["weights"])))
    about = {
        "seed": cal.seed,
        "users": cal.users,
        "history": history,
        "candidates": candidates,
        "tokens": "the stored tables and projector (as verify's users)",
        "digest": feeds_digest(feeds),
        "shapes": {k: list(v.shape) for k, v in feeds.items()},
    }
    return feeds, about


def run(ctx: Context) -> dict[str, Any]:
    import numpy as np

    from grc.cache.store import default_dir

    src = ctx.inputs["surgery"] / MODEL
    feeds, about = calibration_feeds(ctx)
    site = modelopt_site(default_dir())
    entries: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="grc-quantize-") as tmp:
        feeds_file = Path(tmp) / "calibration.npz"
        np.savez(feeds_file, **feeds)  # type: ignore[arg-type]
        for precision in quantized_precisions(ctx.spec):
            dst = ctx.out / precision / MODEL
            report = quantize(src, dst, precision, feeds_file, site, Path(tmp) / precision)
            report.pop("ok", None)
            ctx.log(
                f"quantize: {precision}: {report['tool']} {report['version']}, {report['quantize_nodes']} Q/DQ "
                f"pairs ({report['calibration_method']} calibration on {about['users']} users), "
                f"{report['seconds']:.1f}s"
            )
            entries[precision] = {"model": f"{precision}/{MODEL}", **report, "calibration": about}
    return {
        "precisions": entries,
        "source": {"graph": "surgery/model.onnx", "sha256": ctx.input_manifest("surgery").get("sha256", {}).get(MODEL)},
        "sha256": {e["model"]: sha256_file(ctx.out / e["model"]) for e in entries.values()},
    }


STAGE = Stage(
    name="quantize",
    output="quantized",
    reads=("engine.targets", "engine.precision", "engine.calibration", "model"),
    inputs=("weights", "surgery"),
    run=run,
    toolkits=("onnx", "onnxruntime", "onnxruntime-extensions", "torch"),
    code=("grc/engine/quantize_worker.py",),  # run as a subprocess, so the import scan does not see it
    doc="int8 / fp8 Q/DQ graphs for the engines: ModelOpt ONNX PTQ, calibrated on seeded users (CPU)",
    enabled=lambda spec: bool(quantized_precisions(spec)),
)
