"""engine: surgeried ONNX + plugin library -> one TensorRT plan per target, with metadata.

Per target (``engine.targets``): pick the toolkit able to build its SM (``grc.engine.toolkits``), or
record a skip saying why and what to install; convert the graph to the target's precision (a
reported conversion of a copy); build in a worker process; write ``<target>/model.plan`` and
``<target>/metadata.json`` (toolkit, SMs, precision, profiles, plugin-library and ONNX hashes, network
layers, the plan's SM mask) and ``<target>/build-report.json`` (build seconds: kept apart because
they are the only bytes two builds of the same inputs disagree on). Parity against onnxruntime runs
where a GPU the engine targets is present, and fails the stage past the tolerance; elsewhere the
metadata says it was not measured and why. No plan is ever written for a skipped target.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.table import Table
from rich.text import Text

from grc.build.fingerprint import sha256_file
from grc.cache.store import default_dir as cache_dir
from grc.engine import PLUGIN
from grc.engine import plan as plan_file
from grc.engine import precision as precision_pass
from grc.engine.quantize import quantized_precisions
from grc.engine.toolkits import TOOLKIT_DISTRIBUTIONS, Toolkit, choose, runnable_here, worker_command, worker_env
from grc.errors import StageError
from grc.spec.schema import QUANTIZED_PRECISIONS, EngineConfig, EngineTarget
from grc.stages.base import Context, Stage
from grc.verify.compare import compare, format_figures

MODEL = "model.onnx"  # the surgery stage's graph (not imported from the export stage: that would put the
# exporter's code into this stage's key)
PLAN = "model.plan"
ATTENTION_OP = PLUGIN[0]
METADATA = "metadata.json"
BUILD_REPORT = "build-report.json"  # the name grc uses for timings, which byte-identity checks leave out
PARITY_SEED = 20240501  # fixed: parity inputs must not depend on unrelated spec fields


def resolve_profiles(cfg: EngineConfig, max_seq_len: int) -> list[dict[str, list[int]]]:
    out = []
    for i, p in enumerate(cfg.profiles):
        tokens = (
            [1, min(128, max_seq_len), max_seq_len] if p.tokens is None else [p.tokens.min, p.tokens.opt, p.tokens.max]
        )
        if tokens[2] > max_seq_len:
            raise StageError(
                f"engine.profiles[{i}].tokens.max: {tokens[2]} exceeds model.hstu.max_seq_len "
                f"{max_seq_len}, the longest padded row the model accepts"
            )
        out.append({"users": [p.users.min, p.users.opt, p.users.max], "tokens": tokens})
    return out


def run_worker(mode: str, request: dict[str, Any], toolkit: Toolkit, scratch: Path) -> dict[str, Any]:
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{mode}-request.json"
    result = scratch / f"{mode}-result.json"
    result.unlink(missing_ok=True)
    path.write_text(json.dumps({**request, "module": toolkit.module, "toolkit": toolkit.name, "result": str(result)}))
    done = subprocess.run(worker_command(mode, path), env=worker_env(toolkit, scratch), capture_output=True, text=True)
    if result.exists():
        return json.loads(result.read_text())
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    return {"ok": False, "error": f"the {toolkit.label} worker died (exit {done.returncode}) without a result:\n{tail}"}


def attention_nodes(onnx_path: Path) -> list[str]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == ATTENTION_OP]


class Builder:
    """State shared by the targets of one stage run: converted graphs, the plugin library, scratch."""

    def __init__(self, ctx: Context, scratch: Path):
        self.ctx = ctx
        self.cfg: EngineConfig = ctx.spec.engine
        self.scratch = scratch
        self.onnx = ctx.inputs["surgery"] / MODEL
        self.onnx_sha = ctx.input_manifest("surgery").get("sha256", {}).get(MODEL) or sha256_file(self.onnx)
        self.plugins = ctx.input_manifest("plugins")
        built = self.plugins.get("status") == "built"
        self.library = ctx.inputs["plugins"] / self.plugins["library"] if built else None
        self.library_sha = self.plugins["sha256"][self.plugins["library"]] if built else None
        self.profiles = resolve_profiles(self.cfg, ctx.spec.model.hstu.max_seq_len)
        self.attention = attention_nodes(self.onnx)
        self.graphs: dict[str, tuple[Path, dict[str, Any], str]] = {}

    def graph(self, precision: str) -> tuple[Path, dict[str, Any], str]:
        if precision not in self.graphs:
            if precision in QUANTIZED_PRECISIONS:
                entry = self.ctx.input_manifest("quantize")["precisions"][precision]
                path = self.ctx.inputs["quantize"] / entry["model"]
                ranking = self.ctx.input_manifest("verify")["ranking"]
                gated = [f for f in ranking["figures"] if f["backend"] == f"onnxrt-{precision}"]
                report = {
                    "conversions": [
                        f"the quantize stage's {precision} Q/DQ graph: {entry['tool']} "
                        f"{entry['version']}, {entry['quantize_nodes']} Q/DQ pairs, "
                        f"{entry['calibration_method']} calibration, unquantized ops in fp32"
                    ],
                    "quantization": {
                        **{
                            k: entry[k]
                            for k in (
                                "tool",
                                "version",
                                "calibration_method",
                                "excluded_op_types",
                                "quantize_nodes",
                                "calibration",
                            )
                        },
                        # the gates this graph passed in verify (onnxruntime vs fp32)
                        "ranking": {"gates": ranking["gates"], "figures": gated},
                    },
                }
                self.graphs[precision] = (path, report, sha256_file(path))
            elif precision == "fp32":
                self.graphs[precision] = (self.onnx, {"conversions": []}, self.onnx_sha)
            else:
                dst = self.scratch / f"onnx-{precision}" / MODEL
                report = precision_pass.convert(self.onnx, dst, precision)
                for line in report["conversions"]:
                    self.ctx.log(f"engine: {precision} graph: {line}")
                self.graphs[precision] = (dst, report, sha256_file(dst))
        return self.graphs[precision]

    def skip(self, target: EngineTarget, precision: str, reason: str) -> dict[str, Any]:
        self.ctx.log(f"engine: {target.name}: skipped: {reason}")
        return {
            "name": target.name,
            "sm": target.compute_capability,
            "gpu": target.gpu,
            "precision": precision,
            "status": "skipped",
            "reason": reason,
        }

    def build(self, target: EngineTarget) -> dict[str, Any]:
        precision = self.cfg.precision_of(target)
        sm = target.compute_capability
        choice = choose(sm, precision, target.toolkit)
        if choice.toolkit is None:
            return self.skip(target, precision, choice.reason)
        if self.library is None:
            return self.skip(
                target, precision, f"no plugin library: the plugins stage was skipped ({self.plugins.get('reason')})"
            )
        if sm not in self.plugins.get("sms", []):
            dropped = self.plugins.get("sms_not_supported_by_nvcc")
            return self.skip(
                target, precision, f"the plugin library has no code for sm{sm} (nvcc could not compile {dropped})"
            )
        toolkit = choice.toolkit
        onnx_path, conversion, onnx_used_sha = self.graph(precision)
        folder = self.ctx.out / target.name
        folder.mkdir(parents=True)
        timing_cache = None
        if self.cfg.timing_cache and toolkit.name == "tensorrt":
            timing_cache = str(cache_dir() / "timing" / f"{toolkit.name}-{toolkit.version}" / f"sm{sm}.cache")
        request = {
            "onnx": str(onnx_path),
            "plugin_library": str(self.library),
            "plan": str(folder / PLAN),
            "sms": [sm],
            "profiles": self.profiles,
            "optimization_level": self.cfg.optimization_level,
            "workspace_mb": self.cfg.workspace_mb,
            "timing_cache": timing_cache,
            "embed_plugin": self.cfg.embed_plugin,
        }
        started = time.perf_counter()
        result = run_worker("build", request, toolkit, self.scratch / target.name)
        wall = time.perf_counter() - started
        if not result.get("ok"):
            raise StageError(
                f"engine: target {target.name} (sm{sm}, {toolkit.label}, {precision}) failed: {result.get('error')}"
            )
        blob = (folder / PLAN).read_bytes()
        described = plan_file.describe(blob)
        plugin_layers = [row["name"] for row in result["network_layers"] if row["type"].startswith("PLUGIN")]
        if sorted(plugin_layers) != sorted(self.attention):
            raise StageError(
                f"engine: target {target.name}: the network has plugin layers {plugin_layers}, the graph "
                f"has {ATTENTION_OP} nodes {self.attention}"
            )
        if toolkit.name == "tensorrt_rtx" and described.get("target_sms") != [sm]:
            raise StageError(
                f"engine: target {target.name}: the plan's SM mask says {described.get('target_sms')}, asked for sm{sm}"
            )
        parity = self.parity(target, toolkit, folder, precision)
        metadata = {
            "target": {"name": target.name, "sm": sm, "gpu": target.gpu},
            "toolkit": {
                "name": toolkit.name,
                "module": toolkit.module,
                "version": result["version"],
                "why": choice.reason,
            },
            "precision": precision,
            "target_sms": [sm],
            "profiles": self.profiles,
            "optimization_level": self.cfg.optimization_level,
            "workspace_mb": self.cfg.workspace_mb,
            "profiling_verbosity": result["profiling_verbosity"],
            "plan": {"file": PLAN, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), **described},
            "plugin_library": {
                "file": f"plugins/{self.plugins['library']}",
                "sha256": self.library_sha,
                "embedded_in_plan": bool(self.cfg.embed_plugin),
                "plugins": self.plugins["plugins"],
            },
            "onnx": {
                "surgery_sha256": self.onnx_sha,
                "built_from_sha256": onnx_used_sha,
                "conversions": conversion["conversions"]
                or ["none: the surgeried graph as is (int64 inputs stay INT64 bindings)"],
            },
            # int8 / fp8: the quantizer and its calibration users (seed, digest of the feeds); their
            # ranking figures against the fp32 model are in verify/manifest.json under ranking
            "quantization": conversion.get("quantization"),
            # the build's seconds live beside it in build-report.json: they are the one thing two cold
            # builds of the same inputs disagree on, and the build cache needs identical bytes here
            "build_report": BUILD_REPORT,
            "timing_cache": result["timing_cache"],
            "io": result["io"],
            "plugin_layers": plugin_layers,
            "network_layers": result["network_layers"],
            "parity": parity,
            "runtime": runtime_note(toolkit, sm, self.cfg.embed_plugin),
            "warnings": [w for w in result["warnings"] if "Int64 binding" not in w],
        }
        (folder / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
        timings = {
            "build_seconds": result["build_seconds"],
            "parse_seconds": result["parse_seconds"],
            "worker_seconds": round(wall, 3),
            "toolkit": toolkit.label,
            "target_sms": [sm],
        }
        (folder / BUILD_REPORT).write_text(json.dumps(timings, indent=1) + "\n")
        self.ctx.log(
            f"engine: {target.name}: {toolkit.label} sm{sm} {precision}: {len(blob) / 2**20:.1f} MiB in "
            f"{result['build_seconds']:.2f}s (worker {wall:.1f}s), {len(plugin_layers)} plugin layers"
        )
        return {
            "name": target.name,
            "sm": sm,
            "gpu": target.gpu,
            "precision": precision,
            "status": "built",
            "toolkit": toolkit.name,
            "toolkit_version": result["version"],
            "plan": f"{target.name}/{PLAN}",
            "metadata": f"{target.name}/{METADATA}",
            "plan_sha256": metadata["plan"]["sha256"],
            "parity": parity["status"],
        }

    def parity(self, target: EngineTarget, toolkit: Toolkit, folder: Path, precision: str) -> dict[str, Any]:
        gpu = runnable_here(toolkit, target.compute_capability)
        if gpu is None:
            return {
                "status": "not measured",
                "reason": f"this host has no sm{target.compute_capability} GPU to run the engine on; parity is "
                f"measured by `grc build` on such a host with {toolkit.name} installed",
            }
        profile = self.profiles[0]
        feeds = parity_feeds(self.onnx, profile["users"][1], profile["tokens"][1], self.ctx.spec.model.max_candidates)
        scratch = self.scratch / target.name
        np.savez(scratch / "feeds.npz", **feeds)  # type: ignore[arg-type]
        request = {
            "plan": str(folder / PLAN),
            "plugin_library": str(self.library),
            "onnx": str(self.onnx),
            "inputs": str(scratch / "feeds.npz"),
            "outputs": str(scratch / "outputs.npz"),
        }
        result = run_worker("parity", request, toolkit, scratch)
        if not result.get("ok"):
            raise StageError(f"engine: parity run of {target.name} on {gpu.name} failed: {result.get('error')}")
        outputs = np.load(scratch / "outputs.npz")
        tol = self.cfg.tolerance_of(precision)
        names = sorted({k.split("/", 1)[1] for k in outputs.files})
        figures = [
            compare(
                f"engine:{target.name}",
                f"{profile['users'][1]}u x {profile['tokens'][1]}t",
                name,
                outputs[f"engine/{name}"],
                outputs[f"onnxrt/{name}"],
                tol,
            )
            for name in names
        ]
        table = format_figures(figures)
        self.ctx.console.print(table)
        if not all(f.ok for f in figures):
            raise StageError(f"engine: {target.name} differs from onnxruntime beyond engine.parity:\n{table}")
        return {
            "status": "passed",
            "gpu": gpu.name,
            "via": "polygraphy Comparator (TrtRunner vs onnxruntime)",
            "figures": [f.as_dict() for f in figures],
        }


def parity_feeds(onnx_path: Path, users: int, tokens: int, max_candidates: int) -> dict[str, np.ndarray]:
    """Valid padded requests: one full-length user, the rest shorter, 1..max_candidates candidates."""
    rng = np.random.default_rng(PARITY_SEED)
    model = onnx.load(str(onnx_path), load_external_data=False)
    dim = next(i.type.tensor_type.shape.dim[-1].dim_value for i in model.graph.input if i.name == "tokens")
    tokens = max(tokens, 2)
    lengths = rng.integers(max(2, tokens // 2), tokens + 1, size=users)
    lengths[0] = tokens
    candidates = np.array([rng.integers(1, min(max_candidates, int(n) - 1) + 1) for n in lengths])
    stamps = np.cumsum(rng.integers(0, 5000, size=(users, tokens)), axis=1) + 1_700_000_000
    return {
        "tokens": rng.standard_normal((users, tokens, dim)).astype(np.float32),
        "lengths": lengths.astype(np.int64),
        "num_candidates": candidates.astype(np.int64),
        "timestamps": stamps.astype(np.int64),
    }


def runtime_note(toolkit: Toolkit, sm: int, embedded: bool) -> str:
    plugin = (
        "the plugin library is inside the plan (set engine_host_code_allowed on the runtime)"
        if embedded
        else "load plugins/libgrc_plugins.so into the plugin registry before deserializing"
    )
    if toolkit.name == "tensorrt_rtx":
        return (
            f"TensorRT-RTX {toolkit.version.split('.')[0]}.x runtime on an sm{sm} GPU; kernels are JIT-compiled "
            f"there at first load (keep a runtime cache); {plugin}. Not loadable by full TensorRT."
        )
    return f"TensorRT {toolkit.version} runtime on an sm{sm} GPU (the same TensorRT version); {plugin}."


def run(ctx: Context) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="grc-engine-") as tmp:
        builder = Builder(ctx, Path(tmp))
        entries = [builder.build(target) for target in ctx.spec.engine.targets]
    _print_table(ctx, entries)
    return {
        "targets": entries,
        "built": [e["name"] for e in entries if e["status"] == "built"],
        "skipped": {e["name"]: e["reason"] for e in entries if e["status"] == "skipped"},
        "profiles": builder.profiles,
        "onnx_sha256": builder.onnx_sha,
        "plugin_library_sha256": builder.library_sha,
        # file -> digest, the manifests' convention: the build cache takes these instead of hashing again
        "sha256": {f"{e['name']}/{PLAN}": e["plan_sha256"] for e in entries if e["status"] == "built"},
    }


def _print_table(ctx: Context, entries: list[dict[str, Any]]) -> None:
    table = Table(title="engines", show_edge=False)
    for col in ("target", "sm", "precision", "toolkit", "status", "parity / why skipped"):
        table.add_column(col)
    for e in entries:
        built = e["status"] == "built"
        why = e["parity"] if built else e["reason"].split(":")[0] + " (reason in the manifest)"
        table.add_row(
            e["name"],
            f"sm{e['sm']}",
            e["precision"],
            f"{e['toolkit']} {e['toolkit_version']}" if built else "-",
            e["status"],
            Text(why),
        )
    ctx.console.print(table)


STAGE = Stage(
    name="engine",
    output="engines",
    # the TensorRT fields one by one, not all of `engine`: engine.aoti (AOTInductor) must not rebuild these plans
    reads=(
        *(
            f"engine.{f}"
            for f in (
                "targets",
                "precision",
                "profiles",
                "optimization_level",
                "workspace_mb",
                "timing_cache",
                "embed_plugin",
                "parity",
            )
        ),
        "model.hstu.max_seq_len",
        "model.max_candidates",
    ),
    inputs=("surgery", "plugins"),
    # int8 / fp8: their Q/DQ graphs, and verify, whose ranking gates they must pass first (figures copied)
    optional_inputs=lambda spec: ("quantize", "verify") if quantized_precisions(spec) else (),
    run=run,
    toolkits=(*TOOLKIT_DISTRIBUTIONS, "onnx"),
    code=("grc/engine/worker.py",),  # run as a subprocess, so the import scan does not see it
    doc="TensorRT / TensorRT-RTX engine per target (plugin layers for grc::HSTUAttention) + metadata",
    enabled=lambda spec: bool(spec.engine.targets),
    # which toolkit builds a target (full TensorRT needs that GPU here) and whether parity is measured
    # depend on this host's GPUs: a CPU host's "skipped" / "not measured" must not be restored on a GPU host
    host_gpu=lambda spec: bool(spec.engine.targets),
)
