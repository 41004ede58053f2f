"""Graph-surgery passes over an onnx-graphsurgeon graph.

Each pass is a small function ``(graph, ctx) -> list[str]`` returning what it did (one line per
change; empty means it found nothing to change, and the stage says so). A pass that recognises
part of a pattern but not the whole raises SurgeryError naming itself and the node, instead of
guessing. Passes run in the order the spec's ``surgery.passes`` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from grc.errors import StageError
from grc.spec.schema import HSTUConfig

PLUGIN_NAMESPACE = "grc"
PLUGIN_VERSION = "1"
ATTENTION_OP = "HSTUAttention"
# HSTUAttention inputs, in order (the ORT custom op and the TensorRT plugin take the same):
ATTENTION_INPUTS = ("q", "k", "v", "lengths", "num_candidates", "timestamps", "pos_w", "ts_w")


class SurgeryError(StageError):
    pass


@dataclass
class PassContext:
    hstu: HSTUConfig
    scopes: dict[str, str]  # node name -> innermost module scope, from the exporter's metadata
    fusions: list[dict[str, Any]] = field(default_factory=list)


Pass = Callable[[gs.Graph, PassContext], list[str]]


def fold_constants(graph: gs.Graph, ctx: PassContext) -> list[str]:
    before = len(graph.nodes)
    graph.fold_constants().cleanup()
    removed = before - len(graph.nodes)
    return [f"folded {removed} constant-only nodes"] if removed else []


def drop_training_ops(graph: gs.Graph, ctx: PassContext) -> list[str]:
    """Dropout and Identity do nothing at inference: reconnect their consumers to their input."""
    done = []
    for node in [n for n in graph.nodes if n.op in ("Dropout", "Identity")]:
        src, dst = node.inputs[0], node.outputs[0]
        for consumer in list(dst.outputs):
            consumer.inputs = [src if t is dst else t for t in consumer.inputs]
        if dst in graph.outputs:
            continue  # a graph output keeps its name: leave the op in place
        node.outputs.clear()
        done.append(f"dropped {node.op} {node.name}")
    graph.cleanup()
    return done


def cleanup(graph: gs.Graph, ctx: PassContext) -> list[str]:
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    removed = before - len(graph.nodes)
    return [f"removed {removed} dead nodes"] if removed else []


# --------------------------------------------------------------------------- layer norm
def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def fuse_layer_norm(graph: gs.Graph, ctx: PassContext) -> list[str]:
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div (+ Mul, Add) -> LayerNormalization."""
    done = []
    for div in [n for n in graph.nodes if n.op == "Div"]:
        sub = _producer(div.inputs[0], "Sub")
        sqrt = _producer(div.inputs[1], "Sqrt")
        if sub is None or sqrt is None:
            continue
        mean = _producer(sub.inputs[1], "ReduceMean")
        add_eps = _producer(sqrt.inputs[0], "Add")
        var = _producer(add_eps.inputs[0], "ReduceMean") if add_eps else None
        pow_ = _producer(var.inputs[0], "Pow") if var else None
        parts = {"ReduceMean(x)": mean, "Add(var, eps)": add_eps, "ReduceMean(d^2)": var, "Pow(d, 2)": pow_}
        missing = [k for k, v in parts.items() if v is None]
        if len(missing) == len(parts):
            continue  # a Sub/Sqrt/Div that is not a layer norm at all
        if missing:
            raise SurgeryError(f"fuse_layer_norm: node {div.name} looks like a layer norm but lacks {missing}")
        assert mean is not None and add_eps is not None and var is not None and pow_ is not None  # none missing
        x = sub.inputs[0]
        eps = float(np.asarray(add_eps.inputs[1].values).reshape(-1)[0])
        out, scale, bias = div.outputs[0], None, None
        mul = out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op == "Mul" else None
        if mul is not None and isinstance(mul.inputs[1], gs.Constant):
            scale, out = mul.inputs[1], mul.outputs[0]
            add = out.outputs[0] if len(out.outputs) == 1 and out.outputs[0].op == "Add" else None
            if add is not None and isinstance(add.inputs[1], gs.Constant):
                bias, out = add.inputs[1], add.outputs[0]
        dim = x.shape[-1] if x.shape else None
        if not isinstance(dim, int):
            raise SurgeryError(f"fuse_layer_norm: node {div.name}: last dim of {x.name} is not static")
        scale = scale or gs.Constant(f"{div.name}.ln_scale", np.ones(dim, np.float32))
        bias = bias or gs.Constant(f"{div.name}.ln_bias", np.zeros(dim, np.float32))
        fused = gs.Node(
            "LayerNormalization", f"{div.name}.layer_norm", {"axis": -1, "epsilon": eps}, [x, scale, bias], [out]
        )
        for node in (mean, sub, pow_, var, add_eps, sqrt, div):
            node.outputs.clear()
        if out is not div.outputs[0]:
            out.inputs.clear()
        out.inputs.append(fused)
        graph.nodes.append(fused)
        done.append(f"fused layer norm at {div.name} (eps {eps:g})")
    graph.cleanup()
    if not done:
        count = sum(n.op == "LayerNormalization" for n in graph.nodes)
        return [] if not count else [f"nothing to fuse: the exporter already emitted {count} LayerNormalization"]
    return done


# --------------------------------------------------------------------------- HSTU attention
_ATTN_SCOPE = re.compile(r"(?:^|\.)layers\.(\d+)\.attention$")


def _const_scalar(node: gs.Node, name: str) -> float:
    consts = [i for i in node.inputs if isinstance(i, gs.Constant)]
    if len(consts) != 1 or np.asarray(consts[0].values).size != 1:
        raise SurgeryError(f"fuse_hstu_attention: {node.op} node {node.name} should scale by one constant ({name})")
    return float(np.asarray(consts[0].values).reshape(-1)[0])


def _only_consumer(tensor: gs.Tensor, op: str, who: str) -> gs.Node:
    users = [n for n in tensor.outputs if n.op == op]
    if len(users) != 1:
        raise SurgeryError(f"fuse_hstu_attention: expected one {op} after {who} ({tensor.name}), found {len(users)}")
    return users[0]


def _ancestors(tensor: gs.Tensor, depth: int) -> set[str]:
    ops: set[str] = set()
    frontier = [tensor]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            for n in t.inputs:
                ops.add(n.op)
                nxt += [i for i in n.inputs if isinstance(i, gs.Variable)]
        frontier = nxt
    return ops


def _bias_tables(nodes: list[gs.Node], cfg: HSTUConfig, layer: str) -> tuple[gs.Constant, gs.Constant]:
    """Find pos_w [H, 2P-1] and ts_w [H, NB], as exported (maybe pre-transposed for a Gather)."""
    found: dict[str, np.ndarray] = {}
    for node in nodes:
        if node.op not in ("Gather", "GatherND", "GatherElements"):
            continue
        data = node.inputs[0]
        if not isinstance(data, gs.Constant):
            continue
        table = np.asarray(data.values)
        if table.ndim != 2 or cfg.num_heads not in table.shape:
            continue
        table = table.T if table.shape[0] != cfg.num_heads else table
        up = _ancestors(node.inputs[1], 6)
        kind = "pos_w" if "Clip" in up else "ts_w" if "ReduceSum" in up else None
        if kind is None:
            raise SurgeryError(
                f"fuse_hstu_attention: layer {layer}: gather {node.name} of a bias table has neither "
                "a clamp (position) nor a bucket count (time) upstream"
            )
        found[kind] = table
    want = {"pos_w": 2 * cfg.position_buckets - 1, "ts_w": cfg.time_buckets}
    for kind, width in want.items():
        if kind not in found:
            raise SurgeryError(f"fuse_hstu_attention: layer {layer}: no {kind} bias gather found in the attention")
        if found[kind].shape != (cfg.num_heads, width):
            raise SurgeryError(
                f"fuse_hstu_attention: layer {layer}: {kind} has shape {found[kind].shape}, "
                f"spec implies {(cfg.num_heads, width)}"
            )
    return (
        gs.Constant(f"layers.{layer}.attention.pos_w", np.ascontiguousarray(found["pos_w"], np.float32)),
        gs.Constant(f"layers.{layer}.attention.ts_w", np.ascontiguousarray(found["ts_w"], np.float32)),
    )


def fuse_hstu_attention(graph: gs.Graph, ctx: PassContext) -> list[str]:
    """QK^T*alpha + rab -> SiLU -> /N -> mask -> @V  =>  one grc::HSTUAttention node per layer."""
    cfg = ctx.hstu
    layers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        match = _ATTN_SCOPE.search(ctx.scopes.get(node.name, ""))
        if match:
            layers.setdefault(match.group(1), []).append(node)
    inputs = {t.name: t for t in graph.inputs}
    done = []
    for layer, nodes in sorted(layers.items(), key=lambda kv: int(kv[0])):
        einsums = [n for n in nodes if n.op == "Einsum"]
        qk = [n for n in einsums if n.attrs.get("equation", "").replace(" ", "") == "bihd,bjhd->bhij"]
        av = [n for n in einsums if n.attrs.get("equation", "").replace(" ", "") == "bhij,bjhd->bihd"]
        if len(qk) != 1 or len(av) != 1:
            names = [n.name for n in einsums]
            raise SurgeryError(
                f"fuse_hstu_attention: layer {layer}: expected one QK^T and one AV Einsum, found {names}"
            )
        scale = _only_consumer(qk[0].outputs[0], "Mul", "QK^T")
        alpha = _const_scalar(scale, "alpha")
        if not np.isclose(alpha, cfg.scale, rtol=1e-6):
            raise SurgeryError(
                f"fuse_hstu_attention: layer {layer}: graph scales QK^T by {alpha}, spec alpha is {cfg.scale}"
            )
        if not any(n.op == "Sigmoid" for n in nodes) or not any(n.op == "Where" for n in nodes):
            raise SurgeryError(
                f"fuse_hstu_attention: layer {layer}: no SiLU (Sigmoid) or mask (Where) in the attention"
            )
        divs = [n for n in nodes if n.op == "Div"]
        norm = _const_scalar(divs[0], "N") if len(divs) == 1 else None
        if norm is None or not np.isclose(norm, cfg.max_seq_len):
            raise SurgeryError(f"fuse_hstu_attention: layer {layer}: expected one division by N={cfg.max_seq_len}")
        pos_w, ts_w = _bias_tables(nodes, cfg, layer)
        q, k = qk[0].inputs
        v = av[0].inputs[1]
        out = av[0].outputs[0]
        missing = [n for n in ("lengths", "num_candidates", "timestamps") if n not in inputs]
        if missing:
            raise SurgeryError(f"fuse_hstu_attention: graph inputs {missing} not found")
        attrs = {
            "num_heads": cfg.num_heads,
            "head_dim_qk": cfg.head_qk,
            "head_dim_v": cfg.head_v,
            "alpha": float(alpha),
            "norm": float(norm),
            "causal": int(cfg.history_mask == "causal"),
            "position_buckets": cfg.position_buckets,
            "time_buckets": cfg.time_buckets,
            "plugin_version": PLUGIN_VERSION,
            "plugin_namespace": PLUGIN_NAMESPACE,
        }
        fused = gs.Node(
            ATTENTION_OP,
            f"layers.{layer}.HSTUAttention",
            attrs,
            [q, k, v, inputs["lengths"], inputs["num_candidates"], inputs["timestamps"], pos_w, ts_w],
            [out],
            domain=PLUGIN_NAMESPACE,
        )
        av[0].outputs.clear()
        graph.nodes.append(fused)
        before = {n.name for n in graph.nodes}
        graph.cleanup(remove_unused_graph_inputs=False)
        replaced = sorted(before - {n.name for n in graph.nodes})
        ctx.fusions.append(
            {
                "pass": "fuse_hstu_attention",
                "layer": int(layer),
                "node": fused.name,
                "replaced": replaced,
                "attrs": {k: v for k, v in attrs.items() if "plugin" not in k},
            }
        )
        done.append(f"layer {layer}: {len(replaced)} nodes -> {fused.name} (alpha {alpha:g}, N {norm:g})")
    graph.toposort()
    return done


PASSES: dict[str, Pass] = {
    "fold_constants": fold_constants,
    "fuse_hstu_attention": fuse_hstu_attention,
    "fuse_layer_norm": fuse_layer_norm,
    "drop_training_ops": drop_training_ops,
    "cleanup": cleanup,
}
