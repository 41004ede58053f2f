"""The only code that imports a TensorRT module: ``python -m grc.engine.worker MODE request.json``.

Modes: ``build`` (ONNX -> plan + build info), ``plugin-info`` (load the plugin library, list its
creator's fields), ``inspect`` (engine inspector; needs a GPU), ``parity`` (engine vs onnxruntime
through polygraphy; needs a GPU the engine targets). The request names the toolkit module; the
result is written to ``request["result"]`` as JSON, and the exit status is 0 only on success.
Runs in its own process: see ``grc.engine.toolkits.worker_env`` for why.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from grc.engine import PLUGIN

USERS_AXIS, TOKENS_AXIS = 0, 1  # the padded layout: [users, tokens, ...]


def _trt(request: dict[str, Any]) -> Any:
    return importlib.import_module(request["module"])


def _logger(trt: Any, sink: list[str]) -> Any:
    class Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            # never raise out of a callback from C++: that aborts the process
            try:
                if severity <= trt.ILogger.Severity.WARNING:
                    sink.append(f"{severity.name}: {msg}")
                    print(f"[{severity.name}] {msg}", file=sys.stderr)
            except Exception:
                pass

    return Logger()


def _load_plugin(trt: Any, library: str | None) -> dict[str, Any]:
    registry = trt.get_plugin_registry()
    if library and registry.load_library(library) is None:
        raise RuntimeError(f"the plugin registry could not load {library}")
    creator = registry.get_creator(*PLUGIN)
    if creator is None:
        raise RuntimeError(f"no plugin creator {PLUGIN[0]} version {PLUGIN[1]} namespace {PLUGIN[2]} is registered")
    return {
        "name": PLUGIN[0],
        "version": PLUGIN[1],
        "namespace": PLUGIN[2],
        "fields": [[f.name, str(f.type).split(".")[-1]] for f in creator.field_names],
    }


def _dtype(t: Any) -> str:
    return str(t).split(".")[-1].lower()


def _layers(trt: Any, net: Any) -> list[dict[str, Any]]:
    rows = []
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        row: dict[str, Any] = {
            "name": layer.name,
            "type": str(layer.type).split(".")[-1],
            "inputs": [
                [t.name, _dtype(t.dtype)]
                for t in (layer.get_input(j) for j in range(layer.num_inputs))
                if t is not None
            ],
            "outputs": [[t.name, _dtype(t.dtype)] for t in (layer.get_output(j) for j in range(layer.num_outputs))],
        }
        if "PLUGIN" in row["type"]:
            row["plugin"] = PLUGIN[0] if PLUGIN[0] in layer.name else None
        rows.append(row)
    return rows


def _io(net: Any) -> dict[str, list[dict[str, Any]]]:
    def rows(tensors: list[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "dtype": _dtype(t.dtype), "shape": list(t.shape)} for t in tensors]

    return {
        "inputs": rows([net.get_input(i) for i in range(net.num_inputs)]),
        "outputs": rows([net.get_output(i) for i in range(net.num_outputs)]),
    }


def _profile_shapes(shape: list[int], users: list[int], tokens: list[int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of one input: dynamic axis 0 is users, axis 1 tokens; other axes must be static."""
    out = []
    for k in range(3):
        dims = []
        for axis, d in enumerate(shape):
            if d >= 0:
                dims.append(d)
            elif axis == USERS_AXIS:
                dims.append(users[k])
            elif axis == TOKENS_AXIS:
                dims.append(tokens[k])
            else:
                raise RuntimeError(f"dynamic axis {axis} of shape {shape} is neither users nor tokens")
        out.append(tuple(dims))
    return tuple(out)


def build(request: dict[str, Any]) -> dict[str, Any]:
    trt = _trt(request)
    warnings: list[str] = []
    logger = _logger(trt, warnings)
    plugin = _load_plugin(trt, request.get("plugin_library"))
    builder = trt.Builder(logger)
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # TensorRT-RTX networks are always strongly typed; full TensorRT needs the flag for the same semantics
    flags = 0 if request["toolkit"] == "tensorrt_rtx" or typed is None else 1 << int(typed)
    net = builder.create_network(flags)
    parser = trt.OnnxParser(net, logger)
    started = time.perf_counter()
    if not parser.parse_from_file(request["onnx"]):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("the ONNX parser rejected the graph:\n" + "\n".join(errors))
    parse_s = time.perf_counter() - started
    cfg = builder.create_builder_config()
    if request["toolkit"] == "tensorrt_rtx":
        sms = request["sms"]
        cfg.num_compute_capabilities = len(sms)
        for i, sm in enumerate(sms):
            if not cfg.set_compute_capability(getattr(trt.ComputeCapability, f"SM{sm}"), i):
                raise RuntimeError(f"set_compute_capability(SM{sm}) was refused")
    cfg.builder_optimization_level = int(request["optimization_level"])
    if request.get("workspace_mb"):
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(request["workspace_mb"]) << 20)
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # an inspector on a GPU can then list every layer
    if request.get("embed_plugin") and request.get("plugin_library"):
        cfg.plugins_to_serialize = [request["plugin_library"]]
    io = _io(net)
    for profile in request["profiles"]:
        prof = builder.create_optimization_profile()
        for tensor in io["inputs"]:
            lo, opt, hi = _profile_shapes(tensor["shape"], profile["users"], profile["tokens"])
            prof.set_shape(tensor["name"], lo, opt, hi)
        cfg.add_optimization_profile(prof)
    cache_path = request.get("timing_cache")
    timing: dict[str, Any] = {
        "used": False,
        "note": "engine.timing_cache is off"
        if request["toolkit"] == "tensorrt"
        else "timing-cache calls are no-ops in TensorRT-RTX (deprecated since 1.2)",
    }
    if cache_path and request["toolkit"] == "tensorrt":
        blob = Path(cache_path).read_bytes() if Path(cache_path).exists() else b""
        cache = cfg.create_timing_cache(blob)
        cfg.set_timing_cache(cache, ignore_mismatch=False)
        timing = {"used": True, "path": cache_path, "warm": bool(blob), "bytes_before": len(blob)}
    started = time.perf_counter()
    serialized = builder.build_serialized_network(net, cfg)
    build_s = time.perf_counter() - started
    if serialized is None:
        raise RuntimeError("build_serialized_network failed:\n" + "\n".join(warnings[-20:]))
    Path(request["plan"]).write_bytes(bytes(serialized))
    if timing["used"] and cache_path:
        data = bytes(cfg.get_timing_cache().serialize())
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{cache_path}.tmp")
        tmp.write_bytes(data)
        tmp.replace(cache_path)  # atomic: a concurrent build never reads half a cache
        timing["bytes_after"] = len(data)
    return {
        "toolkit": request["toolkit"],
        "module": request["module"],
        "version": trt.__version__,
        "parse_seconds": round(parse_s, 3),
        "build_seconds": round(build_s, 3),
        "plan_bytes": serialized.nbytes,
        "network_layers": _layers(trt, net),
        "io": io,
        "plugin": plugin,
        "timing_cache": timing,
        "profiling_verbosity": "DETAILED",
        "warnings": warnings,
    }


def plugin_info(request: dict[str, Any]) -> dict[str, Any]:
    trt = _trt(request)
    return {"version": trt.__version__, "plugin": _load_plugin(trt, request["plugin_library"])}


def _engine(trt: Any, request: dict[str, Any], logger: Any) -> Any:
    if request.get("plugin_library"):
        _load_plugin(trt, request["plugin_library"])
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = True  # plans built with embed_plugin carry the library
    engine = runtime.deserialize_cuda_engine(Path(request["plan"]).read_bytes())
    if engine is None:
        raise RuntimeError("deserialize_cuda_engine failed (a GPU the plan targets and the plugin library are needed)")
    return engine


def inspect(request: dict[str, Any]) -> dict[str, Any]:
    trt = _trt(request)
    warnings: list[str] = []
    engine = _engine(trt, request, _logger(trt, warnings))
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        row = {
            "name": name,
            "mode": str(engine.get_tensor_mode(name)).split(".")[-1],
            "dtype": _dtype(engine.get_tensor_dtype(name)),
            "shape": list(engine.get_tensor_shape(name)),
            "profiles": [],
        }
        if row["mode"] == "INPUT":
            for p in range(engine.num_optimization_profiles):
                row["profiles"].append([list(s) for s in engine.get_tensor_profile_shape(name, p)])
        io.append(row)
    return {
        "version": trt.__version__,
        "layers": layers,
        "io": io,
        "num_optimization_profiles": engine.num_optimization_profiles,
        "warnings": warnings,
    }


def parity(request: dict[str, Any]) -> dict[str, Any]:
    """Run the engine and onnxruntime (grc's session, which registers the HSTUAttention custom op)
    on the same feeds through polygraphy's Comparator; the caller applies the spec's tolerance."""
    import os

    import numpy as np

    if request["toolkit"] == "tensorrt_rtx":
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"  # before polygraphy imports its TensorRT backend
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator

    from grc.onnx.ort import session

    trt = _trt(request)
    engine = _engine(trt, request, _logger(trt, []))
    feeds = dict(np.load(request["inputs"]))
    runners = [TrtRunner(engine, name="engine"), OnnxrtRunner(lambda: session(Path(request["onnx"])), name="onnxrt")]
    results = Comparator.run(runners, data_loader=[feeds])
    arrays = {}
    for runner_name, iterations in results:
        for out_name, value in iterations[0].items():
            arrays[f"{runner_name}/{out_name}"] = np.asarray(value)
    np.savez(request["outputs"], **arrays)  # type: ignore[arg-type]
    return {"outputs": sorted(arrays)}


MODES = {"build": build, "plugin-info": plugin_info, "inspect": inspect, "parity": parity}


def main(argv: list[str]) -> int:
    mode, path = argv[0], Path(argv[1])
    request = json.loads(path.read_text())
    result_path = Path(request["result"])
    try:
        result = {"ok": True, **MODES[mode](request)}
    except Exception as exc:  # report it as data; the stage turns it into a StageError or a skip
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result_path.write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
