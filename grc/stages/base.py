"""What a stage is: a name, the spec fields it reads, the stages whose outputs it reads, the code
it runs, and a function that writes its output folder. The graph (grc/build/graph.py) turns these
declarations into doit tasks; a stage never looks at anything it did not declare."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from grc.spec.loader import LoadedSpec

MANIFEST = "manifest.json"


@dataclass
class Context:
    """What a running stage may touch: its spec, its inputs' folders, and its own (temporary) output."""

    loaded: LoadedSpec
    out: Path  # a fresh temporary folder; installed atomically when the stage returns
    inputs: dict[str, Path]  # upstream stage name -> its installed output folder
    console: Console

    @property
    def spec(self):  # type: ignore[no-untyped-def]
        return self.loaded.spec

    def log(self, message: str) -> None:
        # plain text, not rich markup: messages carry paths and names ("[/x]" would be a closing tag)
        self.console.print(Text(f"  {message}", style="dim"))

    def input_manifest(self, stage: str) -> dict[str, Any]:
        return json.loads((self.inputs[stage] / MANIFEST).read_text())


@dataclass(frozen=True)
class Stage:
    name: str
    output: str  # folder under artifacts/<spec name>/
    reads: tuple[str, ...]  # dotted spec paths whose values decide the output
    inputs: tuple[str, ...]  # upstream stages
    run: Callable[[Context], dict[str, Any]]  # writes ctx.out, returns the manifest
    toolkits: tuple[str, ...] = ()  # distributions whose version shapes the output (part of the key)
    # whether, for a spec, the output depends on this host's GPU (then its name and SM join the key)
    host_gpu: Callable[[Any], bool] = field(default=lambda spec: False)
    code: tuple[str, ...] = ()  # non-Python sources it uses (Python imports are found automatically)
    doc: str = ""
    enabled: Callable[[Any], bool] = field(default=lambda spec: True)
    # upstream stages a spec may add (the triton bundle serves the aoti packages only when its
    # backend says so): read, keyed and waited for exactly like ``inputs`` for that spec
    optional_inputs: Callable[[Any], tuple[str, ...]] = field(default=lambda spec: ())
    # upstream stage -> the one file of its output this stage's output depends on, when that is
    # less than its manifest: export reads the weights' dense.json only, so a change of table
    # precision neither reruns it nor changes its cache key
    input_files: dict[str, str] = field(default_factory=dict)

    def input_file(self, upstream: str) -> str:
        """The file of ``upstream``'s output whose bytes decide this stage's (doit dep and cache key)."""
        return self.input_files.get(upstream, MANIFEST)

    def inputs_for(self, spec: Any) -> tuple[str, ...]:
        """The upstream stages whose outputs this stage reads for ``spec``."""
        return (*self.inputs, *self.optional_inputs(spec))
