"""surgery: exported ONNX -> passes from ``surgery.passes`` -> fused ONNX + report.

The report (``report.json`` + the printed table) has node counts by op type before and after,
each pass's log, and every fusion with the names of the nodes it replaced.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from rich.table import Table

from grc.stages.base import Context, Stage
from grc.stages.export import DATA, MODEL, file_digests

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def node_scopes(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> innermost module path recorded by the torch exporter (e.g. dense.layers.0.attention)."""
    out = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == SCOPE_KEY:
                scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
                modules = [s for s in scopes if (s and "." in s) or s.startswith("dense")]
                out[node.name] = modules[-1] if modules else ""
    return out


def op_counts(graph: gs.Graph) -> dict[str, int]:
    return dict(sorted(Counter(n.op for n in graph.nodes).items()))


def run(ctx: Context) -> dict[str, Any]:
    import onnx
    import onnx_graphsurgeon as gs

    from grc.onnx.surgery.passes import PASSES, PLUGIN_NAMESPACE, PassContext

    spec = ctx.spec
    src = ctx.inputs["export"] / MODEL
    model = onnx.load(str(src))
    graph = gs.import_onnx(model)
    pctx = PassContext(hstu=spec.model.hstu, scopes=node_scopes(model))
    before = op_counts(graph)
    log: dict[str, list[str]] = {}
    for name in spec.surgery.passes:
        changes = PASSES[name](graph, pctx)
        log[name] = changes or ["nothing to change"]
        for line in log[name]:
            ctx.log(f"surgery.{name}: {line}")
    after = op_counts(graph)
    out_model = gs.export_onnx(graph)
    out_model.opset_import.append(onnx.helper.make_opsetid(PLUGIN_NAMESPACE, 1))
    external = (ctx.inputs["export"] / DATA).exists()
    onnx.save_model(
        out_model,
        str(ctx.out / MODEL),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=DATA,
        size_threshold=1024,
    )
    onnx.checker.check_model(str(ctx.out / MODEL))  # custom-domain nodes are checked structurally
    _print_counts(ctx, before, after)
    return {
        "model": MODEL,
        "external_data": DATA if external else None,
        "passes": list(spec.surgery.passes),
        "log": log,
        "fusions": pctx.fusions,
        "op_counts": {"before": before, "after": after},
        "sha256": file_digests(ctx.out, (MODEL, DATA)),
    }


def _print_counts(ctx: Context, before: dict[str, int], after: dict[str, int]) -> None:
    table = Table(title="surgery: nodes by op type", show_edge=False)
    for col in ("op", "before", "after"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for op in sorted(set(before) | set(after)):
        b, a = before.get(op, 0), after.get(op, 0)
        table.add_row(op, str(b), str(a), style="bold" if a != b else None)
    table.add_row("total", str(sum(before.values())), str(sum(after.values())))
    ctx.console.print(table)


STAGE = Stage(
    name="surgery",
    output="surgery",
    reads=("surgery", "model.hstu"),
    inputs=("export",),
    toolkits=("onnx", "onnx-graphsurgeon", "onnxruntime"),
    run=run,
    doc="onnx-graphsurgeon passes: fuse HSTU attention into grc::HSTUAttention, norms, cleanup",
)
