"""End-to-end dense-model benchmark: grc's compiled paths against what a user runs without grc.

GPU (default; one process per spec, every mode of a spec on the same inputs):
    python bench/e2e.py --specs mtgr-small [--profile] [--stage-check] [--out FILE]
  baselines (bench/e2e_modes.py): the plain PyTorch model padded and batched in bf16, eager and
  under torch.compile (also CUDA-graphed); grc: its ops eager / CUDA-graphed / torch.compile'd, and
  the AOTInductor package (built and parity-checked by the aoti stage's code), with and without a
  CUDA graph; the *_fused* modes with the fused projections and candidate heads (kernels/fused_*.py,
  engine.aoti.fuse). Workloads: 1 user x (profile + 1000 history + 512 candidates) (latency) and 64 such
  users (throughput). Per mode and workload: p50/p99 (CUDA events, one call per sample), users/s,
  peak memory, speed-up against the best baseline of the same run, share of the FLOP floor; on
  the latency workload the error against the float64 oracle (GRDense.forward_jagged on the CPU, the
  per-user reference: a correctness oracle, never a speed baseline). --profile adds the top ops of
  one call per mode and workload (torch.profiler); --stage-check runs `grc build` of hstu-tiny's aoti
  stage (cpu + cuda). bench/gpu_run_e2e.sh runs this on a GPU machine, start to end.
Smoke (--smoke): the same code on the CPU, hstu-tiny, tiny workloads, the modes that run there
  without a compile (in seconds): what the test suite runs.
CPU comparison (--cpu): eager vs onnxruntime vs the CPU AOTInductor package (bench/e2e_cpu.py).
Weights: the weights stage's seeded init, in memory (the embedding tables are not built: the dense
graph takes projected tokens [T, D]). Results go through bench/_common.write_result (provenance).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # the repo first: bench/kernels.py must not shadow the kernels package

import torch  # noqa: E402
from _common import RESULTS, write_result  # noqa: E402
from e2e_measure import (  # noqa: E402
    autotune_picks,
    ceilings,
    dense_parameters,
    floor_times,
    op_profile,
    rel_error,
    stats,
    sync,
    time_calls,
    workload_floors,
)
from e2e_modes import MODES, Case, Mode  # noqa: E402

from grc.aoti.inputs import random_inputs, seeded_dense  # noqa: E402
from grc.model.jagged import to_jagged  # noqa: E402
from grc.spec.loader import load_spec  # noqa: E402

WORKLOADS = {
    "latency": {"users": 1, "history": 1000, "candidates": 512},
    "throughput": {"users": 64, "history": 1000, "candidates": 512},
}
SMOKE_WORKLOADS = {
    "latency": {"users": 1, "history": 20, "candidates": 8},
    "throughput": {"users": 4, "history": 20, "candidates": 8},
}
SMOKE_MODES = ("eager_bf16_padded", "eager_bf16_triton")  # no compile: seconds on a CPU
ORACLE_WORKLOAD = "latency"  # the float64 per-user reference on the CPU: too slow for 64 users
ROUNDS_WORKLOAD, ROUND_CALLS = "latency", 200  # --rounds: the workload timed again, calls per mode and round
# --profile: one call of each workload per mode, under its record key ("profiles" kept for the throughput call, the
# key results since session 2 use; the latency call's lists the ~40 small launches a 1-user graph replays)
PROFILE_KEYS = {"throughput": "profiles", "latency": "latency_profiles"}
T0 = time.perf_counter()


class Recorder:
    """The result being built, written (with its provenance) after every step: a run cut short
    still leaves what it measured."""

    def __init__(self, path: Path | None, data: dict[str, Any]):
        self.path = path
        self.data = data

    def save(self) -> None:
        if self.path is not None:
            write_result(self.path, self.data)


# --------------------------------------------------------------------------- one spec
def prepare_case(name: str, device: torch.device, workloads: dict, ceil: dict | None) -> Case:
    """Models and inputs for every mode of one spec, and the spec's record (model, workloads, floors)."""
    spec = load_spec(REPO / "specs" / f"{name}.yaml").spec
    cfg = spec.model
    dense = seeded_dense(cfg).to(device)
    dense_act = copy.deepcopy(dense).to(torch.bfloat16)
    record: dict[str, Any] = {
        "model": {
            "d_model": cfg.d_model,
            "layers": cfg.hstu.num_layers,
            "heads": cfg.hstu.num_heads,
            "attention_dim": cfg.hstu.attention_dim,
            "linear_dim": cfg.hstu.linear_dim,
            "time_buckets": cfg.hstu.time_buckets,
            "dense_parameters": dense_parameters(cfg),
        },
        "workloads": {},
        "modes": {},
        "errors": {},
        "skipped": {},
    }
    gen = torch.Generator().manual_seed(2024)
    inputs = {}
    for wl, shape in workloads.items():
        inp = random_inputs(cfg, shape["users"], shape["history"], shape["candidates"], gen, ragged=False)
        inp.tokens = inp.tokens.to(torch.bfloat16).float()  # every mode and the oracle see the same values
        floors = workload_floors(cfg, inp)
        times = floor_times(floors, ceil) if ceil else {}
        record["workloads"][wl] = {**shape, "profile_tokens": len(cfg.profile), **floors, **times}
        inputs[wl] = inp
    case = Case(name, spec, device, dense, dense_act, {}, record)
    dense64, oracle_inputs = copy.deepcopy(dense).to("cpu", torch.float64), inputs[ORACLE_WORKLOAD]
    with torch.no_grad():
        case.memo["oracle"] = dense64.forward_jagged(*oracle_inputs.to("cpu", torch.float64).args(), impl="pytorch")
    case.inputs = {wl: inp.to(device, torch.bfloat16) for wl, inp in inputs.items()}
    return case


def measure(
    case: Case, mode_name: str, mode: Mode, wl: str, args: argparse.Namespace
) -> tuple[dict[str, Any], Callable[[], Any]]:
    """Build the mode's call for one workload, run it once (checked against the oracle), time it,
    and with --profile profile one more call -> (its row, the call)."""
    on_gpu = case.device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        start_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        call = mode.make(case, wl)
        result = call()
        sync(case.device)
        times = time_calls(call, case.device, args.budget, min_iters=args.min_calls)
        row: dict[str, Any] = stats(times, case.inputs[wl].users)
        if args.profile and wl in PROFILE_KEYS:
            try:  # a profiler that cannot run (no CUPTI) must not cost the mode its timing
                profile: dict[str, Any] = op_profile(call, case.device)
            except Exception as exc:
                profile = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            case.record.setdefault(PROFILE_KEYS[wl], {})[mode_name] = profile
    if on_gpu:
        row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["peak_over_start_mib"] = round((torch.cuda.max_memory_allocated() - start_bytes) / 2**20, 1)
    if wl == ORACLE_WORKLOAD:
        scores = to_jagged(result, case.inputs[wl].offsets) if mode.padded else result
        row["rel_err_vs_fp64"] = rel_error(scores, case.memo["oracle"])
    return row, call


def interleaved_rounds(calls: dict[str, Callable[[], Any]], device: torch.device, rounds: int) -> dict[str, list]:
    """Each mode's p50 (ms) in each of ``rounds`` rounds; a round times every mode's call in turn (ROUND_CALLS calls
    each), the order rotated round by round. Why: one pass per mode, one mode after another, read drift (clocks,
    the host's noise between modes minutes apart) as a difference between modes; on the H100 of session 26 the same
    package's latency p50 was 0.276 ms in one run and 0.238 in the next, while modes a few kernels apart differed
    by less (bench/results/e2e-notes.md)."""
    names = list(calls)
    per: dict[str, list[float]] = {m: [] for m in calls}
    with torch.no_grad():
        for r in range(rounds):
            for m in names[r % len(names) :] + names[: r % len(names)]:
                sync(device)
                per[m].append(stats(time_calls(calls[m], device, 0.0, min_iters=ROUND_CALLS), 1)["p50_ms"])
    return per


def run_spec(case: Case, modes: dict[str, Mode], args: argparse.Namespace, rec: Recorder) -> None:
    """Every mode on every workload (but the --skip MODE:WORKLOAD pairs); a mode that fails is
    recorded and the next one runs."""
    out = case.record
    skip = set(args.skip.split(","))
    kept: dict[str, Callable[[], Any]] = {}  # the latency calls --rounds times again, interleaved
    for mode_name, mode in modes.items():
        if mode.needs_cuda and case.device.type != "cuda":
            out["skipped"][mode_name] = "needs a CUDA GPU"
            continue
        out["modes"][mode_name] = {"what": mode.what, "baseline": mode.baseline}
        for wl in case.inputs:
            if f"{mode_name}:{wl}" in skip:
                out["skipped"][f"{mode_name}:{wl}"] = "--skip"
                continue
            print(f"[{case.name}] {mode_name} {wl} (t={time.perf_counter() - T0:.0f}s)", flush=True)
            try:
                row, call = measure(case, mode_name, mode, wl, args)
                out["modes"][mode_name][wl] = row
                if args.rounds and wl == ROUNDS_WORKLOAD:
                    kept[mode_name] = call
                print(f"    p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  {row['users_per_s']:.0f} users/s")
            except Exception as exc:  # one broken mode must not lose the others
                out["errors"][f"{mode_name}:{wl}"] = f"{type(exc).__name__}: {exc}"[:2000]
                traceback.print_exc()
            rec.save()
        case.graphs.clear()  # free the mode's CUDA graphs before the next mode (kept latency calls hold theirs)
    if len(kept) > 1:
        print(f"[{case.name}] {ROUNDS_WORKLOAD}: {args.rounds} interleaved rounds of {', '.join(kept)}", flush=True)
        for mode_name, p50s in interleaved_rounds(kept, case.device, args.rounds).items():
            row = out["modes"][mode_name][ROUNDS_WORKLOAD]
            row["rounds_p50_ms"] = p50s
            row["rounds_median_p50_ms"] = round(statistics.median(p50s), 4)
            print(f"    {mode_name:28s} median p50 {row['rounds_median_p50_ms']:.4f} ms "
                  f"(rounds {min(p50s):.4f}..{max(p50s):.4f})")  # fmt: skip
    out["autotune_picks"] = autotune_picks()
    compare_to_baselines(out)
    rec.save()


def compare_to_baselines(out: dict[str, Any]) -> None:
    """Per workload: the fastest baseline of this run, every mode's speed-up against it, and the
    share of the FLOP and byte floors each mode reaches."""
    out["best_baseline"] = {}
    for wl, w in out["workloads"].items():
        timed = {m: r[wl]["p50_ms"] for m, r in out["modes"].items() if r["baseline"] and wl in r}
        if timed:
            best = min(timed, key=lambda m: timed[m])
            out["best_baseline"][wl] = {"mode": best, "p50_ms": timed[best]}
        for rows in out["modes"].values():
            row = rows.get(wl)
            if row is None:
                continue
            if timed:
                row["speedup_vs_best_baseline"] = round(timed[best] / row["p50_ms"], 2)
            if "flop_floor_ms" in w:
                row["flop_floor_fraction"] = round(w["flop_floor_ms"] / row["p50_ms"], 4)
                row["byte_floor_fraction"] = round(w["byte_floor_ms"] / row["p50_ms"], 4)


def selected_modes(args: argparse.Namespace) -> dict[str, Mode]:
    """The modes to run, in --modes order when given (a run cut short by its deadline keeps what
    came first), else MODES order; --skip takes modes and MODE:WORKLOAD pairs."""
    wanted = args.modes.split(",") if args.modes else list(SMOKE_MODES if args.smoke else MODES)
    skips = [s.split(":") for s in args.skip.split(",") if s]
    unknown = [m for m in wanted if m not in MODES] + [":".join(s) for s in skips if s[0] not in MODES]
    unknown += [":".join(s) for s in skips if len(s) > 2 or (len(s) == 2 and s[1] not in WORKLOADS)]
    if unknown:
        raise SystemExit(
            f"--modes/--skip: unknown mode(s) {unknown}; known: {', '.join(MODES)} "
            f"(--skip also takes MODE:WORKLOAD, workloads: {', '.join(WORKLOADS)})"
        )
    skip = {s[0] for s in skips if len(s) == 1}
    return {m: MODES[m] for m in dict.fromkeys(wanted) if m not in skip}


# --------------------------------------------------------------------------- runs
def head(args: argparse.Namespace, device: torch.device, workloads: dict) -> dict[str, Any]:
    clock = "CUDA events around each call" if device.type == "cuda" else "perf_counter around each call"
    return {
        "host": f"{platform.system()} {platform.release()} ({os.cpu_count()} cores)",
        "timing": f"{clock}, >= {args.min_calls} calls and ~{args.budget}s per mode and workload, after one warm call; "
        "p50/p99 over the calls; users/s = users / p50. Every mode of a spec runs in one process on the same "
        "inputs; speed-ups are against the fastest baseline (plain PyTorch, padded, bf16) of the same run",
        "workload_shapes": workloads,
        "specs": {},
    }


def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected mode of every spec in this process (a GPU child, or the CPU smoke run)."""
    device = torch.device("cpu" if args.smoke else "cuda")
    workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    modes = selected_modes(args)
    rec = Recorder(args.out, head(args, device, workloads))
    ceil = None
    if device.type == "cuda":
        ceil = rec.data["ceilings"] = ceilings()
        torch.cuda.empty_cache()
        print("ceilings", ceil, flush=True)
    rec.save()
    for name in args.specs.split(","):
        case = prepare_case(name, device, workloads, ceil)
        rec.data["specs"][name] = case.record
        run_spec(case, modes, args, rec)
    print_table(rec.data)
    return rec.data


def run_children(args: argparse.Namespace) -> None:
    """Each spec in a child process of its own (a device fault in one cannot take the others
    down; a child past its time share is stopped and what it saved is kept), merged into --out."""
    specs = [s for s in args.specs.split(",") if s]
    selected_modes(args)  # unknown names fail here, before any child starts
    merged = Recorder(args.out, {**head(args, torch.device("cuda"), WORKLOADS), "children": {}})
    work = Path(tempfile.mkdtemp(prefix="grc-e2e-"))
    for name in specs:
        part = work / f"{name}.json"
        cmd = [sys.executable, __file__, "--child", "--specs", name, "--out", str(part), "--budget", str(args.budget)]
        cmd += ["--min-calls", str(args.min_calls), "--rounds", str(args.rounds)]
        cmd += [f"--modes={args.modes}", f"--skip={args.skip}"] + (["--profile"] if args.profile else [])
        left = args.deadline - (time.perf_counter() - T0)
        share = left - 90 * args.stage_check if name == specs[-1] else left / (len(specs) - specs.index(name)) + 30
        try:
            rc: int | str = subprocess.run(cmd, timeout=max(30.0, share)).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {share:.0f}s"
        merged.data["children"][name] = rc
        if part.exists():
            data = json.loads(part.read_text())
            merged.data.setdefault("ceilings", data.get("ceilings"))
            merged.data["specs"].update(data["specs"])
        merged.save()
    if args.stage_check:
        left = args.deadline - (time.perf_counter() - T0)
        merged.data["stage_check"] = stage_check() if left > 45 else {"rc": "not run: no time left"}
        merged.save()
    print_table(merged.data)


def stage_check() -> dict[str, Any]:
    """`grc build` of hstu-tiny with engine.aoti on (targets cpu + cuda): the aoti stage itself on this GPU."""
    work = Path(tempfile.mkdtemp(prefix="grc-aoti-stage-"))
    spec = work / "hstu-tiny-aoti.yaml"
    spec.write_text(
        f"extends: {REPO / 'specs' / 'hstu-tiny.yaml'}\nengine:\n  aoti: {{enabled: true, targets: [cpu, cuda]}}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "grc.cli", "build", str(spec), "aoti", "--artifacts", str(work / "art"), "--no-cache"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    result: dict[str, Any] = {
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "log_tail": (done.stdout + done.stderr)[-3000:],
    }
    manifest = work / "art" / "hstu-tiny" / "engines-aoti" / "manifest.json"
    if manifest.exists():
        result["manifest"] = json.loads(manifest.read_text())
    return result


def print_table(data: dict[str, Any]) -> None:
    print(f"\n{data.get('ceilings') or ''}")
    for name, s in data["specs"].items():
        for wl, w in s["workloads"].items():
            floors = (
                f"FLOP floor {w['flop_floor_ms']:.3f} ms" if "flop_floor_ms" in w else f"{w['flops'] / 1e9:.2f} GFLOP"
            )
            best = s.get("best_baseline", {}).get(wl, {}).get("mode", "none")
            print(f"{name} {wl}: {floors}; best baseline: {best}")
            for mode, rows in s["modes"].items():
                r = rows.get(wl)
                if r:
                    print(
                        f"  {mode:<26} p50 {r['p50_ms']:9.3f}  p99 {r['p99_ms']:9.3f}  {r['users_per_s']:9.1f} u/s "
                        f" x{r.get('speedup_vs_best_baseline', 0):6.2f}"
                        f"  err {r.get('rel_err_vs_fp64', float('nan')):.1e}"
                    )
        for k, v in s["errors"].items():
            print(f"  ERROR {k}: {v[:300]}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the CPU smoke run (hstu-tiny, tiny workloads, seconds)")
    p.add_argument("--cpu", action="store_true", help="the CPU comparison: eager vs onnxruntime vs the CPU package")
    p.add_argument("--out", type=Path, help="result file (default: bench/results/e2e-<gpu|smoke|cpu>.json)")
    p.add_argument("--specs", help="comma-separated spec names (default: mtgr-small; hstu-tiny with --smoke)")
    p.add_argument(
        "--modes", default="", help=f"comma-separated modes to run, in this order (default: all): {', '.join(MODES)}"
    )
    p.add_argument("--skip", default="", help="comma-separated modes, or MODE:WORKLOAD pairs, to leave out")
    p.add_argument("--budget", type=float, help="seconds of timed calls per mode and workload (default 1; 0.2 smoke)")
    p.add_argument("--profile", action="store_true", help="top ops of one call per mode and workload (torch.profiler)")
    p.add_argument("--min-calls", type=int, help="timed calls per mode and workload, at least (default 10; 3 smoke)")
    p.add_argument(
        "--rounds",
        type=int,
        help=f"after every mode ran, time the {ROUNDS_WORKLOAD} calls of all modes again in this many interleaved "
        "rounds (order rotated; recorded per mode as rounds_p50_ms and their median): mode-to-mode differences "
        "without the drift between modes run minutes apart (default 15 on a GPU, 0 with --smoke)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--cpu, --smoke)")
    p.add_argument("--stage-check", action="store_true", help="also `grc build` hstu-tiny's aoti stage (cpu + cuda)")
    p.add_argument("--deadline", type=float, default=480.0, help="seconds the whole GPU run may take")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.specs = args.specs or ("hstu-tiny" if args.smoke else "mtgr-small")
    args.budget = args.budget if args.budget is not None else (0.2 if args.smoke else 1.0)
    args.min_calls = args.min_calls or (3 if args.smoke else 10)
    args.rounds = args.rounds if args.rounds is not None else (0 if args.smoke else 15)
    kind = "cpu" if args.cpu else "smoke" if args.smoke else "gpu"
    args.out = args.out if args.out is not None else RESULTS / f"e2e-{kind}.json"
    return args


def main() -> None:
    args = parse_args()
    if args.cpu:
        from e2e_cpu import cpu_main

        cpu_main(args)
    elif args.smoke:
        torch.set_num_threads(args.threads)
        run_in_process(args)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke (the CPU smoke run) or --cpu, or on the GPU machine")
    elif args.child:
        run_in_process(args)
    else:
        run_children(args)


if __name__ == "__main__":
    main()
