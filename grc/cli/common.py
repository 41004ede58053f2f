"""What every ``grc`` command shares: the spec argument, the artifacts option, loading a spec.

Imports here stay light (typer, pathlib): ``grc build`` on an up-to-date tree must start fast, so
each command imports the grc module it calls inside its own body."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

if TYPE_CHECKING:
    from grc.spec.loader import LoadedSpec

DEFAULT_SPEC = "specs/hstu-tiny.yaml"


def _complete_spec(incomplete: str) -> list[str]:
    """Shell completion of SPEC: folders and YAML files starting with what was typed."""
    folder, _, stem = incomplete.rpartition("/")
    found = Path(folder or ".").glob(f"{stem}*")
    return sorted(f"{p}/" if p.is_dir() else str(p) for p in found if p.is_dir() or p.suffix in (".yaml", ".yml"))


SpecArg = Annotated[
    str,
    typer.Argument(
        metavar="SPEC",
        help=f"spec YAML file (default: {DEFAULT_SPEC})",
        show_default=False,
        autocompletion=_complete_spec,
    ),
]
ArtifactsOpt = Annotated[Path, typer.Option("--artifacts", help="artifacts folder", show_default="./artifacts")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]

F = TypeVar("F", bound=Callable[..., object])


class Interrupted(Exception):
    """Ctrl-C inside a command. typer would turn the KeyboardInterrupt into a silent exit 130;
    ``grc.cli.main`` says "interrupted" and ends the process safely (see there)."""


class PipeClosed(Exception):
    """The reader of our output went away (``grc plan | head``): typer would exit 1; grc exits 0."""


def guard(fn: F) -> F:
    """Wrap a command so Ctrl-C and a closed pipe reach ``grc.cli.main`` past typer's handlers."""

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted() from None
        except BrokenPipeError:
            raise PipeClosed() from None

    return run  # type: ignore[return-value]


def load(spec: str) -> LoadedSpec:
    """Load and validate ``spec``. The loader decides what a path that is no regular file is (a
    FIFO would block, a directory is no spec): ``file:line: (file): message`` like every spec error."""
    from grc.spec.loader import load_spec

    return load_spec(Path(spec))


def root_of(artifacts: Path, loaded: LoadedSpec) -> Path:
    return artifacts / loaded.spec.name
