"""Before a build writes anything: how many bytes each stage will write (from the spec alone), and
a refusal naming the numbers when the artifacts filesystem cannot hold them.

The estimates are what a stage must write at least: the weights stage writes every table row and
dense parameter; export and surgery one float32 copy of the dense model each; each engine and AOTI
package one copy at its precision; bundles hard-link the weights and ONNX (same filesystem), so they
add little. Verify and plugins write a few MiB. So a refusal is never a false alarm: what is
refused could not have fit. Counting is free of torch (grc.model.params counts in closed form), so a
no-op build stays fast; only a build that may not fit asks which stages are up to date.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grc.build.progress import CONSOLE
from grc.errors import GrcError
from grc.model.params import dense_parameter_count, table_bytes
from grc.spec.loader import LoadedSpec
from grc.spec.schema import InitConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}
SHOW_FROM = 1 << 30  # a build that writes less than this does not mention its size


class DiskSpaceError(GrcError):
    """A build that cannot fit on the artifacts filesystem: refused before any stage runs."""

    exit_code = 1


@dataclass(frozen=True)
class StageBytes:
    stage: str
    bytes: int
    what: str


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def stage_bytes(spec: Any) -> list[StageBytes]:
    """What each enabled stage of ``spec`` writes at least, in bytes."""
    from grc.stages import STAGES

    model = spec.model
    init = spec.weights.source if isinstance(spec.weights.source, InitConfig) else None
    # a checkpoint's tables keep their dtype (2 bytes at least), its dense parameters become float32
    table_dtype = init.embedding_dtype if init else "bfloat16"
    dense_dtype = init.dtype if init else "float32"
    if spec.weights.embedding_dtype is not None:
        table_dtype = spec.weights.embedding_dtype
    tables_b = sum(table_bytes(t.vocab_size, model.table_dim(name), table_dtype) for name, t in model.tables.items())
    dense = dense_parameter_count(model)
    dense_b = dense * DTYPE_BYTES[dense_dtype]
    engines = [DTYPE_BYTES[spec.engine.precision_of(t)] for t in spec.engine.targets]
    aoti = spec.engine.aoti
    packages = [4 if t == "cpu" else DTYPE_BYTES[aoti.dtype] for t in aoti.targets]
    estimates = [
        StageBytes("weights", tables_b + dense_b, f"tables {size(tables_b)} {table_dtype} + dense {size(dense_b)}"),
        StageBytes("export", dense * 4, "the dense model as float32 ONNX"),
        StageBytes("surgery", dense * 4, "the fused ONNX, float32"),
        StageBytes(
            "quantize",
            dense * 4 * len({p for p in map(spec.engine.precision_of, spec.engine.targets) if DTYPE_BYTES[p] == 1}),
            "int8 / fp8 Q/DQ graphs, at most float32",
        ),
        StageBytes("verify", 0, "a report"),
        StageBytes("plugins", 0, "the plugin library (a few MiB)"),
        StageBytes("engine", dense * sum(engines), f"{len(engines)} engine(s), the dense model each"),
        StageBytes("aoti", dense * sum(packages), f"{len(packages)} package(s), the dense model each"),
        StageBytes("triton", 0, "configs; weights and ONNX hard-linked"),
        StageBytes("vllm", 0, "configs; weights hard-linked"),
    ]
    enabled = {s.name for s in STAGES if s.enabled(spec)}
    return [e for e in estimates if e.stage in enabled]


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _with_inputs(loaded: LoadedSpec, names: Iterable[str]) -> set[str]:
    from grc.stages import STAGES

    by_name = {s.name: s for s in STAGES}
    todo, out = list(names), set()
    while todo:
        name = todo.pop()
        if name in by_name and name not in out:
            out.add(name)
            todo += by_name[name].inputs_for(loaded.spec)
    return out


def check_disk(loaded: LoadedSpec, root: Path, only: list[str] | None = None) -> None:
    """Refuse a build whose stages cannot fit on the filesystem of ``root``; say the size of a big one."""
    estimates = stage_bytes(loaded.spec)
    if only:
        wanted = _with_inputs(loaded, only)
        estimates = [e for e in estimates if e.stage in wanted]
    where = _existing(root)
    free = shutil.disk_usage(where).free
    if sum(e.bytes for e in estimates) > free:  # maybe: count only the stages that will run
        from grc.build.runner import plan

        running = {row.task for row in plan(loaded, root) if row.state != "up to date"}
        estimates = [e for e in estimates if e.stage in running]
    need = sum(e.bytes for e in estimates)
    parts = ", ".join(f"{e.stage} {size(e.bytes)}" for e in estimates if e.bytes)
    if need > free:
        table = "\n".join(f"  {e.stage:<8} {size(e.bytes):>10}  {e.what}" for e in estimates)
        raise DiskSpaceError(
            f"{loaded.spec.name}: this build writes at least {size(need)} ({need:,} bytes) and {where} has "
            f"{size(free)} ({free:,} bytes) free:\n{table}\nfree space, shrink the spec, or build elsewhere "
            "with --artifacts"
        )
    if need >= SHOW_FROM:
        CONSOLE.print(
            f"disk: the stages of this build write about {size(need)} ({parts}); {size(free)} free at {where}",
            markup=False,
            style="dim",
        )
