"""``grc inspect targets [SPEC]``: every compiled artifact of a built spec and where it runs.

One row per TensorRT engine target (engine stage) and per AOTInductor target (aoti stage): GPU,
compute capability, precision, toolkit, built or skipped (with the reason), parity, whether this
host can run it, and how the Triton bundle serves it (``cc_model_filenames`` by compute
capability, ``--model-config-name <target>`` where GPUs share one, the ``dense_aoti`` model, or the fused
models of bundles.triton.pipeline: fused), or that it does not. Read from the stages' manifests and the
bundle's configs; nothing is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NOT_SERVED = "not served (bundles.triton.backend)"


def _targets(root: Path, stage: str) -> list[dict[str, Any]]:
    """The ``targets`` entries of a stage's manifest (none when the stage has not run)."""
    from grc.stages import stage_named
    from grc.stages.base import MANIFEST

    path = root / stage_named(stage).output / MANIFEST
    return list(json.loads(path.read_text())["targets"]) if path.is_file() else []


def _config(repo: Path, backend: str) -> Any:
    """The bundle's config of the dense step serving ``backend``, or None."""
    from grc.serving.triton.bundle import DENSE
    from grc.serving.triton.model_config import CONFIG_FILENAME, load_config

    model = repo / DENSE[backend]
    return load_config(model) if (model / CONFIG_FILENAME).is_file() else None


def _package_servers(repo: Path) -> list[tuple[str, dict[str, str]]]:
    """(model, its packages: cpu / gpu -> path) of every model of the bundle that serves AOTInductor packages:
    ``dense_aoti`` in the ensemble pipeline, each fused model running aotinductor in the fused one."""
    from grc.serving.triton.model_config import CONFIG_FILENAME, load_config

    out: list[tuple[str, dict[str, str]]] = []
    models = sorted(p for p in repo.iterdir() if (p / CONFIG_FILENAME).is_file()) if repo.is_dir() else []
    for model in models:
        params = load_config(model).parameters
        if "packages" in params:
            out.append((model.name, json.loads(params["packages"].string_value)))
    return out


def target_rows(root: Path) -> list[dict[str, Any]]:
    from grc.engine.toolkits import local_gpus
    from grc.serving.triton.bundle import DENSE, MODEL_REPOSITORY
    from grc.serving.triton.model_config import CUSTOM_CONFIGS
    from grc.stages import stage_named

    here = {g.sm for g in local_gpus()}
    repo = root / stage_named("triton").output / MODEL_REPOSITORY
    trt = _config(repo, "tensorrt_plan")
    served_cc = {int(cc.replace(".", "")) for cc in trt.cc_model_filenames} if trt else set()
    pinned = {p.stem for p in (repo / DENSE["tensorrt_plan"] / CUSTOM_CONFIGS).glob("*.pbtxt")}
    servers = _package_servers(repo)
    rows = []
    for e in _targets(root, "engine"):
        built = e["status"] == "built"
        if not built:
            served = "-"
        elif e["name"] in pinned:
            served = f"{DENSE['tensorrt_plan']} --model-config-name={e['name']}"
        elif e["sm"] in served_cc:
            served = f"{DENSE['tensorrt_plan']} on cc {e['sm'] // 10}.{e['sm'] % 10}"
        else:
            served = NOT_SERVED
        rows.append({"artifact": "tensorrt", "target": e["name"], "gpu": e.get("gpu") or "-", "sm": e["sm"],
                     "precision": e["precision"], "status": e["status"],
                     "toolkit": f"{e['toolkit']} {e['toolkit_version']}" if built else "-",
                     "parity": e["parity"] if built else "-", "runs_here": e["sm"] in here,
                     "triton": served, "file": f"{stage_named('engine').output}/{e['plan']}" if built else None,
                     "reason": None if built else e["reason"]})  # fmt: skip
    for e in _targets(root, "aoti"):
        built = e["status"] == "built"
        kind = "cpu" if e["name"] == "cpu" else "gpu"
        if not built:
            served = "-"
        else:
            kind_name = "KIND_CPU" if kind == "cpu" else "KIND_GPU"
            by = [name for name, packages in servers if packages.get(kind) == e["package"]]
            served = ", ".join(f"{name} {kind_name}" for name in by) or NOT_SERVED
        rows.append({"artifact": "aotinductor", "target": e["name"], "gpu": e.get("gpu") or e.get("device", "-"),
                     "sm": e.get("sm"), "precision": e["dtype"], "status": e["status"],
                     "toolkit": "aotinductor" if built else "-", "parity": e.get("parity", "-"),
                     "runs_here": kind == "cpu" or e.get("sm") in here, "triton": served,
                     "file": f"{stage_named('aoti').output}/{e['package']}" if built else None,
                     "reason": None if built else e["reason"]})  # fmt: skip
    return rows


def print_targets(rows: list[dict[str, Any]], root: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"compiled targets of {root}", show_edge=False)
    for col in ("artifact", "target", "gpu", "sm", "precision", "toolkit", "status", "parity", "here", "Triton"):
        table.add_column(col)
    for r in rows:
        cells = (
            r["artifact"],
            r["target"],
            str(r["gpu"]),
            f"sm{r['sm']}" if r["sm"] else "-",
            r["precision"],
            r["toolkit"],
            r["status"],
            r["parity"],
            "yes" if r["runs_here"] else "no",
            r["triton"],
        )
        table.add_row(*(Text(c) for c in cells))  # names and reasons are text, not rich markup
    console = Console(width=max(Console().width, 150))  # a table this wide is unreadable folded to 80 columns
    console.print(table)
    for r in rows:
        if r["reason"]:
            console.print(Text(f"{r['artifact']} {r['target']} skipped: {r['reason']}", style="dim"))
