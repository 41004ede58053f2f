"""FP8 dense GEMMs (engine.aoti.precision: fp8) vs bf16 on the GPU path, same run, same inputs.

    python bench/quant_fp8.py --specs mtgr-small,mtgr-base --deadline 150 --out FILE   (a GPU machine)
    python bench/quant_fp8.py --smoke --out FILE                                       (CPU dry run)

Per spec (the weights stage's seeded init, in memory; no tables: the dense graph takes tokens):
  model    GRDense in bf16 with grc's Triton ops (grc.aoti.model.JaggedDense, what the package
           exports), and the same with its projection, output and head GEMMs in fp8
           (grc/model/fp8.py: torch._scaled_mm e4m3, per-channel weight scales, per-tensor
           activation scales calibrated on engine.calibration's users, as the aoti stage does)
  eager    each model eager, CUDA-graphed (the kernels' launch gaps out of the figure)
  ranking  grc.engine.aoti_quality.ranking_figures (verify.ranking's held-out users and gates) of
           the bf16 and fp8 models (eager, the GPU's kernels) vs the fp32 model (float32, CPU)
  gemm     the uvqk GEMM alone at the workload's token count: bf16 matmul vs _scaled_mm (+ the
           activation quantization) — what fp8 can win at most
  compiled torch.compile(dynamic=False) of each, CUDA-graphed: the Inductor path the package uses
In that order, so a run cut short by --deadline still has the ranking figures.
Workload (issue 19): 64 users x (profile + 1,000 history + 512 candidates) = 1,515 tokens each on
mtgr-small. Times: CUDA events around each call, median of >= 10 calls after warm-up
(bench/e2e_measure.time_calls). Each part has a share of --deadline; a part that does not fit is
skipped with a line saying so, and the JSON is written after every part.
--smoke: hstu-tiny on the CPU, 4 users, eager only (_scaled_mm runs on the CPU in torch >= 2.13;
the compiled and timed parts are GPU figures and are skipped with that reason).
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
from grc.spec.loader import load_spec  # noqa: E402

WORKLOAD = {"users": 64, "history": 1000, "candidates": 512}
SMOKE = {"users": 4, "history": 20, "candidates": 8}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class Run:
    def __init__(self, out: Path | None, deadline: float, data: dict[str, Any]):
        self.out, self.deadline, self.data = out, deadline, data

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - T0)

    def save(self) -> None:
        if self.out is not None:
            write_result(self.out, self.data)

    def part(self, rec: dict[str, Any], name: str, need_s: float, fn: Any) -> Any:
        """Run ``fn`` when ``need_s`` seconds are left, record its result or error, save."""
        if self.left() < need_s:
            why = f"out of time: {self.left():.0f}s left of --deadline, needs ~{need_s}s"
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


def graphed(fn: Any, args: tuple[torch.Tensor, ...], device: torch.device) -> Any:
    if device.type != "cuda":
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


def gemm_bench(dense: Any, fp8_model: Any, tokens: int, device: torch.device) -> dict[str, Any]:
    """The first layer's uvqk GEMM alone: [tokens, d] x [d, n] in bf16 vs fp8 (_scaled_mm, with the
    activation quantization it needs), on fresh random non-zero activations."""
    from grc.model.fp8 import fp8_linears

    lin = copy.deepcopy(dense.layers[0].uvqk).to(device, torch.bfloat16)
    q = copy.deepcopy(fp8_linears(fp8_model)["layers.0.uvqk"]).to(device, torch.bfloat16)
    x = torch.randn(tokens, lin.in_features, device=device, dtype=torch.bfloat16)
    flops = 2 * tokens * lin.in_features * lin.out_features
    out: dict[str, Any] = {"shape": [tokens, lin.in_features, lin.out_features], "gflop": round(flops / 1e9, 2)}
    for name, module in (("bf16", lin), ("fp8", q)):
        s = timed(graphed(module, (x,), device), device, 1, 2.0)
        s["tflops"] = round(flops / (s["p50_ms"] / 1e3) / 1e12, 1)
        out[name] = s
    out["speedup_fp8"] = round(out["bf16"]["p50_ms"] / out["fp8"]["p50_ms"], 3)
    return out


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


def run_spec(name: str, run: Run, smoke: bool, package: bool = False) -> None:
    from grc.aoti.model import JaggedDense
    from grc.engine.aoti_quality import fp8_package_model, ranking_figures
    from grc.model.fp8 import set_emulate

    device = torch.device("cpu" if smoke else "cuda")
    spec = load_spec(REPO / "specs" / f"{name}.yaml").spec
    cfg = spec.model
    rec: dict[str, Any] = {
        "model": {
            "d_model": cfg.d_model,
            "layers": cfg.hstu.num_layers,
            "linear_dim": cfg.hstu.linear_dim,
            "attention_dim": cfg.hstu.attention_dim,
            "tasks": len(cfg.tasks),
            "head_hidden": cfg.head_hidden,
        }
    }
    run.data["specs"][name] = rec
    dense = seeded_dense(cfg).eval()
    started = time.perf_counter()
    fp8_cpu, record = fp8_package_model(dense, spec)  # float32 on the CPU, as the aoti stage calibrates
    rec["fp8"] = {**record, "calibrate_seconds": round(time.perf_counter() - started, 2)}
    log(f"{name}: calibrated {len(record['scales'])} fp8 GEMMs in {rec['fp8']['calibrate_seconds']}s")
    impl = "pytorch" if smoke else "triton"
    bf16_mod = JaggedDense(copy.deepcopy(dense).to(device, torch.bfloat16), impl).eval()
    fp8_mod = JaggedDense(copy.deepcopy(fp8_cpu).to(device, torch.bfloat16), impl).eval()
    set_emulate(fp8_mod, False)
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
    budget = 1.0 if smoke else 4.0

    def agree() -> dict[str, Any]:
        with torch.no_grad():
            a, b = bf16_mod(*args).float(), fp8_mod(*args).float()
        sync(device)
        return {"max_abs_fp8_vs_bf16": float((a - b).abs().max()), "finite": bool(torch.isfinite(b).all())}

    rec["agreement"] = run.part(rec, "agreement", 5, agree)
    for label, mod in (("bf16", bf16_mod), ("fp8", fp8_mod)):
        got = run.part(
            rec, f"eager_{label}", 15, lambda m=mod: timed(graphed(m, args, device), device, shape["users"], budget)
        )
        if got:
            modes[f"eager_{label}"] = got
            log(f"{name}: eager {label}: p50 {got['p50_ms']} ms, {got['users_per_s']} users/s")
    if "eager_fp8" in modes and "eager_bf16" in modes:
        rec["speedup_fp8_eager"] = round(modes["eager_bf16"]["p50_ms"] / modes["eager_fp8"]["p50_ms"], 3)

    def ranking() -> dict[str, Any]:
        from grc.verify.ranking import format_rank_figures

        out = {}
        for label, mod in (("bf16", bf16_mod), ("fp8", fp8_mod)):
            figures = ranking_figures(
                dense, spec, f"{label}:{device.type}", "fp8 GEMMs, bf16" if label == "fp8" else label
            )(mod, device, torch.bfloat16)
            passed = all(f.ok for f in figures)  # a failing gate is a figure here: recorded, the run goes on
            out[label] = {
                "passed": passed,
                "gates": spec.verify.ranking.model_dump(),
                "figures": [f.as_dict() for f in figures],
            }
            log(f"{name}: ranking {label}: {'passed' if passed else 'FAILED'}\n{format_rank_figures(figures)}")
        return out

    rec["ranking"] = run.part(rec, "ranking", 20, ranking)
    if smoke:
        rec.setdefault("skipped", {})["gemm, compiled"] = "GPU figures (CUDA events, Inductor's GPU kernels): --smoke"
    else:
        rec["gemm"] = run.part(rec, "gemm", 10, lambda: gemm_bench(dense, fp8_cpu, tokens, device))
        if rec["gemm"]:
            log(f"{name}: uvqk GEMM fp8 speed-up {rec['gemm']['speedup_fp8']}")
        for label, mod in (("bf16", bf16_mod), ("fp8", fp8_mod)):

            def compiled(m: Any = mod, label: str = label) -> dict[str, Any]:
                fn = torch.compile(m, dynamic=False)
                t = time.perf_counter()
                with torch.no_grad():
                    fn(*args)
                sync(device)
                compile_s = round(time.perf_counter() - t, 1)
                log(f"{name}: torch.compile {label}: {compile_s}s")
                return {**timed(graphed(fn, args, device), device, shape["users"], budget), "compile_s": compile_s}

            got = run.part(rec, f"compiled_{label}", 45, compiled)
            if got:
                modes[f"compiled_{label}"] = got
                log(f"{name}: compiled {label}: p50 {got['p50_ms']} ms, {got['users_per_s']} users/s")
        if "compiled_fp8" in modes and "compiled_bf16" in modes:
            rec["speedup_fp8_compiled"] = round(modes["compiled_bf16"]["p50_ms"] / modes["compiled_fp8"]["p50_ms"], 3)
            log(f"{name}: fp8 / bf16 throughput (compiled): {rec['speedup_fp8_compiled']}x (target >= 1.3x)")
        if package:
            rec["package_fp8"] = run.part(
                rec, "package_fp8", 150, lambda: package_part(dense, fp8_cpu, spec, args, shape["users"])
            )
        else:
            rec.setdefault("skipped", {})["package_fp8"] = "the AOTInductor fp8 package (~95 s compile): --package"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default="mtgr-small,mtgr-base")
    parser.add_argument("--deadline", type=float, default=150.0, help="seconds for the whole run")
    parser.add_argument("--smoke", action="store_true", help="hstu-tiny on the CPU, eager only")
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
    for name in specs:
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
        print(
            f"{name}: eager fp8/bf16 {rec.get('speedup_fp8_eager')}x, compiled {rec.get('speedup_fp8_compiled')}x, "
            f"gemm {(rec.get('gemm') or {}).get('speedup_fp8')}x, ranking "
            f"{ {k: v.get('passed') for k, v in (rec.get('ranking') or {}).items()} }"
        )
    log("done")


if __name__ == "__main__":
    main()
