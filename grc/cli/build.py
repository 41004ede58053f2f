"""The spec commands: validate, show, build, plan, graph, clean, schema. Each is a thin shell over
a grc module (spec loader, build runner, stage graph); errors the user can fix raise ``GrcError``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

import typer

from grc.cli.common import DEFAULT_SPEC, ArtifactsOpt, JsonOpt, SpecArg, guard, load, root_of

DEFAULT_WAIT = 600.0
# --format dot / mermaid: (header, node line, edge line, footer); mermaid ids are names with "-" -> "_"
GRAPH_FORMATS = {
    "dot": (
        "digraph grc {\n  rankdir=LR;",
        '  "{name}" [label="{name}\\nreads: {reads}"];',
        '  "{src}" -> "{dst}";',
        "}",
    ),
    "mermaid": ("graph LR", '  {id}["{name}<br/>reads: {reads}"]', "  {src_id} --> {dst_id}", ""),
}


def _seconds(value: float) -> float:
    """--wait: a finite number of seconds, 0 or more (nan or inf would wait for ever)."""
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"{value} is not a number of seconds (give 0 or more, finite)")
    return value


def _wait_option(what: str) -> object:
    return typer.Option(
        "--wait",
        callback=_seconds,
        metavar="SECONDS",
        help=f"seconds to wait for a build of the same spec that holds its lock{what}",
    )


def validate(spec: SpecArg = DEFAULT_SPEC) -> None:
    """Check a spec: exit 0, or exit 2 with one `file:line: field: message` line per problem.

    \b
    Examples:
      grc validate specs/mtgr-small.yaml
    """
    loaded = load(spec)
    files = " <- ".join(str(p.name) for p in reversed(loaded.files))
    print(f"{spec}: ok ({loaded.spec.model.kind}, {files})")


def show(spec: SpecArg = DEFAULT_SPEC) -> None:
    """Print the resolved spec (extends applied, defaults filled) and its parameter table.

    \b
    Examples:
      grc show specs/mtgr-large.yaml
    """
    import yaml
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from grc.build.budget import size, stage_bytes
    from grc.model.params import TABLE_PRECISIONS, parameter_bytes, parameter_summary

    loaded = load(spec)
    console = Console()
    console.print(yaml.safe_dump(loaded.spec.model_dump(mode="json"), sort_keys=False), end="", markup=False)
    rows = parameter_summary(loaded.spec.model)
    # names are text, not rich markup; int8 / fp8 quantize tables only, dense stays float32 there
    table = Table(title=Text(f"parameters of {loaded.spec.name}, and bytes stored per table precision"))
    columns = [("group", "left"), ("kind", "left"), ("parameters", "right"), *((p, "right") for p in TABLE_PRECISIONS)]
    for col, justify in columns:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def add(label: str, kind: str, count: int, per: dict[str, int]) -> None:
        table.add_row(Text(label), kind, f"{count:,}", *(size(b) for b in per.values()))

    for row in rows:
        add(*row[:3], parameter_bytes(loaded.spec.model, row))
    table.add_section()
    for kind in ("embedding", "dense"):
        picked = [r for r in rows if r[1] == kind]
        add(f"{kind} total", "", sum(r[2] for r in picked), parameter_bytes(loaded.spec.model, *picked))
    total = sum(r[2] for r in rows)
    add(f"total (~{total / 1e9:.2f}B)", "", total, parameter_bytes(loaded.spec.model, *rows))
    # piped (not a terminal): rich's default 80 columns would wrap every row of the byte columns
    (console if console.is_terminal else Console(width=160)).print(table)
    from grc.model.params import flops_report

    print("\n".join(flops_report(loaded.spec.model)))
    print("a build writes at least: " + ", ".join(f"{e.stage} {size(e.bytes)}" for e in stage_bytes(loaded.spec)))


def build(
    spec: SpecArg = DEFAULT_SPEC,
    only: Annotated[
        list[str] | None,
        typer.Argument(metavar="STAGE", show_default=False, help="build only these stages (and what they need)"),
    ] = None,
    artifacts: ArtifactsOpt = Path("artifacts"),
    jobs: Annotated[int, typer.Option("-j", "--jobs", help="tasks to run in parallel")] = 1,
    wait: Annotated[float, _wait_option("")] = DEFAULT_WAIT,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", show_default=False, help="local build cache (default $GRC_CACHE_DIR or ~/.cache/grc)"
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="neither restore from nor save to the cache")] = False,
    remote_cache: Annotated[
        str | None,
        typer.Option(
            "--remote-cache",
            metavar="URL",
            show_default=False,
            help="HTTP store: GET/PUT/HEAD URL/cas/<digest>, URL/ac/<key>",
        ),
    ] = None,
    remote_read_only: Annotated[
        bool, typer.Option("--remote-read-only", help="download from the remote store, never upload")
    ] = False,
) -> int:
    """Run every stale stage of a spec (weights -> onnx -> surgery -> verify -> engines -> bundles).

    Outputs land in ARTIFACTS/<spec name>/; a stage whose inputs, spec fields and code are unchanged
    is skipped, or restored from the build cache. Exit 0 when every stage passed.

    \b
    Examples:
      grc build specs/hstu-tiny.yaml -j 2
      grc build specs/hstu-tiny.yaml export      # weights and export only
      grc build specs/mtgr-small.yaml --remote-cache http://cache:8080 --remote-read-only
    """
    from grc.build.runner import build as run_build
    from grc.cache.config import configure

    configure(
        enabled=False if no_cache else None,
        directory=cache_dir,
        remote=remote_cache,
        read_only=True if remote_read_only else None,
    )
    loaded = load(spec)
    _check_stages(loaded, only or [])
    return run_build(loaded, root_of(artifacts, loaded), jobs=jobs, wait=wait, only=only or None)


def _check_stages(loaded: object, names: list[str]) -> None:
    """Name a stage that is not in this spec's graph before doit does (its message names a
    command grc does not have)."""
    from grc.build.graph import active_stages
    from grc.stages import STAGES

    active = [s.name for s in active_stages(loaded)]  # type: ignore[arg-type]
    for name in names:
        if name not in active:
            why = "is turned off in this spec" if name in {s.name for s in STAGES} else "is not a stage"
            raise typer.BadParameter(
                f"{name!r} {why}; stages of this spec: {', '.join(active)} (grc graph SPEC shows what each needs)",
                param_hint="STAGE",
            )


def plan(
    spec: SpecArg = DEFAULT_SPEC,
    artifacts: ArtifactsOpt = Path("artifacts"),
    as_json: JsonOpt = False,
    keys: Annotated[bool, typer.Option("--keys", help="also list every part of each task's cache key")] = False,
) -> None:
    """Say what a build would run and which field or file made it stale; runs nothing.

    \b
    Examples:
      grc plan specs/hstu-tiny.yaml
      grc plan specs/hstu-tiny.yaml --json | jq '.[] | select(.state != "up to date")'
    """
    from grc.build.runner import plan as make_plan

    loaded = load(spec)
    rows = make_plan(loaded, root_of(artifacts, loaded))
    if as_json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return
    for row in rows:
        mark = {"up to date": "✓", "stale": "✗", "waits": "…"}[row.state]
        print(f"{mark} {row.task:<16} {row.state}")
        for reason in row.reasons:
            print(f"    {reason}")
        if keys:
            for part, digest in sorted(row.parts.items()):
                print(f"      key part {part} = {digest}")
            print("      key part input:<stage> = digest of each input stage's manifest (known when it runs)")


def graph(
    spec: SpecArg = DEFAULT_SPEC,
    artifacts: ArtifactsOpt = Path("artifacts"),
    fmt: Annotated[Literal["text", "dot", "mermaid"], typer.Option("--format")] = "text",
) -> None:
    """Print the stage graph: what each stage needs, reads and writes.

    \b
    Examples:
      grc graph specs/hstu-tiny.yaml
      grc graph specs/hstu-tiny.yaml --format dot | dot -Tsvg > graph.svg
      grc graph specs/hstu-tiny.yaml --format mermaid
    """
    from grc.build.graph import active_stages

    loaded = load(spec)
    stages = active_stages(loaded)
    if fmt == "text":
        for s in stages:
            ins = ", ".join(s.inputs_for(loaded.spec)) or "-"
            print(f"{s.name:<16} <- {ins:<28} reads {', '.join(s.reads)}  -> {s.output}/")
        return
    head, node, edge, tail = GRAPH_FORMATS[fmt]
    print(head)
    for s in stages:
        print(node.format(id=s.name.replace("-", "_"), name=s.name, reads=", ".join(s.reads)))
        for i in s.inputs_for(loaded.spec):
            print(edge.format(src=i, dst=s.name, src_id=i.replace("-", "_"), dst_id=s.name.replace("-", "_")))
    if tail:
        print(tail)


def clean(
    spec: SpecArg = DEFAULT_SPEC,
    artifacts: ArtifactsOpt = Path("artifacts"),
    wait: Annotated[float, _wait_option(" (0: refuse while one runs)")] = 0.0,
) -> None:
    """Remove a spec's artifacts (ARTIFACTS/<spec name>/), under the lock a build takes.

    While a build of the spec runs, clean refuses (or waits up to --wait seconds); what cannot be
    removed (a read-only tree) is an error, never a silent success.

    \b
    Examples:
      grc clean specs/hstu-tiny.yaml
      grc clean specs/hstu-tiny.yaml --wait 600    # after the running build ends
    """
    from grc.build.clean import clean as remove
    from grc.build.progress import CONSOLE

    loaded = load(spec)
    root = root_of(artifacts, loaded)
    removed = remove(
        root, wait, lambda holder: CONSOLE.print(f"a build is running (pid {holder}); waiting...", markup=False)
    )
    print(f"removed {root}" if removed else f"nothing to remove under {root}")


def schema() -> None:
    """Print the spec's JSON Schema (for editors: yaml-language-server, VS Code).

    \b
    Examples:
      grc schema > grc-spec.schema.json
    """
    from grc.spec.schema import Spec

    doc = Spec.model_json_schema()
    doc["properties"]["extends"] = {"type": "string", "description": "base spec, relative to this file"}
    print(json.dumps(doc, indent=1))


def register(app: typer.Typer) -> None:
    for command in (validate, show, build, plan, graph, clean, schema):
        app.command()(guard(command))
