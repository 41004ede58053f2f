"""plugins: the grc::HSTUAttention TensorRT plugin (plugins/*.cu) -> libgrc_plugins.so, with nvcc.

One library serves every engine target: a cubin per target SM (+ PTX of the newest), CUDA's runtime
linked statically, no TensorRT library linked (the IPluginV3 interfaces are header-only), so the
same file loads into TensorRT and TensorRT-RTX. The manifest records the library's sha256 (engines
record it too), the nvcc and header versions, a lint of the .so, and the creator each installed
toolkit sees when it loads it. Without nvcc or headers the stage records a skip with the reason,
and the engine stage skips its targets with that reason: no library, no engine.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from grc.engine import plugin_build as pb
from grc.engine.toolkits import installed, worker_command, worker_env
from grc.errors import StageError
from grc.stages.base import Context, Stage

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("plugins/hstu_attention_plugin.cu", "plugins/hstu_attention_kernel.cuh")
LIBRARY = "libgrc_plugins.so"
# The node attributes graph surgery writes (grc/onnx/surgery/passes.py), which the creator must read.
PLUGIN_FIELDS = (
    "num_heads",
    "head_dim_qk",
    "head_dim_v",
    "alpha",
    "norm",
    "causal",
    "position_buckets",
    "time_buckets",
)


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, "library": None, **extra}


def check_creator(library: Path) -> dict[str, Any]:
    """Load the library through each installed toolkit's plugin registry (in a worker process)."""
    import subprocess

    seen: dict[str, Any] = {}
    for toolkit in installed().values():
        with tempfile.TemporaryDirectory(prefix="grc-plugin-info-") as tmp:
            request = Path(tmp) / "request.json"
            result = Path(tmp) / "result.json"
            request.write_text(
                json.dumps({"module": toolkit.module, "plugin_library": str(library), "result": str(result)})
            )
            subprocess.run(
                worker_command("plugin-info", request),
                env=worker_env(toolkit, Path(tmp)),
                capture_output=True,
                text=True,
                timeout=300,
            )
            info: dict[str, Any] = (
                json.loads(result.read_text()) if result.exists() else {"ok": False, "error": "the worker crashed"}
            )
        if not info.get("ok"):
            raise StageError(f"plugins: {toolkit.label} cannot load {library.name}: {info.get('error')}")
        fields = [name for name, _ in info["plugin"]["fields"]]
        if tuple(fields) != PLUGIN_FIELDS:
            raise StageError(f"plugins: the creator declares fields {fields}; surgery writes {list(PLUGIN_FIELDS)}")
        seen[toolkit.name] = {"version": info["version"], **info["plugin"]}
    return seen


def run(ctx: Context) -> dict[str, Any]:
    wanted = sorted({t.compute_capability for t in ctx.spec.engine.targets})
    try:
        nvcc = pb.find_nvcc()
        headers = pb.find_headers()
    except pb.Unavailable as exc:
        ctx.log(f"plugins: skipped: {exc}")
        return skipped(str(exc))
    supported = pb.supported_arches(nvcc)
    sms = [sm for sm in wanted if sm in supported]
    dropped = [sm for sm in wanted if sm not in supported]
    if not sms:
        return skipped(f"nvcc {pb.nvcc_version(nvcc)} compiles none of sm{wanted}")
    out = ctx.out / LIBRARY
    started = time.perf_counter()
    try:
        command = pb.compile_library(nvcc, REPO / SOURCES[0], headers.folder, sms, out)
    except RuntimeError as exc:
        raise StageError(f"plugins: {exc}") from exc
    seconds = time.perf_counter() - started
    try:
        lint = pb.lint_library(out)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        raise StageError(f"plugins: {exc}") from exc
    if lint.get("entry_points_ok") is False or lint.get("links_tensorrt_or_cudart"):
        raise StageError(f"plugins: {LIBRARY} fails its lint: {lint}")
    registry = check_creator(out)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    ctx.log(
        f"plugins: {LIBRARY} for sm{sms} in {seconds:.1f}s, sha256 {sha[:16]}, creators seen by "
        f"{', '.join(registry) or 'no installed toolkit'}"
    )
    return {
        "status": "built",
        "library": LIBRARY,
        "sha256": {LIBRARY: sha},  # file -> digest, the manifests' convention (the build cache reads it)
        "sms": sms,
        "sms_not_supported_by_nvcc": dropped,
        "plugins": [{"name": "HSTUAttention", "version": "1", "namespace": "grc", "fields": list(PLUGIN_FIELDS)}],
        # host paths and timings stay out of the manifest: downstream keys hash it, and the same
        # sources must give the same manifest on any host (the seconds are in the build report)
        "nvcc": {"version": pb.nvcc_version(nvcc), "command": _portable(command, headers.folder, out)},
        "headers": {"source": headers.source, "tensorrt_version": headers.version},
        "lint": lint,
        "registry": registry,
    }


def _portable(command: list[str], include: Path, out: Path) -> list[str]:
    names = {
        str(include): "<tensorrt-include>",
        str(out): LIBRARY,
        str(REPO / SOURCES[0]): SOURCES[0],
        str((REPO / SOURCES[0]).parent): "plugins",
    }
    return [names.get(c, Path(c).name if c.startswith("/") else c) for c in command]


STAGE = Stage(
    name="plugins",
    output="plugins",
    reads=("engine.targets",),  # the SMs to compile for; precision and profiles do not touch the library
    inputs=(),
    run=run,
    code=(*SOURCES, "grc/engine/worker.py"),  # the worker checks the creator; Python imports are found by the key
    doc="nvcc: the grc::HSTUAttention IPluginV3 (CUDA kernel) -> libgrc_plugins.so for the targets' SMs",
    enabled=lambda spec: bool(spec.engine.targets),
)
