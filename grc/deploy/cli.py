"""The ``grc deploy`` subcommand. Each target is a module ``grc.deploy.<target>`` with
``deploy(loaded, root, args) -> int`` and ``stop(loaded, root, args) -> int``; imported only
when chosen, so a missing serving stack never breaks the rest of the CLI."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

TARGETS = {
    "triton": "Triton Inference Server on the triton bundle (bundles/triton)",
    "vllm": "vLLM (pooling runner) on the vllm bundle (bundles/vllm)",
}


def cmd_deploy(args: argparse.Namespace) -> int:
    from grc.spec.loader import load_spec

    loaded = load_spec(args.spec)
    root = Path(args.artifacts) / loaded.spec.name
    module = importlib.import_module(f"grc.deploy.{args.target}")
    return int(module.stop(loaded, root, args) if args.stop else module.deploy(loaded, root, args))


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    text = "serve a built bundle for real: start, wait ready, smoke request vs PyTorch, print endpoints"
    p = sub.add_parser(
        "deploy",
        help=text,
        description=text + "\n\ntargets:\n" + "\n".join(f"  {k:<8} {v}" for k, v in TARGETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", default="specs/hstu-tiny.yaml", help="spec YAML (default: specs/hstu-tiny.yaml)")
    p.add_argument("--target", choices=sorted(TARGETS), required=True)
    p.add_argument("--artifacts", default="artifacts", type=Path, help="artifacts folder (default: ./artifacts)")
    p.add_argument("--detach", action="store_true", help="leave the server running after the smoke test")
    p.add_argument("--stop", action="store_true", help="stop a server started with --detach")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness (default 180)")
    p.add_argument("--docker", action="store_true",
                   help="triton: print (and run, if a Docker engine answers) the NGC container command instead")
    p.add_argument("--http-port", type=int, help="triton: HTTP port (default: a free one)")
    p.add_argument("--grpc-port", type=int, help="triton: gRPC port (default: a free one)")
    p.add_argument("--metrics-port", type=int, help="triton: Prometheus metrics port (default: a free one)")
    p.add_argument("--model-config-name", metavar="TARGET",
                   help="triton: load configs/TARGET.pbtxt where a model has one, e.g. the engine of one GPU when "
                        "several share a compute capability (H100 / H200); see the bundle's README")
    p.set_defaults(fn=cmd_deploy)
