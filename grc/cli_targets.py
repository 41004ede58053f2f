"""``grc inspect targets [SPEC]``: every compiled artifact of a built spec and where it runs.

One row per TensorRT engine target (engine stage) and per AOTInductor target (aoti stage): GPU,
compute capability, precision, toolkit, built or skipped (with the reason), parity, whether this
host can run it, and how the Triton bundle serves it (``cc_model_filenames`` by compute
capability, ``--model-config-name <target>`` where GPUs share one, the ``dense_aoti`` model), or
that it does not. Read from the stages' manifests and the bundle's configs; nothing is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
NOT_SERVED = "not served (bundles.triton.backend)"


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _triton_trt(repo: Path) -> tuple[dict[int, str], set[str]]:
    """(SM -> plan file in cc_model_filenames, targets with a configs/<target>.pbtxt) of dense_trt."""
    from grc.serving.model_config import load_config

    model = repo / "dense_trt"
    if not (model / "config.pbtxt").is_file():
        return {}, set()
    by_cc = {int(cc.replace(".", "")): plan for cc, plan in load_config(model).cc_model_filenames.items()}
    return by_cc, {p.stem for p in (model / "configs").glob("*.pbtxt")}


def _triton_aoti(repo: Path) -> dict[str, str]:
    """cpu / gpu -> package path of dense_aoti."""
    from grc.serving.model_config import load_config

    model = repo / "dense_aoti"
    if not (model / "config.pbtxt").is_file():
        return {}
    return dict(json.loads(load_config(model).parameters["packages"].string_value))


def target_rows(root: Path) -> list[dict[str, Any]]:
    from grc.engine.toolkits import local_gpus
    from grc.serving.bundle import MODEL_REPOSITORY

    here = {g.sm for g in local_gpus()}
    repo = root / "triton" / MODEL_REPOSITORY
    by_cc, pinned = _triton_trt(repo)
    packages = _triton_aoti(repo)
    rows = []
    for e in (_read(root / "engines" / MANIFEST) or {}).get("targets", []):
        built = e["status"] == "built"
        if not built:
            served = "-"
        elif e["name"] in pinned:
            served = f"dense_trt --model-config-name={e['name']}"
        elif by_cc.get(e["sm"]) == f"model.sm{e['sm']}.plan":
            served = f"dense_trt on cc {e['sm'] // 10}.{e['sm'] % 10}"
        else:
            served = NOT_SERVED
        rows.append({"artifact": "tensorrt", "target": e["name"], "gpu": e.get("gpu") or "-", "sm": e["sm"],
                     "precision": e["precision"], "status": e["status"],
                     "toolkit": f"{e['toolkit']} {e['toolkit_version']}" if built else "-",
                     "parity": e["parity"] if built else "-", "runs_here": e["sm"] in here,
                     "triton": served, "file": f"engines/{e['plan']}" if built else None,
                     "reason": None if built else e["reason"]})  # fmt: skip
    for e in (_read(root / "engines-aoti" / MANIFEST) or {}).get("targets", []):
        built = e["status"] == "built"
        kind = "cpu" if e["name"] == "cpu" else "gpu"
        served = f"dense_aoti {'KIND_CPU' if kind == 'cpu' else 'KIND_GPU'}" if packages.get(kind) == \
            f"{e['name']}/model.pt2" else ("-" if not built else NOT_SERVED)
        rows.append({"artifact": "aotinductor", "target": e["name"], "gpu": e.get("gpu") or e.get("device", "-"),
                     "sm": e.get("sm"), "precision": e["dtype"], "status": e["status"],
                     "toolkit": "aotinductor" if built else "-", "parity": e.get("parity", "-"),
                     "runs_here": kind == "cpu" or e.get("sm") in here, "triton": served,
                     "file": f"engines-aoti/{e['package']}" if built else None,
                     "reason": None if built else e["reason"]})  # fmt: skip
    return rows


def print_targets(rows: list[dict[str, Any]], root: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compiled targets of {root}", show_edge=False)
    for col in ("artifact", "target", "gpu", "sm", "precision", "toolkit", "status", "parity", "here", "Triton"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["artifact"], r["target"], str(r["gpu"]), f"sm{r['sm']}" if r["sm"] else "-", r["precision"],
                      r["toolkit"], r["status"], r["parity"], "yes" if r["runs_here"] else "no", r["triton"])
    console = Console(width=max(Console().width, 150))  # a table this wide is unreadable folded to 80 columns
    console.print(table)
    for r in rows:
        if r["reason"]:
            console.print(f"[dim]{r['artifact']} {r['target']} skipped: {r['reason']}[/]")
