"""``grc inspect engine <file>`` and ``grc inspect targets [SPEC]``.

``engine``: layers, I/O bindings and optimization profiles of a plan.

On a host with a GPU the plan targets, the toolkit's engine inspector reads the plan itself (plans
are built with ``profiling_verbosity=DETAILED``, so every layer is listed). Without one, nothing
can deserialize a plan (it needs a CUDA driver), so the command says so and shows what the plan
file and the build-time ``metadata.json`` beside it tell: toolkit, SMs, profiles, I/O, the network
layers the builder was given, and the plugin layers found in the plan bytes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from grc.cli.common import DEFAULT_SPEC, ArtifactsOpt, JsonOpt, SpecArg, guard, load, root_of
from grc.errors import GrcError

app = typer.Typer(
    name="inspect",
    no_args_is_help=True,
    help="Inspect built artifacts: engine plans, and which compiled target runs where.",
)


def _plugin_library(plan: Path, metadata: dict[str, Any]) -> Path | None:
    rel = metadata.get("plugin_library", {}).get("file")
    if not rel:
        return None
    candidate = plan.parent.parent.parent / rel  # <artifacts>/<spec>/engines/<target>/model.plan
    return candidate if candidate.exists() else None


def _gpu_inspect(plan: Path, metadata: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(inspector result, note); the result is None where no GPU / toolkit can open the plan."""
    from grc.engine.toolkits import installed, local_gpus
    from grc.stages.engine import run_worker

    sms = metadata.get("target_sms", [])
    gpus = [g for g in local_gpus() if not sms or g.sm in sms]
    if not gpus:
        have = ", ".join(f"{g.name} (sm{g.sm})" for g in local_gpus()) or "no GPU"
        return None, (
            f"the engine inspector needs a GPU the plan targets (sm{'/'.join(map(str, sms)) or '?'}) to "
            f"deserialize it; this host has {have}. Showing the plan file and its build metadata."
        )
    toolkit = installed().get(metadata.get("toolkit", {}).get("name", ""))
    if toolkit is None:
        return None, f"{metadata.get('toolkit', {}).get('name')} is not installed here; showing build metadata"
    with tempfile.TemporaryDirectory(prefix="grc-inspect-") as tmp:
        library = _plugin_library(plan, metadata)
        result = run_worker(
            "inspect", {"plan": str(plan), "plugin_library": str(library) if library else None}, toolkit, Path(tmp)
        )
    if not result.get("ok"):
        return None, f"the engine inspector failed ({result.get('error')}); showing build metadata"
    return result, f"engine inspector of {toolkit.label} on {gpus[0].name}"


def describe_engine(path: Path) -> dict[str, Any]:
    from grc.engine import plan as plan_file

    plan = path / "model.plan" if path.is_dir() else path
    if not plan.exists():
        raise GrcError(f"inspect engine: {plan} does not exist")
    meta_path = plan.parent / "metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    report_path = plan.parent / metadata.get("build_report", "build-report.json")
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    inspected, note = _gpu_inspect(plan, metadata)
    return {
        "plan": str(plan),
        "note": note,
        "inspector": inspected,
        "plan_file": plan_file.describe(plan.read_bytes()),
        "metadata": metadata or None,
        "build_report": report,
    }


def _print(info: dict[str, Any], limit: int) -> None:
    meta = info["metadata"] or {}
    pf = info["plan_file"]
    print(f"{info['plan']}  ({pf['bytes']:,} bytes)")
    print(f"note: {info['note']}")
    if meta:
        tk = meta["toolkit"]
        seconds = (info.get("build_report") or {}).get("build_seconds", "?")
        print(
            f"toolkit: {tk['name']} {tk['version']}   target: {meta['target']['name']} sm{meta['target']['sm']}   "
            f"precision: {meta['precision']}   build: {seconds}s"
        )
    if "target_sms" in pf:
        print(f"plan SM mask: 0x{pf['sm_mask']:02x} -> {', '.join(f'sm{s}' for s in pf['target_sms'])}")
    print(f"plugin layers in the plan: {', '.join(pf['custom_layers']) or 'none found'}")
    inspected = info["inspector"]
    io = (
        inspected["io"]
        if inspected
        else [
            {"name": t["name"], "mode": mode, "dtype": t["dtype"], "shape": t["shape"]}
            for mode, key in (("INPUT", "inputs"), ("OUTPUT", "outputs"))
            for t in meta.get("io", {}).get(key, [])
        ]
    )
    print("\nI/O bindings:")
    for t in io:
        print(f"  {t['mode']:<6} {t['name']:<16} {t['dtype']:<8} {t['shape']}")
    print("\noptimization profiles (min / opt / max):")
    if inspected:
        for t in (t for t in io if t.get("profiles")):
            for k, shapes in enumerate(t["profiles"]):
                print(f"  [{k}] {t['name']:<16} {' / '.join(map(str, shapes))}")
    for k, p in enumerate(meta.get("profiles", []) if not inspected else []):
        print(f"  [{k}] users {p['users']}  tokens {p['tokens']}")
    if inspected:
        layers = inspected["layers"].get("Layers", [])
        rows = [
            (
                lay.get("Name", "?") if isinstance(lay, dict) else str(lay),
                lay.get("LayerType", "") if isinstance(lay, dict) else "",
            )
            for lay in layers
        ]
        title = f"\nengine layers ({len(rows)}, from the inspector):"
    else:
        rows = [(r["name"], r["type"]) for r in meta.get("network_layers", [])]
        title = f"\nnetwork layers given to the builder ({len(rows)}, from metadata.json; the plan fuses them):"
    print(title)
    for name, kind in rows[: limit or None]:
        print(f"  {kind:<20} {name}")
    if limit and len(rows) > limit:
        print(f"  ... {len(rows) - limit} more (--layers 0 prints all)")


@app.command()
@guard
def engine(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="model.plan, or the engine folder holding it", show_default=False)
    ],
    as_json: JsonOpt = False,
    layers: Annotated[int, typer.Option("--layers", help="layers to print (0: all)")] = 40,
) -> None:
    """Layers, I/O bindings and optimization profiles of a TensorRT plan.

    The engine inspector reads the plan on a GPU it targets; elsewhere the plan file and its build
    metadata tell what they can.

    \b
    Examples:
      grc inspect engine artifacts/hstu-tiny/engines/sm80
      grc inspect engine artifacts/hstu-tiny/engines/sm89/model.plan --layers 0 --json
    """
    info = describe_engine(file)
    if as_json:
        print(json.dumps(info, indent=1))
    else:
        _print(info, layers)


@app.command()
@guard
def targets(
    spec: SpecArg = DEFAULT_SPEC, artifacts: ArtifactsOpt = Path("artifacts"), as_json: JsonOpt = False
) -> None:
    """Every compiled artifact of a built spec (TensorRT engines, AOTInductor packages): GPU, SM,
    precision, toolkit, built or skipped and why, parity, whether this host can run it, and how the
    Triton bundle selects it.

    \b
    Examples:
      grc inspect targets specs/hstu-tiny.yaml
      grc inspect targets specs/mtgr-small.yaml --json
    """
    from grc.cli.targets import print_targets, target_rows

    root = root_of(artifacts, load(spec))
    rows = target_rows(root)
    if not rows:
        raise GrcError(
            f"inspect targets: no engine or aoti stage output under {root}: set engine.targets or "
            f"engine.aoti in {spec} and build it (grc build {spec})"
        )
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        print_targets(rows, root)
