"""The ``grc`` command (typer). One module per command group: ``build`` (validate, show, build,
plan, graph, clean, schema), ``deploy``, ``cache``, ``inspect``. Commands are thin shells over grc
modules; errors that are the user's to fix print as one clear block (no traceback) and exit with
their code (2 for specs and usage, 130 after Ctrl-C).

``main(argv) -> int`` is the console entry point (``grc = "grc.cli:main"``) and the in-process API
the tests call; ``python -m grc.cli`` runs it too."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Annotated

import typer

from grc import __version__
from grc.build import interrupt
from grc.cli import build, cache, deploy, inspect
from grc.cli.common import Interrupted, PipeClosed
from grc.errors import GrcError

EXAMPLES = """\
\b
Examples:
  grc validate specs/mtgr-small.yaml     check a spec; exit 0, or precise errors and exit 2
  grc show specs/mtgr-large.yaml         the resolved spec and its parameter table
  grc build specs/hstu-tiny.yaml -j 2    run every stale stage (weights -> onnx -> ... -> bundles)
  grc plan specs/hstu-tiny.yaml          what would run, and which field or file made it stale
  grc graph specs/hstu-tiny.yaml --format mermaid
  grc clean specs/hstu-tiny.yaml         remove this spec's artifacts
  grc deploy specs/hstu-tiny.yaml --target triton
  grc schema > grc-spec.schema.json      JSON Schema for editors (yaml-language-server)

Artifacts land in ./artifacts/<spec name>/ (change with --artifacts). Plain doit runs the same
tasks: doit -f dodo.py spec=specs/hstu-tiny.yaml. Each command has --help with examples.
"""

app = typer.Typer(
    name="grc",
    help="grc compiles HSTU / MTGR recommendation models from a YAML spec into weights, ONNX, fused ONNX, "
    "engines and serving bundles, rebuilding only what a change touches.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # grc's own errors print without a traceback; others keep Python's
    rich_markup_mode=None,  # help is plain text: examples keep their lines, brackets stay brackets
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"grc {__version__}")
        raise typer.Exit()


@app.callback()
def _top(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print grc's version and exit"),
    ] = None,
) -> None:
    pass


build.register(app)
deploy.register(app)
app.add_typer(cache.app)
app.add_typer(inspect.app)


def _interrupted() -> int:
    print("interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.active_count() > 1:
        # A worker thread (grc build -j N) may be inside torch / onnx native code: finalizing the
        # interpreter under it ends that thread with pthread_exit, whose unwinding through C++
        # frames aborts the process ("terminate called without an active exception", exit 134).
        # The build lock is a flock (the kernel drops it) and partial outputs are swept next time.
        os._exit(130)
    # No other thread: run the exit handlers (a deploy stops its server), then end here with 130. Left to
    # interpreter finalization, an interrupted export was seen to end killed by SIGINT instead (exit -2).
    atexit._run_exitfuncs()
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    with interrupt.watch():  # a Ctrl-C that a library turned into its own error still ends as interrupted
        try:
            code = int(command.main(args=argv, prog_name="grc", standalone_mode=False) or 0)
        except typer.TyperException as exc:  # usage errors (click's, vendored by typer): exit 2, as argparse did
            exc.show()  # type: ignore[attr-defined]
            return int(getattr(exc, "exit_code", 2))
        except (Interrupted, KeyboardInterrupt):
            return _interrupted()
        except GrcError as exc:
            if interrupt.seen():
                return _interrupted()
            print(f"error: {exc}" if not hasattr(exc, "problems") else str(exc), file=sys.stderr)
            return exc.exit_code
        except PipeClosed:  # `grc plan | head`
            return 0
    return _interrupted() if interrupt.seen() and code != 0 else code
