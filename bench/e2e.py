"""End-to-end dense-model benchmark: eager vs kernels vs torch.compile vs the AOTInductor package.

GPU (default; one process, one GPU, the same inputs for every mode):
    python bench/e2e.py --out e2e.json [--specs mtgr-small,mtgr-base] [--stage-check]
  modes: eager fp32 / eager bf16 (GRDense.forward_jagged, plain PyTorch reference ops), eager bf16
  padded (forward_padded: the exported ONNX's math), eager bf16 + Triton kernels (grc ops), the same
  CUDA-graphed, torch.compile (bf16, kernels, CUDA graph per shape), the AOTInductor package (bf16,
  kernels; built and parity-checked by grc.aoti.build, the aoti stage's code; also without graphs).
  Workloads: 1 user x (profile + 1000 history + 512 candidates) (latency) and 64 such users
  (throughput). Per mode: p50/p99 (CUDA events, one call per sample), users/s, peak memory, error
  vs the float64 reference, ratio to eager bf16; per workload the FLOP floor and byte floor.
  --stage-check also runs `grc build <hstu-tiny + engine.aoti> aoti` (the stage itself, cpu + cuda).
CPU (--cpu): eager (jagged reference, padded) vs onnxruntime on the exported ONNX vs the CPU
  AOTInductor package, hstu-tiny and mtgr-small dense graphs at a small batch.
Weights: the weights stage's seeded init, in memory (the embedding tables are not built: the
dense graph takes projected tokens [T, D]).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from grc.aoti.inputs import JaggedInputs, random_inputs, seeded_dense  # noqa: E402
from grc.spec.loader import load_spec  # noqa: E402
from grc.spec.schema import ModelConfig  # noqa: E402

WORKLOADS = {
    "latency": {"users": 1, "history": 1000, "candidates": 512},
    "throughput": {"users": 64, "history": 1000, "candidates": 512},
}
BASELINE = "eager_bf16"
EAGER_BF16 = ("eager_bf16", "eager_bf16_padded")
T0 = time.perf_counter()


# --------------------------------------------------------------------------- floors
def workload_floors(cfg: ModelConfig, inp: JaggedInputs, act_bytes: int = 2) -> dict[str, float]:
    """Matmul FLOPs (projections, heads, attention over unmasked pairs: 2*dqk + 2*dv per pair and
    head) and bytes: 'strict' = weights + inputs + outputs once; 'layer_io' = also each layer's
    unavoidable activation traffic when layers are separate kernels (x, uvqk, attention out)."""
    h = cfg.hstu
    d, lv, a, heads = cfg.d_model, h.linear_dim, h.attention_dim, h.num_heads
    tasks, hidden = len(cfg.tasks), cfg.head_hidden
    lengths = (inp.offsets[1:] - inp.offsets[:-1]).tolist()
    ncand = inp.num_candidates.tolist()
    tokens = sum(lengths)
    pairs = 0
    for n, c in zip(lengths, ncand, strict=True):
        ctx = n - c
        hist_pairs = ctx * (ctx + 1) // 2 if h.history_mask == "causal" else ctx * ctx
        pairs += hist_pairs + c * (ctx + 1)
    proj = tokens * (2 * d * (2 * lv + 2 * a) + 2 * lv * d) * h.num_layers
    head = tokens * (2 * d * hidden * tasks + 2 * hidden * tasks)
    attn = pairs * heads * (2 * h.head_qk + 2 * h.head_v) * h.num_layers
    weights = sum(p for p in _dense_param_count(cfg)) * act_bytes
    io = tokens * (d * act_bytes + 8) + tokens * tasks * act_bytes + (2 * len(lengths) + 1) * 8
    layer_io = h.num_layers * tokens * act_bytes * (2 * d + 2 * (2 * lv + 2 * a) + 2 * lv)
    return {
        "tokens": tokens,
        "attention_pairs_per_head_layer": pairs,
        "flops_projections": proj,
        "flops_heads": head,
        "flops_attention": attn,
        "flops": proj + head + attn,
        "bytes_strict": weights + io,
        "bytes_layer_io": weights + io + layer_io,
    }


def _dense_param_count(cfg: ModelConfig) -> list[int]:
    from grc.model.gr import GRDense

    with torch.device("meta"):
        return [p.numel() for p in GRDense(cfg).parameters()]


# --------------------------------------------------------------------------- timing
def time_cuda(fn: Callable[[], Any], budget_s: float, min_iters: int = 10, max_iters: int = 400) -> list[float]:
    """Milliseconds per call, one CUDA-event pair per call (the call's whole latency)."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - started < budget_s):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return times


def time_cpu(fn: Callable[[], Any], budget_s: float, min_iters: int = 5, max_iters: int = 200) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def stats(times: list[float], users: int) -> dict[str, float]:
    ordered = sorted(times)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    p50 = pct(0.5)
    return {
        "p50_ms": round(p50, 4),
        "p99_ms": round(pct(0.99), 4),
        "min_ms": round(ordered[0], 4),
        "samples": len(times),
        "users_per_s": round(users / (p50 / 1e3), 1),
    }


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.detach().double().cpu(), expected.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).abs().max() / b.abs().max())


def ceilings() -> dict[str, float]:
    """Measured bf16 matmul rate and device-to-device copy bandwidth (the floors' denominators)."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    cp = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    out = {"bf16_matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_tbps": 2 * x.numel() * 2 / (cp * 1e-3) / 1e12}
    return {k: round(v, 1 if "tflops" in k else 3) for k, v in out.items()}


# --------------------------------------------------------------------------- GPU
class Recorder:
    def __init__(self, path: Path | None, head: dict[str, Any]):
        self.path = path
        self.data = {**head, "specs": {}}

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def run_gpu_spec(name: str, rec: Recorder, args: argparse.Namespace) -> None:
    from grc.aoti.build import compile_target, verify_target
    from grc.aoti.model import JaggedDense, time_bucket_note
    from grc.aoti.runtime import load
    from grc.model.jagged import lengths_of, to_jagged, to_padded

    spec = load_spec(REPO / "specs" / f"{name}.yaml").spec
    cfg = spec.model
    dense32 = seeded_dense(cfg).cuda()
    dense16 = copy.deepcopy(dense32).to(torch.bfloat16)
    dense64 = copy.deepcopy(dense32).to("cpu", torch.float64)
    out: dict[str, Any] = {
        "model": {
            "d_model": cfg.d_model,
            "layers": cfg.hstu.num_layers,
            "heads": cfg.hstu.num_heads,
            "attention_dim": cfg.hstu.attention_dim,
            "linear_dim": cfg.hstu.linear_dim,
            "time_buckets": cfg.hstu.time_buckets,
            "dense_parameters": sum(_dense_param_count(cfg)),
            "kernel_time_buckets": time_bucket_note(cfg.hstu.time_buckets),
        },
        "workloads": {},
        "modes": {},
        "errors": {},
    }
    rec.data["specs"][name] = out
    gen = torch.Generator().manual_seed(2024)
    inputs = {}
    for wl, shape in WORKLOADS.items():
        cpu_inp = random_inputs(cfg, shape["users"], shape["history"], shape["candidates"], gen, ragged=False)
        cpu_inp.tokens = cpu_inp.tokens.to(torch.bfloat16).float()  # every mode sees the same values
        inputs[wl] = cpu_inp
        floors = workload_floors(cfg, cpu_inp)
        floors["flop_floor_ms"] = floors["flops"] / (rec.data["ceilings"]["bf16_matmul_tflops"] * 1e12) * 1e3
        floors["byte_floor_ms"] = floors["bytes_strict"] / (rec.data["ceilings"]["copy_tbps"] * 1e12) * 1e3
        floors["layer_io_floor_ms"] = floors["bytes_layer_io"] / (rec.data["ceilings"]["copy_tbps"] * 1e12) * 1e3
        out["workloads"][wl] = {**shape, "profile_tokens": len(cfg.profile), **floors}
    lat = inputs["latency"]
    with torch.no_grad():
        reference = dense64.forward_jagged(*lat.to("cpu", torch.float64).args(), impl="pytorch")
    gpu_in = {
        wl: {"fp32": inp.to("cuda", torch.float32), "bf16": inp.to("cuda", torch.bfloat16)}
        for wl, inp in inputs.items()
    }

    def padded(inp: JaggedInputs) -> tuple[torch.Tensor, ...]:
        lengths = lengths_of(inp.offsets)
        n = int(lengths.max())
        return (
            to_padded(inp.tokens, inp.offsets, n),
            lengths,
            inp.num_candidates,
            to_padded(inp.timestamps, inp.offsets, n),
        )

    def padded_mode(inp: JaggedInputs) -> Callable[[], torch.Tensor]:
        args_p = padded(inp)
        return lambda: dense16.forward_padded(*args_p)

    modes: dict[str, tuple[str, Callable[[str], Callable[[], torch.Tensor]]]] = {}
    modes["eager_fp32"] = (
        "GRDense.forward_jagged fp32, reference ops",
        lambda wl: lambda a=gpu_in[wl]["fp32"]: dense32.forward_jagged(*a.args(), impl="pytorch"),
    )
    modes["eager_bf16"] = (
        "GRDense.forward_jagged bf16, reference ops (the baseline)",
        lambda wl: lambda a=gpu_in[wl]["bf16"]: dense16.forward_jagged(*a.args(), impl="pytorch"),
    )
    modes["eager_bf16_padded"] = (
        "GRDense.forward_padded bf16 (the exported ONNX's math, dense masks)",
        lambda wl: padded_mode(gpu_in[wl]["bf16"]),
    )
    kern = JaggedDense(dense16, "triton").eval()
    modes["eager_bf16_triton"] = (
        "JaggedDense bf16, grc Triton ops, eager",
        lambda wl: lambda a=gpu_in[wl]["bf16"]: kern(*a.args()),
    )
    modes["eager_bf16_triton_graph"] = ("the same, CUDA graph per shape", lambda wl: _graphed(kern, gpu_in[wl]["bf16"]))
    compiled = {}

    def compiled_mode(wl: str) -> Callable[[], torch.Tensor]:
        if "fn" not in compiled:  # plain torch.compile, no Inductor settings: what a user would write
            compiled["fn"] = torch.compile(JaggedDense(dense16, "triton").eval(), dynamic=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled["fn"](*gpu_in[wl]["bf16"].args())
        torch.cuda.synchronize()
        out.setdefault("compile_seconds", {})[f"torch.compile:{wl}"] = round(time.perf_counter() - t0, 1)
        return _graphed(compiled["fn"], gpu_in[wl]["bf16"])

    package: dict[str, Any] = {}

    def aoti(wl: str, graphs: bool) -> Callable[[], torch.Tensor]:
        if "failed" in package:  # build once; a failure is not retried for every mode and workload
            raise RuntimeError(f"the package is unusable (see the first aoti error): {package['failed'][:300]}")
        try:
            return _aoti(wl, graphs)
        except Exception as exc:
            package["failed"] = f"{type(exc).__name__}: {exc}"
            raise

    def _aoti(wl: str, graphs: bool) -> Callable[[], torch.Tensor]:
        if "run" not in package:
            folder = Path(tempfile.mkdtemp(prefix="grc-aoti-")) / "cuda"
            log = lambda m: print(f"  {m}", flush=True)  # noqa: E731
            compiled = compile_target(dense32, "cuda", "bfloat16", folder, log)
            if args.out is not None and (folder / "model.pt2").stat().st_size < 15 << 20:
                shutil.copy(folder / "model.pt2", args.out.parent / f"aoti-{name}.pt2")  # for inspection
            # load and run the package in fresh processes first: a host-side crash there (seen:
            # SIGSEGV right after the compile) must not take this process's results with it
            # AOTInductor's single-threaded runner first: it is the one meant for CUDA-graph capture
            # (the default runner's capture failed on the H200: "operation failed due to a previous
            # error during capture")
            probes: dict[Any, Any] = {True: probe_package(name, folder / "model.pt2", True)}
            graph_ok = lambda p: str(p.get("graph", "")).startswith("ok")  # noqa: E731  "ok graph_rel_err=..."
            if not graph_ok(probes[True]):
                probes[False] = probe_package(name, folder / "model.pt2", False)
            if not any("rel_err_vs_eager_kernels" in p for p in probes.values()):  # the .pt2 loader or the model?
                probes["so"] = probe_package(name, folder / "model.pt2", False, {"GRC_PROBE_SO": "1"})
            out["aoti_probes"] = probes
            rec.save()
            ran = [st for st, p in probes.items() if st in (False, True) and "rel_err_vs_eager_kernels" in p]
            if not ran:
                raise RuntimeError(f"the package crashed when loaded and run: {probes}")
            usable = sorted(ran, key=lambda st: not graph_ok(probes[st]))  # graph-capable first
            package["graph_ok"] = graph_ok(probes[usable[0]])
            shapes = [(s.users, s.history, s.candidates) for s in spec.verify.shapes]
            provenance = {"spec": name, "weights": "seeded init in memory (bench)"}
            entry = verify_target(dense32, compiled, folder, spec.engine.tolerance_of("bf16"), shapes, 20240501,
                                  provenance, log, single_threaded=usable[0])  # fmt: skip
            meta = json.loads((folder / "metadata.json").read_text())
            out["aoti_package"] = {
                "entry": entry,
                "build_seconds": meta["build_seconds"],
                "parity": meta["parity"],
                "bytes": meta["package"]["bytes"],
                "toolkit": meta["toolkit"],
                "single_threaded": usable[0],
            }
            if args.out is not None:
                (args.out.parent / f"aoti-{name}-metadata.json").write_text(json.dumps(meta, indent=1))
            package["run"] = load(folder / "model.pt2", "cuda", single_threaded=usable[0])
        a = gpu_in[wl]["bf16"]
        if graphs:
            if not package["graph_ok"]:
                raise RuntimeError(f"CUDA-graph capture of the package failed in the probe: {out['aoti_probes']}")
            return _graphed(package["run"], a)
        return lambda: package["run"](*a.args())

    modes["aoti_bf16_nograph"] = ("AOTInductor package bf16, grc Triton ops, no CUDA graph", lambda wl: aoti(wl, False))
    modes["aoti_bf16"] = ("the same package, CUDA graph per shape", lambda wl: aoti(wl, True))
    # last: a device-side fault would leave the CUDA context unusable for every later mode
    modes["compile_bf16_triton"] = ("torch.compile(dynamic) bf16, grc Triton ops, CUDA graph per shape", compiled_mode)

    # the package right after the eager baselines: its compile and probes take minutes, and a
    # child that runs out of time must still have measured it
    first = ("eager_fp32", "eager_bf16", "eager_bf16_padded", "aoti_bf16_nograph", "aoti_bf16")
    modes = {m: modes[m] for m in (*first, *(m for m in modes if m not in first))}
    skip = set(args.skip.split(",")) if args.skip else set()
    for mode, (desc, make) in modes.items():
        if mode in skip:
            continue
        out["modes"][mode] = {"what": desc}
        for wl in WORKLOADS:
            print(f"[{name}] {mode} {wl} (t={time.perf_counter() - T0:.0f}s)", flush=True)
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    fn = make(wl)
                    result = fn()
                    torch.cuda.synchronize()
                    times = time_cuda(fn, args.budget)
                row = {
                    **stats(times, WORKLOADS[wl]["users"]),
                    "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                    "peak_over_start_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
                }
                if wl == "latency":
                    res = result
                    if mode == "eager_bf16_padded":
                        res = to_jagged(result, gpu_in[wl]["bf16"].offsets)
                    row["rel_err_vs_fp64"] = rel_error(res, reference)
                out["modes"][mode][wl] = row
                print(
                    f"    p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  {row['users_per_s']:.0f} users/s",
                    flush=True,
                )
                del fn, result
            except Exception as exc:  # one broken mode must not lose the others
                out["errors"][f"{mode}:{wl}"] = f"{type(exc).__name__}: {exc}"[:2000]
                traceback.print_exc()
            rec.save()
        _graphs.clear()
    for wl in WORKLOADS:
        base = out["modes"].get(BASELINE, {}).get(wl)
        # the stronger of the two eager bf16 forms (the jagged reference loops over users in Python)
        eager = [r[wl]["p50_ms"] for m, r in out["modes"].items() if m in EAGER_BF16 and wl in r]
        for rows in out["modes"].values():
            row = rows.get(wl)
            if row and base:
                row["speedup_vs_eager_bf16"] = round(base["p50_ms"] / row["p50_ms"], 2)
            if row and eager:
                row["speedup_vs_best_eager_bf16"] = round(min(eager) / row["p50_ms"], 2)
            if row:
                w = out["workloads"][wl]
                row["flop_floor_fraction"] = round(w["flop_floor_ms"] / row["p50_ms"], 4)
                row["byte_floor_fraction"] = round(w["byte_floor_ms"] / row["p50_ms"], 4)
    rec.save()


_graphs: list[Any] = []


def _graphed(fn: Callable[..., torch.Tensor], inp: JaggedInputs) -> Callable[[], torch.Tensor]:
    from grc.aoti.runtime import CudaGraphRunner

    runner = CudaGraphRunner(fn, max_graphs=1)
    _graphs.append(runner)
    args = inp.args()
    runner(*args)
    return lambda: runner(*args)


def probe_package(
    spec_name: str, package: Path, single_threaded: bool, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Load + run + CUDA-graph the package in a fresh process (python -X faulthandler)."""
    cmd = [sys.executable, "-X", "faulthandler", __file__, "--probe", spec_name, str(package)]
    cmd.append(str(int(single_threaded)))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"rc": "timeout"}
    result: dict[str, Any] = {"rc": done.returncode}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
    for ln in lines:
        key, _, value = ln[len("PROBE ") :].partition("=")
        result[key] = value
    if done.returncode != 0:
        result["tail"] = (done.stdout + done.stderr)[-2500:]
    print(f"  probe single_threaded={single_threaded}: {json.dumps(result)[:3000]}", flush=True)
    return result


def run_probe(spec_name: str, package: Path, single_threaded: bool) -> None:
    from grc.aoti.model import JaggedDense
    from grc.aoti.runtime import CudaGraphRunner, load, load_model_so

    cfg = load_spec(REPO / "specs" / f"{spec_name}.yaml").spec.model
    dense = seeded_dense(cfg).cuda().to(torch.bfloat16)
    inp = random_inputs(cfg, 3, 50, 8, torch.Generator().manual_seed(5)).to("cuda", torch.bfloat16)
    print("PROBE stage=load", flush=True)
    if os.environ.get("GRC_PROBE_SO"):  # bypass the .pt2 loader: the extracted model .so, run directly
        run = load_model_so(package)
    else:
        run = load(package, "cuda", single_threaded=single_threaded)
    print("PROBE stage=run", flush=True)
    with torch.no_grad():
        got = run(*inp.args())
        torch.cuda.synchronize()
        want = JaggedDense(dense, "triton")(*inp.args())
        print(f"PROBE rel_err_vs_eager_kernels={rel_error(got, want.float().cpu()):.3e}", flush=True)
        print("PROBE stage=graph", flush=True)
        try:
            graphed = CudaGraphRunner(run, max_graphs=1)
            g = graphed(*inp.args())
            torch.cuda.synchronize()
            print(f"PROBE graph=ok graph_rel_err={rel_error(g, want.float().cpu()):.3e}", flush=True)
        except Exception as exc:
            print(f"PROBE graph=failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def stage_check(out_dir: Path | None) -> dict[str, Any]:
    """The aoti stage itself on hstu-tiny with engine.aoti enabled, targets cpu + cuda: `grc build`,
    or, where the CLI cannot start (a serving dependency missing), the weights and aoti stages'
    run functions called directly."""
    work = Path(tempfile.mkdtemp(prefix="grc-aoti-stage-"))
    spec = work / "hstu-tiny-aoti.yaml"
    spec.write_text(
        f"extends: {REPO / 'specs' / 'hstu-tiny.yaml'}\nengine:\n  aoti: {{enabled: true, targets: [cpu, cuda]}}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "grc.cli", "build", str(spec), "aoti", "--artifacts", str(work / "art"), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    result: dict[str, Any] = {
        "via": "grc build",
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "log_tail": (done.stdout + done.stderr)[-3000:],
    }
    manifest = work / "art" / "hstu-tiny" / "engines-aoti" / "manifest.json"
    if not manifest.exists():  # in a fresh process too: a fault here must not touch the benchmark's CUDA context
        result["cli_error"] = result.pop("log_tail")[-800:]
        direct = subprocess.run(
            [sys.executable, __file__, "--stage-direct", str(spec), str(work / "direct")],
            capture_output=True,
            text=True,
            env=env,
        )
        result["via"] = f"weights + aoti stage run() called directly (`grc build`: no manifest, rc {done.returncode})"
        result["rc"] = direct.returncode
        result["log_tail"] = (direct.stdout + direct.stderr)[-3000:]
        manifest = work / "direct" / "engines-aoti" / "manifest.json"
    if manifest.exists():
        result["manifest"] = json.loads(manifest.read_text())
        meta = manifest.parent / "cuda" / "metadata.json"
        if meta.exists():
            m = json.loads(meta.read_text())
            keys = ("target", "dtype", "toolkit", "build_seconds", "parity", "custom_ops", "package")
            result["cuda_metadata"] = {k: m[k] for k in keys}
    print(json.dumps({k: v for k, v in result.items() if k != "manifest"}, indent=1)[-2500:], flush=True)
    return result


def _stage_direct(spec_path: Path, root: Path) -> dict[str, Any]:
    from rich.console import Console

    try:
        from grc.stages import aoti, weights
    except (ImportError, RuntimeError):  # another stage's serving dependency is missing here: skip grc.stages'
        import types  # __init__ (the list of all stages), load only the two stage modules this needs

        stages_pkg = types.ModuleType("grc.stages")
        stages_pkg.__path__ = [str(REPO / "grc" / "stages")]
        sys.modules["grc.stages"] = stages_pkg
        from grc.stages import aoti, weights
    from grc.stages.base import MANIFEST, Context

    loaded = load_spec(spec_path)
    t0 = time.perf_counter()
    try:
        for stage, inputs in ((weights, {}), (aoti, {"weights": root / "weights"})):
            out = root / stage.STAGE.output
            out.mkdir(parents=True)
            manifest = stage.STAGE.run(Context(loaded=loaded, out=out, inputs=inputs, console=Console()))
            (out / MANIFEST).write_text(json.dumps({"stage": stage.STAGE.name, **manifest}, indent=1))
        return {"via": "weights + aoti stage run() called directly", "rc": 0, "seconds": time.perf_counter() - t0}
    except Exception as exc:
        traceback.print_exc()
        return {"via": "stage run() called directly", "rc": 1, "error": f"{type(exc).__name__}: {exc}"[:3000]}


def gpu_main(args: argparse.Namespace) -> None:
    """One spec (--child): every mode in this process. Several specs or --stage-check: each spec
    in a child process of its own (a device fault in one cannot take the others down), merged."""
    head = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or _commit(),
        "device": torch.cuda.get_device_name(),
        "capability": "sm{}{}".format(*torch.cuda.get_device_capability()),
        "host": f"{platform.system()} {platform.release()} ({os.cpu_count()} cores)",  # gVisor or Firecracker
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": __import__("triton").__version__,
            "python": platform.python_version(),
        },
        "timing": f"CUDA events around each call, >= 10 calls and ~{args.budget}s per mode, after warm-up; "
        "p50/p99 over the calls; users/s = users / p50. One process per spec: every mode of a spec runs "
        "in that process on the same inputs",
    }
    specs = [s for s in args.specs.split(",") if s]
    if args.child:
        rec = Recorder(args.out, head)
        rec.data["ceilings"] = ceilings()
        torch.cuda.empty_cache()
        print("ceilings", rec.data["ceilings"], flush=True)
        rec.save()
        for name in specs:
            run_gpu_spec(name, rec, args)
        print_table(rec.data)
        return
    merged: dict[str, Any] = {**head, "specs": {}, "children": {}}
    work = Path(tempfile.mkdtemp(prefix="grc-e2e-"))
    for name in specs:
        part = work / f"{name}.json"
        cmd = [sys.executable, __file__, "--child", "--specs", name, "--out", str(part), "--budget", str(args.budget)]
        cmd += ["--commit", merged["commit"]] + (["--skip", args.skip] if args.skip else [])
        left = args.deadline - (time.perf_counter() - T0)
        share = left - 90 * args.stage_check if name == specs[-1] else left / (len(specs) - specs.index(name)) + 30
        try:
            rc: int | str = subprocess.run(cmd, timeout=max(30.0, share)).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {share:.0f}s"
        merged["children"][name] = rc
        if part.exists():
            data = json.loads(part.read_text())
            merged.setdefault("ceilings", data.get("ceilings"))
            merged["specs"].update(data["specs"])
            for spec_data in data["specs"].values():
                spec_data["ceilings"] = data.get("ceilings")
        if args.out is not None:
            args.out.write_text(json.dumps(merged, indent=1) + "\n")
    if args.stage_check and args.deadline - (time.perf_counter() - T0) > 45:
        merged["stage_check"] = stage_check(args.out)
    elif args.stage_check:
        merged["stage_check"] = {"rc": "not run: no time left in the call"}
    if args.out is not None:
        args.out.write_text(json.dumps(merged, indent=1) + "\n")
    print_table(merged)


def print_table(data: dict[str, Any]) -> None:
    print(f"\n{data.get('device')}  {data.get('ceilings')}")
    for name, s in data["specs"].items():
        for wl, w in s["workloads"].items():
            print(
                f"{name} {wl}: floors flop {w['flop_floor_ms']:.3f} ms, bytes {w['byte_floor_ms']:.4f} ms "
                f"(layer io {w['layer_io_floor_ms']:.3f})"
            )
            for mode, rows in s["modes"].items():
                r = rows.get(wl)
                if r:
                    print(
                        f"  {mode:<24} p50 {r['p50_ms']:9.3f}  p99 {r['p99_ms']:9.3f}  {r['users_per_s']:9.1f} u/s "
                        f" x{r.get('speedup_vs_eager_bf16', 0):6.2f} (best eager x"
                        f"{r.get('speedup_vs_best_eager_bf16', 0):6.2f})  {r['peak_mib']:8.0f} MiB "
                        f"err {r.get('rel_err_vs_fp64', float('nan')):.1e}"
                    )
        for k, v in s["errors"].items():
            print(f"  ERROR {k}: {v[:300]}")


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


# --------------------------------------------------------------------------- CPU
CPU_CASES = {
    "hstu-tiny": {"users": 4, "history": 40, "candidates": 16},
    "mtgr-small": {"users": 2, "history": 100, "candidates": 32},
}


def cpu_modes(dense: Any, inp: JaggedInputs, feeds: dict[str, Any], sess: Any, aoti_run: Callable[..., Any]) -> dict:
    """Each CPU mode as a call returning jagged scores [T, tasks]."""
    from grc.model.jagged import to_jagged

    padded = tuple(torch.from_numpy(feeds[k]) for k in ("tokens", "lengths", "num_candidates", "timestamps"))
    return {
        "eager_jagged_fp32": lambda: dense.forward_jagged(*inp.args()),
        "eager_padded_fp32": lambda: to_jagged(dense.forward_padded(*padded), inp.offsets),
        "onnxruntime_fp32": lambda: to_jagged(torch.from_numpy(sess.run(["scores"], feeds)[0]), inp.offsets),
        "aoti_cpu_fp32": lambda: aoti_run(*inp.args()),
    }


def cpu_main(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    from grc.aoti.build import build_target
    from grc.aoti.runtime import load
    from grc.model.jagged import lengths_of, to_padded
    from grc.onnx_export import export_onnx

    torch.set_num_threads(args.threads)
    data: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "commit": args.commit or _commit(),
        "device": f"CPU: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads used",
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "timing": "perf_counter per call, median/p99 over >= 5 calls and ~2 s per mode",
        "specs": {},
    }
    for name, shape in CPU_CASES.items():
        spec = load_spec(REPO / "specs" / f"{name}.yaml").spec
        cfg = spec.model
        dense = seeded_dense(cfg)
        inp = random_inputs(
            cfg, shape["users"], shape["history"], shape["candidates"], torch.Generator().manual_seed(3), ragged=False
        )
        lengths = lengths_of(inp.offsets)
        n = int(lengths.max())
        feeds = {
            "tokens": to_padded(inp.tokens, inp.offsets, n).numpy(),
            "lengths": lengths.numpy(),
            "num_candidates": inp.num_candidates.numpy(),
            "timestamps": to_padded(inp.timestamps, inp.offsets, n).numpy(),
        }
        work = Path(tempfile.mkdtemp(prefix="grc-e2e-cpu-"))
        t0 = time.perf_counter()
        export_onnx(dense, work / "model.onnx", spec.export.opset, 2, 2 << 30)
        export_s = time.perf_counter() - t0
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(work / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        shapes = [(s.users, s.history, s.candidates) for s in spec.verify.shapes]
        entry = build_target(
            dense, "cpu", "float32", work / "cpu", spec.verify.export, shapes, 20240501, {"spec": name}, lambda m: None
        )
        aoti_run = load(work / "cpu" / "model.pt2", "cpu")
        with torch.no_grad():
            ref = copy.deepcopy(dense).double().forward_jagged(*inp.to("cpu", torch.float64).args())
        modes = cpu_modes(dense, inp, feeds, sess, aoti_run)
        rows: dict[str, Any] = {}
        for mode, fn in modes.items():
            with torch.no_grad():
                res = fn()
                fn()
                times = time_cpu(fn, 2.0)
            rows[mode] = {**stats(times, shape["users"]), "rel_err_vs_fp64": rel_error(res, ref)}
        base = rows["eager_jagged_fp32"]["p50_ms"]
        for r in rows.values():
            r["speedup_vs_eager_jagged"] = round(base / r["p50_ms"], 2)
        data["specs"][name] = {
            "workload": shape,
            "tokens": int(inp.offsets[-1]),
            "onnx_export_seconds": round(export_s, 1),
            "aoti_build_seconds": json.loads((work / "cpu" / "metadata.json").read_text())["build_seconds"],
            "aoti_parity": entry["parity"],
            "modes": rows,
        }
        print(name, json.dumps(rows, indent=None), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the CPU comparison instead of the GPU one")
    p.add_argument("--out", type=Path, help="JSON result file")
    p.add_argument("--specs", default="mtgr-small,mtgr-base")
    p.add_argument("--skip", default="", help="comma-separated modes to leave out")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per mode and workload")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--stage-check", action="store_true", help="also `grc build` hstu-tiny's aoti stage (cpu + cuda)")
    p.add_argument("--commit", default="", help="commit to record (default: git rev-parse HEAD)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=500.0, help="seconds the whole GPU run may take")
    p.add_argument("--stage-direct", nargs=2, metavar=("SPEC", "ROOT"), help=argparse.SUPPRESS)
    p.add_argument("--probe", nargs=3, metavar=("SPEC", "PACKAGE", "SINGLE_THREADED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        run_probe(args.probe[0], Path(args.probe[1]), bool(int(args.probe[2])))
        return
    if args.stage_direct:
        result = _stage_direct(Path(args.stage_direct[0]), Path(args.stage_direct[1]))
        print(json.dumps(result))
        raise SystemExit(result["rc"])
    if args.cpu:
        cpu_main(args)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --cpu, or on the GPU machine")
    else:
        gpu_main(args)


if __name__ == "__main__":
    main()
