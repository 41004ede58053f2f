"""The ``grc`` command. Each subcommand is a thin shell over a library call; errors that are the
user's to fix print as one clear block (no traceback) and exit with their code (2 for specs)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grc import __version__
from grc.errors import GrcError

DEFAULT_SPEC = "specs/hstu-tiny.yaml"
EPILOG = """\
examples:
  grc validate specs/mtgr-small.yaml     check a spec; exit 0, or precise errors and exit 2
  grc show specs/mtgr-large.yaml         the resolved spec and its parameter table
  grc build specs/hstu-tiny.yaml -j 2    run every stale stage (weights -> onnx -> ... -> bundles)
  grc plan specs/hstu-tiny.yaml          what would run, and which field or file made it stale
  grc graph specs/hstu-tiny.yaml --format mermaid
  grc clean specs/hstu-tiny.yaml         remove this spec's artifacts
  grc schema > grc-spec.schema.json      JSON Schema for editors (yaml-language-server)

Artifacts land in ./artifacts/<spec name>/ (change with --artifacts). Plain doit runs the same
tasks: doit -f dodo.py spec=specs/hstu-tiny.yaml
"""


def _spec_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"spec YAML file (default: {DEFAULT_SPEC})")
    p.add_argument("--artifacts", default="artifacts", type=Path, help="artifacts folder (default: ./artifacts)")


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from grc.spec.loader import load_spec

    return load_spec(args.spec)


def _root(args: argparse.Namespace, loaded) -> Path:  # type: ignore[no-untyped-def]
    return Path(args.artifacts) / loaded.spec.name


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    files = " <- ".join(str(p.name) for p in reversed(loaded.files))
    print(f"{args.spec}: ok ({loaded.spec.model.kind}, {files})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console
    from rich.table import Table

    from grc.model.params import parameter_summary

    loaded = _load(args)
    console = Console()
    console.print(yaml.safe_dump(loaded.spec.model_dump(mode="json"), sort_keys=False), end="")
    rows = parameter_summary(loaded.spec.model)
    table = Table(title=f"parameters of {loaded.spec.name}")
    for col, justify in (("group", "left"), ("kind", "left"), ("parameters", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for group, kind, count in rows:
        table.add_row(group, kind, f"{count:,}")
    emb = sum(c for _, k, c in rows if k == "embedding")
    dense = sum(c for _, k, c in rows if k == "dense")
    table.add_section()
    table.add_row("embedding total", "", f"{emb:,}")
    table.add_row("dense total", "", f"{dense:,}")
    table.add_row("total", "", f"{emb + dense:,} (~{(emb + dense) / 1e9:.2f}B)")
    console.print(table)
    from grc.build.budget import size, stage_bytes
    from grc.model.params import flops_report

    print("\n".join(flops_report(loaded.spec.model)))
    print("a build writes at least: " + ", ".join(f"{e.stage} {size(e.bytes)}" for e in stage_bytes(loaded.spec)))
    return 0


def _configure_cache(args: argparse.Namespace) -> None:
    from grc.cache.config import configure

    configure(enabled=False if args.no_cache else None, directory=args.cache_dir, remote=args.remote_cache,
              read_only=True if args.remote_read_only else None)


def cmd_build(args: argparse.Namespace) -> int:
    from grc.build.runner import build

    _configure_cache(args)
    loaded = _load(args)
    return build(loaded, _root(args, loaded), jobs=args.jobs, wait=args.wait, only=args.only)


def cmd_plan(args: argparse.Namespace) -> int:
    from grc.build.runner import plan

    loaded = _load(args)
    rows = plan(loaded, _root(args, loaded))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return 0
    for row in rows:
        mark = {"up to date": "✓", "stale": "✗", "waits": "…"}[row.state]
        print(f"{mark} {row.task:<16} {row.state}")
        for reason in row.reasons:
            print(f"    {reason}")
        if args.keys:
            for part, digest in sorted(row.parts.items()):
                print(f"      key part {part} = {digest}")
            print("      key part input:<stage> = digest of each input stage's manifest (known when it runs)")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from grc.build.graph import active_stages

    loaded = _load(args)
    stages = active_stages(loaded)
    if args.format == "dot":
        print("digraph grc {\n  rankdir=LR;")
        for s in stages:
            print(f'  "{s.name}" [label="{s.name}\\nreads: {", ".join(s.reads)}"];')
            for i in s.inputs_for(loaded.spec):
                print(f'  "{i}" -> "{s.name}";')
        print("}")
    elif args.format == "mermaid":
        print("graph LR")
        for s in stages:
            print(f'  {s.name.replace("-", "_")}["{s.name}<br/>reads: {", ".join(s.reads)}"]')
            for i in s.inputs_for(loaded.spec):
                print(f"  {i.replace('-', '_')} --> {s.name.replace('-', '_')}")
    else:
        for s in stages:
            ins = ", ".join(s.inputs_for(loaded.spec)) or "-"
            print(f"{s.name:<16} <- {ins:<28} reads {', '.join(s.reads)}  -> {s.output}/")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    import shutil

    loaded = _load(args)
    root = _root(args, loaded)
    shutil.rmtree(root, ignore_errors=True)
    print(f"removed {root}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from grc.spec.schema import Spec

    schema = Spec.model_json_schema()
    schema["properties"]["extends"] = {"type": "string", "description": "base spec, relative to this file"}
    print(json.dumps(schema, indent=1))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from grc.cache import admin
    from grc.cache.store import LocalStore, default_dir

    store = LocalStore(args.cache_dir or default_dir())
    if args.action == "stats":
        s = admin.stats(store)
        print(f"{store.root}: {s.records} action records, {s.objects} objects, {s.object_bytes / 2**20:.1f} MiB")
    elif args.action == "prune":
        removed, freed = admin.prune(store, admin.parse_size(args.max_size))
        print(f"pruned {removed} action records, freed {freed / 2**20:.1f} MiB")
    else:
        bad = admin.verify(store)
        print(f"{len(bad)} corrupt objects removed" if bad else "every object matches its digest")
        return 1 if bad else 0
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="grc",
        description="grc compiles HSTU / MTGR recommendation models from a YAML spec into weights, ONNX, "
        "fused ONNX, engines and serving bundles, rebuilding only what a change touches.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"grc {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("validate", "check a spec (exit 2 with file:line: field: message on errors)", cmd_validate),
        ("show", "print the resolved spec and its parameter table", cmd_show),
        ("build", "run every stale stage of a spec", cmd_build),
        ("plan", "say what a build would run and why; runs nothing", cmd_plan),
        ("graph", "print the stage graph (text, dot or mermaid)", cmd_graph),
        ("clean", "remove a spec's artifacts", cmd_clean),
    ]
    # keyed-cache help lives with `build`; `cache` maintains the store
    for name, help_text, fn in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _spec_arg(p)
        p.set_defaults(fn=fn)
        if name == "build":
            p.add_argument("-j", "--jobs", type=int, default=1, help="tasks to run in parallel (default 1)")
            p.add_argument("--wait", type=float, default=600.0,
                           help="seconds to wait for another build of the same spec (default 600)")
            p.add_argument("only", nargs="*", help="build only these stages (and what they need)")
            p.add_argument("--cache-dir", type=Path, help="local build cache (default $GRC_CACHE_DIR or ~/.cache/grc)")
            p.add_argument("--no-cache", action="store_true", help="neither restore from nor save to the cache")
            p.add_argument("--remote-cache", metavar="URL",
                           help="HTTP store: GET/PUT/HEAD URL/cas/<digest>, URL/ac/<key>")
            p.add_argument("--remote-read-only", action="store_true",
                           help="download from the remote store, never upload")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="machine-readable output")
            p.add_argument("--keys", action="store_true", help="also list every part of each task's cache key")
        if name == "graph":
            p.add_argument("--format", choices=("text", "dot", "mermaid"), default="text")
    p = sub.add_parser("schema", help="print the spec's JSON Schema", description="print the spec's JSON Schema")
    p.set_defaults(fn=cmd_schema)
    p = sub.add_parser("cache", help="inspect and maintain the local build cache",
                       description="stats: objects and records; prune: shrink to --max-size (LRU); "
                       "verify: re-hash every object and drop corrupt ones")
    p.add_argument("action", choices=("stats", "prune", "verify"))
    p.add_argument("--max-size", default="10G", help="prune target, e.g. 500M, 10G (default 10G)")
    p.add_argument("--cache-dir", type=Path, help="default $GRC_CACHE_DIR or ~/.cache/grc")
    p.set_defaults(fn=cmd_cache)
    from grc.deploy.cli import add_deploy_commands

    add_deploy_commands(sub)
    from grc.cli_inspect import add_inspect_command

    add_inspect_command(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except GrcError as exc:
        print(f"error: {exc}" if not hasattr(exc, "problems") else str(exc), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `grc plan | head`
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
