"""FP8 dense GEMMs (engine.aoti.precision: fp8) vs bf16 on the GPU path, same run, same inputs.

    python bench/quant_fp8.py --specs mtgr-small,mtgr-base --deadline 150 --out FILE   (a GPU machine)
    python bench/quant_fp8.py --smoke --out FILE                                       (CPU dry run)

Per spec (the weights stage's seeded init, in memory; no tables: the dense graph takes tokens), each
spec with an equal share of --deadline:
  models   GRDense in bf16 with grc's Triton ops (grc.aoti.model.JaggedDense, what the package
           exports), frozen (no parameter requires grad); "fp8": the same with the package's fp8
           GEMMs (grc.model.fp8.PACKAGE_GEMMS: the output projections); "fp8_all": every GEMM fp8
           (uvqk, out, the heads' first): torch._scaled_mm e4m3, row-wise scales, fast accumulation,
           per-channel weight scales, power-of-two per-tensor activation scales calibrated on
           engine.calibration's users, as the aoti stage does
  eager    each model eager, CUDA-graphed (the kernels' launch gaps out of the figure)
  ranking  grc.engine.aoti_quality.ranking_figures (verify.ranking's held-out users and gates) of
           each model (eager, the GPU's kernels) vs the fp32 model (float32, CPU)
  gemm     each fp8-capable GEMM alone at the workload's token count, bf16 vs fp8, the uvqk GEMM's
           fp8 time taken apart (bench/quant_fp8_gemm.py), and the Amdahl bound: the model's
           speed-up if every GEMM ran at its fp8 time
  compiled torch.compile(dynamic=False) of each, CUDA-graphed: the Inductor path the package uses
           (Inductor fuses the activation quantization's scale, clamp and cast into one pass)
In that order, so a run cut short by --deadline still has the ranking figures.
Workload (issue 19): 64 users x (profile + 1,000 history + 512 candidates) = 1,515 tokens each on
mtgr-small. Times: CUDA events around each call, median of >= 10 calls after warm-up
(bench/e2e_measure.time_calls). A part that does not fit its spec's share of --deadline is
skipped with a line saying so, and the JSON is written after every part.
--smoke: hstu-tiny on the CPU, 4 users (_scaled_mm runs on the CPU in torch >= 2.13): eager,
ranking, torch.compile of bf16 and fp8; the GEMM part is a GPU figure and is skipped.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import torch  # noqa: E402
from _common import write_result  # noqa: E402
from e2e_measure import stats, sync, time_calls  # noqa: E402

from grc.aoti.inputs import random_inputs, seeded_dense  # noqa: E402
from grc.model.fp8 import KINDS, PACKAGE_GEMMS  # noqa: E402
from grc.spec.loader import load_spec  # noqa: E402

# The models timed and gated side by side: bf16, the fp8 package's GEMM set, and every GEMM in fp8
# (the most fp8 can give; it fails the ranking gates: grc.model.fp8.PACKAGE_GEMMS).
MODELS: dict[str, tuple[str, ...]] = {"bf16": (), "fp8": PACKAGE_GEMMS, "fp8_all": KINDS}
PRECISION = {"bf16": "bf16", "fp8": "fp8 " + "+".join(PACKAGE_GEMMS) + ", bf16", "fp8_all": "fp8 all GEMMs, bf16"}
WORKLOAD = {"users": 64, "history": 1000, "candidates": 512}
SMOKE = {"users": 4, "history": 20, "candidates": 8}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class Run:
    def __init__(self, out: Path | None, deadline: float, data: dict[str, Any]):
        self.out, self.deadline, self.data = out, deadline, data
        self.spec_end = deadline  # seconds after T0 the current spec's parts must fit in

    def left(self) -> float:
        return min(self.deadline, self.spec_end) - (time.perf_counter() - T0)

    def share(self, specs_left: int) -> None:
        """The next spec gets an equal share of what is left of --deadline (so mtgr-small cannot eat mtgr-base's)."""
        now = time.perf_counter() - T0
        self.spec_end = now + (self.deadline - now) / specs_left

    def save(self) -> None:
        if self.out is not None:
            write_result(self.out, self.data)

    def part(self, rec: dict[str, Any], name: str, need_s: float, fn: Any) -> Any:
        """Run ``fn`` when ``need_s`` seconds are left, record its result or error, save."""
        if self.left() < need_s:
            why = f"out of time: {self.left():.0f}s left of this spec's share of --deadline, needs ~{need_s}s"
            rec.setdefault("skipped", {})[name] = why
            log(f"{name}: skipped ({rec['skipped'][name]})")
            self.save()
            return None
        started = time.perf_counter()
        try:
            got = fn()
        except Exception as exc:
            rec.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"{name}: FAILED {type(exc).__name__}: {exc}"[:600])
            traceback.print_exc()
            got = None
        rec.setdefault("part_seconds", {})[name] = round(time.perf_counter() - started, 1)
        self.save()
        return got


def frozen(module: Any) -> Any:
    """No parameter requires grad: with one that does and grad mode on (a CUDA graph capture, a first
    call outside no_grad), torch.compile traces the backward too and fails on the ops that have none
    (aten::_scaled_mm, grc::norm_gate: session 6's compiled modes)."""
    return module.requires_grad_(False).eval()


def graphed(fn: Any, args: tuple[torch.Tensor, ...], device: torch.device) -> Any:
    """``fn(*args)`` as a zero-argument call: CUDA-graphed on a GPU (captured under no_grad), plain on a CPU."""
    with torch.no_grad():
        if device.type != "cuda":
            fn(*args)  # the same first call as a capture's
            return lambda: fn(*args)
        from grc.aoti.runtime import CudaGraphRunner

        runner = CudaGraphRunner(fn, max_graphs=1)
        runner(*args)
    return lambda: runner(*args)


def timed(fn: Any, device: torch.device, users: int, budget_s: float) -> dict[str, Any]:
    with torch.no_grad():
        for _ in range(3):
            fn()
        sync(device)
        return stats(time_calls(fn, device, budget_s), users)


def compiled_run(mod: Any, args: tuple[torch.Tensor, ...], device: torch.device) -> tuple[Any, float]:
    """torch.compile(dynamic=False) of a frozen ``mod``, compiled by its first call; (runner, seconds)."""
    fn = torch.compile(frozen(mod), dynamic=False)
    t = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    sync(device)
    return graphed(fn, args, device), round(time.perf_counter() - t, 1)


def package_part(dense: Any, fp8_cpu: Any, spec: Any, args: tuple[torch.Tensor, ...], users: int) -> dict[str, Any]:
    """The aoti stage's own path for the fp8 package (compile, a load check in a child process, float64
    parity, the ranking gates), then its throughput, CUDA-graphed. ~95 s of compile on mtgr-small."""
    import json
    import tempfile

    from grc.aoti.build import compile_target, verify_target
    from grc.aoti.runtime import load
    from grc.engine.aoti_quality import ranking_check

    folder = Path(tempfile.mkdtemp(prefix="grc-aoti-fp8-")) / "cuda"
    compiled = compile_target(fp8_cpu, "cuda", "bfloat16", folder, log)
    shapes = [(s.users, s.history, s.candidates) for s in spec.verify.shapes]
    check = ranking_check(dense, spec, "aoti:cuda", "fp8 GEMMs, bfloat16")
    # the aoti stage's tolerance and parity seed (grc.stages.aoti; importing a stage would import them all)
    tol = spec.engine.aoti.parity or spec.engine.tolerance_of("fp8")
    entry = verify_target(
        dense, compiled, folder, tol, shapes, 20240501, {"spec": spec.name}, log, single_threaded=True, checks=check
    )
    meta = json.loads((folder / "metadata.json").read_text())
    run = load(folder / "model.pt2", "cuda", single_threaded=True)
    device = torch.device("cuda")
    return {
        "entry": entry,
        "build_seconds": meta["build_seconds"],
        "parity": meta["parity"],
        "ranking": meta["ranking"],
        "bytes": meta["package"]["bytes"],
        "throughput": timed(graphed(run, args, device), device, users, 4.0),
    }


def spec_record(spec: Any) -> dict[str, Any]:
    cfg = spec.model
    return {
        "model": {
            "d_model": cfg.d_model,
            "layers": cfg.hstu.num_layers,
            "linear_dim": cfg.hstu.linear_dim,
            "attention_dim": cfg.hstu.attention_dim,
            "tasks": len(cfg.tasks),
            "head_hidden": cfg.head_hidden,
        }
    }


def ranking_part(dense: Any, spec: Any, mods: dict[str, Any], device: torch.device, reference: Any) -> dict[str, Any]:
    from grc.engine.aoti_quality import ranking_figures
    from grc.verify.ranking import format_rank_figures

    out = {}
    for label, mod in mods.items():
        figures = ranking_figures(dense, spec, f"{label}:{device.type}", PRECISION[label], reference)(
            mod, device, torch.bfloat16
        )
        passed = all(f.ok for f in figures)  # a failing gate is a figure here: recorded, the run goes on
        out[label] = {
            "passed": passed,
            "gates": spec.verify.ranking.model_dump(),
            "figures": [f.as_dict() for f in figures],
        }
        log(f"{spec.name}: ranking {label}: {'passed' if passed else 'FAILED'}\n{format_rank_figures(figures)}")
    return out


def run_spec(name: str, run: Run, smoke: bool, package: bool = False) -> None:
    from grc.aoti.model import JaggedDense
    from grc.engine.aoti_quality import fp8_package_model, held_out_reference

    device = torch.device("cpu" if smoke else "cuda")
    spec = load_spec(REPO / "specs" / f"{name}.yaml").spec
    cfg = spec.model
    rec = run.data["specs"][name] = spec_record(spec)
    dense = seeded_dense(cfg).eval()
    cpu_models: dict[str, Any] = {"bf16": dense}
    for label, gemms in MODELS.items():
        if gemms:
            started = time.perf_counter()
            # float32 on the CPU, as the aoti stage calibrates
            cpu_models[label], record = fp8_package_model(dense, spec, gemms)
            rec[label] = {**record, "calibrate_seconds": round(time.perf_counter() - started, 2)}
    log(f"{name}: calibrated fp8 GEMMs: " + ", ".join(f"{k} {len(rec[k]['scales'])}" for k in MODELS if MODELS[k]))
    impl = "pytorch" if smoke else "triton"
    mods = {k: frozen(JaggedDense(copy.deepcopy(m).to(device, torch.bfloat16), impl)) for k, m in cpu_models.items()}
    shape = SMOKE if smoke else WORKLOAD
    gen = torch.Generator().manual_seed(2024)
    inp = random_inputs(cfg, shape["users"], shape["history"], shape["candidates"], gen, ragged=False)
    args = inp.to(device, torch.bfloat16).args()
    tokens = int(inp.offsets[-1])
    rec["workload"] = {
        **shape,
        "profile_tokens": len(cfg.profile),
        "tokens_per_user": tokens // shape["users"],
        "tokens": tokens,
    }
    log(f"{name}: workload {shape['users']} users x {tokens // shape['users']} tokens")
    modes: dict[str, Any] = rec.setdefault("modes", {})
    budget = 1.0 if smoke else 2.0  # seconds of timed calls per mode: >= 300 calls of mtgr-small, >= 120 of mtgr-base

    def agree() -> dict[str, Any]:
        with torch.no_grad():
            ref = mods["bf16"](*args).float()
            out = {}
            for label in MODELS:
                if MODELS[label]:
                    b = mods[label](*args).float()
                    out[label] = {
                        "max_abs_vs_bf16": float((ref - b).abs().max()),
                        "finite": bool(torch.isfinite(b).all()),
                    }
        sync(device)
        return out

    rec["agreement"] = run.part(rec, "agreement", 5, agree)
    for label, mod in mods.items():
        got = run.part(
            rec, f"eager_{label}", 10, lambda m=mod: timed(graphed(m, args, device), device, shape["users"], budget)
        )
        if got:
            modes[f"eager_{label}"] = got
            log(f"{name}: eager {label}: p50 {got['p50_ms']} ms, {got['users_per_s']} users/s")
    speedups(rec, "eager")
    rec["ranking"] = run.part(
        rec, "ranking", 10, lambda: ranking_part(dense, spec, mods, device, held_out_reference(dense, spec))
    )
    if smoke:
        rec.setdefault("skipped", {})["gemm"] = "GPU figures (CUDA events, cuBLAS / CUTLASS kernels): --smoke"
    else:
        from quant_fp8_gemm import amdahl, gemm_bench, gemm_linears

        def gemm_part() -> dict[str, Any]:
            timer = lambda fn, a: timed(graphed(fn, a, device), device, 1, 0.3)  # noqa: E731
            out = gemm_bench(gemm_linears(dense, cpu_models["fp8_all"]), tokens, device, timer)
            if "eager_bf16" in modes:
                out["amdahl"] = amdahl(out, modes["eager_bf16"]["p50_ms"])
            return out

        rec["gemm"] = run.part(rec, "gemm", 10, gemm_part)
        if rec["gemm"]:
            each = {k: v["speedup_fp8"] for k, v in rec["gemm"].items() if "speedup_fp8" in v}
            log(f"{name}: GEMMs fp8 speed-up {each}, {rec['gemm'].get('amdahl')}")
    for label, mod in mods.items():
        if smoke and label == "fp8_all":
            rec.setdefault("skipped", {})["compiled_fp8_all"] = "--smoke compiles bf16 and fp8 (the CPU's compile time)"
            continue

        def compiled(m: Any = mod, label: str = label) -> dict[str, Any]:
            runner, compile_s = compiled_run(m, args, device)
            log(f"{name}: torch.compile {label}: {compile_s}s")
            return {**timed(runner, device, shape["users"], budget), "compile_s": compile_s}

        got = run.part(rec, f"compiled_{label}", 30 if label == "bf16" and not smoke else 15, compiled)
        if got:
            modes[f"compiled_{label}"] = got
            log(f"{name}: compiled {label}: p50 {got['p50_ms']} ms, {got['users_per_s']} users/s")
    speedups(rec, "compiled")
    if package and not smoke:
        rec["package_fp8"] = run.part(
            rec, "package_fp8", 150, lambda: package_part(dense, cpu_models["fp8"], spec, args, shape["users"])
        )
    else:
        rec.setdefault("skipped", {})["package_fp8"] = "the AOTInductor fp8 package (~95 s compile): --package"


def speedups(rec: dict[str, Any], kind: str) -> None:
    modes = rec["modes"]
    for label in MODELS:
        if MODELS[label] and f"{kind}_{label}" in modes and f"{kind}_bf16" in modes:
            x = round(modes[f"{kind}_bf16"]["p50_ms"] / modes[f"{kind}_{label}"]["p50_ms"], 3)
            rec[f"speedup_{label}_{kind}"] = x
            log(f"{kind}: {label} / bf16 throughput {x}x (target >= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default="mtgr-small,mtgr-base")
    parser.add_argument("--deadline", type=float, default=150.0, help="seconds for the whole run")
    parser.add_argument("--smoke", action="store_true", help="hstu-tiny on the CPU (no GEMM part, no fp8_all compile)")
    parser.add_argument("--package", action="store_true", help="also build and time the AOTInductor fp8 package")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("quant_fp8.py: no CUDA GPU (torch.cuda.is_available() is False); --smoke runs the CPU part")
    specs = ["hstu-tiny"] if smoke else args.specs.split(",")
    data: dict[str, Any] = {
        "what": "fp8 dense GEMMs vs bf16 (grc/model/fp8.py), bench/quant_fp8.py",
        "device": torch.cuda.get_device_name() if not smoke else "cpu (--smoke)",
        "torch": torch.__version__,
        "smoke": smoke,
        "specs": {},
    }
    if not smoke:
        data["sm"] = "sm{}{}".format(*torch.cuda.get_device_capability())
    run = Run(args.out, args.deadline, data)
    for i, name in enumerate(specs):
        run.share(len(specs) - i)
        if run.left() < 30:
            data.setdefault("skipped", {})[name] = f"out of time ({run.left():.0f}s left)"
            log(f"{name}: skipped: out of time")
            continue
        try:
            run_spec(name, run, smoke, args.package)
        except Exception as exc:
            data.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        run.save()
    for name, rec in data["specs"].items():
        gemm = {k: v["speedup_fp8"] for k, v in (rec.get("gemm") or {}).items() if "speedup_fp8" in v}
        print(
            f"{name}: speed-ups vs bf16 { {k: v for k, v in rec.items() if k.startswith('speedup_')} }, "
            f"GEMMs {gemm}, ranking { {k: v.get('passed') for k, v in (rec.get('ranking') or {}).items()} }"
        )
    log("done")


if __name__ == "__main__":
    main()
