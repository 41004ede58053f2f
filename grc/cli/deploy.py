"""``grc deploy``: serve a built bundle for real. Each target is a module ``grc.deploy.<target>``
with ``deploy(loaded, root, args) -> int`` and ``stop(loaded, root, args) -> int``, imported only
when chosen, so a missing serving stack never breaks the rest of the CLI."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Annotated, Literal

import typer

from grc.cli.common import DEFAULT_SPEC, ArtifactsOpt, SpecArg, guard, load, root_of

TARGETS = {
    "triton": "Triton Inference Server on the triton bundle (bundles/triton)",
    "vllm": "vLLM (pooling runner) on the vllm bundle (bundles/vllm)",
}


def deploy(
    target: Annotated[
        Literal["triton", "vllm"],
        typer.Option("--target", show_default=False, help="; ".join(f"{k}: {v}" for k, v in TARGETS.items())),
    ],
    spec: SpecArg = DEFAULT_SPEC,
    artifacts: ArtifactsOpt = Path("artifacts"),
    detach: Annotated[bool, typer.Option("--detach", help="leave the server running after the smoke test")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="stop a server started with --detach")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for readiness")] = 180.0,
    docker: Annotated[
        bool,
        typer.Option(
            "--docker", help="triton: print (and run, if a Docker engine answers) the NGC container command instead"
        ),
    ] = False,
    http_port: Annotated[
        int | None, typer.Option("--http-port", show_default=False, help="triton: HTTP port (default: a free one)")
    ] = None,
    grpc_port: Annotated[
        int | None, typer.Option("--grpc-port", show_default=False, help="triton: gRPC port (default: a free one)")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", show_default=False, help="triton: Prometheus metrics port (default: a free one)"
        ),
    ] = None,
    model_config_name: Annotated[
        str | None,
        typer.Option(
            "--model-config-name",
            metavar="TARGET",
            show_default=False,
            help="triton: load configs/TARGET.pbtxt where a model has one, e.g. the engine of one GPU when several "
            "share a compute capability (H100 / H200); see the bundle's README",
        ),
    ] = None,
) -> int:
    """Serve a built bundle for real: start, wait ready, smoke request vs PyTorch, print endpoints.

    \b
    Examples:
      grc deploy specs/hstu-tiny.yaml --target triton
      grc deploy specs/hstu-tiny.yaml --target triton --detach     # later: --stop
      grc deploy specs/hstu-tiny.yaml --target vllm --timeout 600
    """
    options = argparse.Namespace(**{k: v for k, v in locals().items() if k not in ("spec", "artifacts")})
    loaded = load(spec)
    module = importlib.import_module(f"grc.deploy.{target}")
    root = root_of(artifacts, loaded)
    return int(module.stop(loaded, root, options) if stop else module.deploy(loaded, root, options))


def register(app: typer.Typer) -> None:
    app.command()(guard(deploy))
