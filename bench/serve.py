"""The served bundle under closed-loop load: grc's model against the eager baseline, and against its own
Ranker called in process (the ceiling), on one seeded pool of realistic requests.

    python bench/serve.py --specs specs/mtgr-small-gpu.yaml [--artifacts DIR] [--concurrency 1 8 32]
        [--modes grc eager kernels in_process] [--row-seconds 20] [--deadline 420] [--out NAME]

Each request is one user: history length drawn from 50..max_history, candidates from 16..min(512,
max_candidates), ids inside the tables (numpy, --seed). Modes, in the same run on the same pool:
  grc         the spec's model (`<model_name>`, bundles.triton.backend) through tritonserver, gRPC per client
  eager       `<model_name>-pytorch` (GRDense.forward_padded, plain PyTorch: the baseline a team writes)
  kernels     `<model_name>-pytorch_kernels` (grc's Triton kernels, jagged, CUDA graphs)
  in_process  the grc model's Ranker in this process on batches of `concurrency` requests (no server)
Every answer's form is checked (a bad one counts as an error); the first --sample pool requests' answers are
checked against the PyTorch float64 model within the spec's tolerance. Concurrencies run largest first (the
targets' rows), in_process before the server starts (the GPU to itself); a row the --deadline leaves no room
for is listed with the reason. Writes bench/results/serve-<device>.json (--out: another name or path).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import REPO, write_result
from serve_modes import MODES, SERVER_MODES, InProcess, Row, run_in_process, run_served, served_model, start_server
from serve_pool import Sampler, request_pool, size_ranges

SERVER_START_S = 300.0  # loading three fused GPU models (tables to the GPU, graphs captured) on a cold machine


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", type=Path, required=True, help="spec files whose triton bundle is served")
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts",
                   help="where `grc build` put <spec>/ (the triton stage is built there when missing)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--row-seconds", type=float, default=20.0, help="load time of one row (warm-up apart)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="requests of one row, at most")
    p.add_argument("--deadline", type=float, default=420.0, help="seconds for the whole run; later rows skipped")
    p.add_argument("--pool", type=int, default=256, help="requests in the pool")
    p.add_argument("--sample", type=int, default=16, help="pool requests whose answers are checked vs float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result name under bench/results/ or a .json path (default serve-<device>)")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        p.error(f"--concurrency: expected positive integers, got {args.concurrency}")
    if args.sample > args.pool:
        p.error(f"--sample {args.sample} exceeds --pool {args.pool}")
    return args


def device_slug() -> str:
    """`h200` for "NVIDIA H200", `cpu` without a GPU: the result file's suffix, read from torch."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    words = [w for w in torch.cuda.get_device_name(0).lower().split() if w != "nvidia"]
    return re.sub(r"[^a-z0-9]", "", words[0]) if words else "gpu"


class Clock:
    """The run's deadline: whether a row of ``need`` seconds still fits."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, need: float) -> bool:
        return self.left() >= need


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_spec(spec_file: Path, args: argparse.Namespace, clock: Clock) -> tuple[list[Row], dict[str, Any]]:
    from grc.build.runner import build
    from grc.serving.triton import bundle as bd
    from grc.spec.loader import load_spec

    loaded = load_spec(spec_file)
    spec = loaded.spec
    root = args.artifacts / spec.name
    if not (root / "triton" / bd.BUNDLE_JSON).is_file():
        log(f"{spec.name}: building the triton bundle into {root}")
        if build(loaded, root, only=["triton"]) != 0:
            raise SystemExit(f"{spec_file}: `grc build` of the triton stage failed (see above)")
    repository = root / "triton" / bd.MODEL_REPOSITORY
    pool = request_pool(spec.model, args.pool, args.seed)
    sampler = Sampler(spec, root / "weights", pool, args.sample)
    concurrencies = sorted(set(args.concurrency), reverse=True)
    rows = [Row(spec.name, m, c, served_model(spec, m)) for m in args.modes for c in concurrencies]
    for row in rows:
        if row.model is None:
            row.skipped = (f"the bundle serves no {MODES[row.mode]} model (bundles.triton.backend / "
                           "extra_backends)")
    info = {"pool": describe_pool(spec, args), "tolerance": sampler.check({})["tolerance"]}
    measure_in_process([r for r in rows if r.mode == "in_process"], repository, spec, pool, sampler, args, clock)
    measure_served([r for r in rows if r.mode in SERVER_MODES], repository, pool, sampler, args, clock, info)
    return rows, info


def describe_pool(spec: Any, args: argparse.Namespace) -> str:
    (h_lo, h_hi), (c_lo, c_hi) = size_ranges(spec.model)
    return (f"{args.pool} one-user requests (numpy seed {args.seed}): history {h_lo}..{h_hi} events, candidates "
            f"{c_lo}..{c_hi}, uniform")


def row_fits(row: Row, args: argparse.Namespace, clock: Clock) -> bool:
    if not row.skipped and not clock.fits(args.row_seconds + 15):
        row.skipped = f"the run's --deadline {args.deadline:.0f} s left {max(clock.left(), 0):.0f} s"
    return not row.skipped


def measure_in_process(rows: list[Row], repository: Path, spec: Any, pool: list, sampler: Sampler,
                       args: argparse.Namespace, clock: Clock) -> None:
    if not rows or not any(row_fits(r, args, clock) for r in rows):
        return
    model = rows[0].model
    assert model is not None
    model_dir = repository / model / str(spec.bundles.triton.model_version)
    try:
        ranker = InProcess(model_dir)
    except ImportError as exc:
        for r in rows:
            r.skipped = r.skipped or f"grc.serving.ranker cannot be imported here ({exc})"
        return
    except Exception as exc:  # reported in the row, the server modes still run
        for r in rows:
            r.failed = f"Ranker.from_model_dir({model_dir.name}): {type(exc).__name__}: {exc}"
        return
    log(f"{spec.name}: in_process Ranker of {model} loaded in {ranker.load_s:.1f} s on {ranker.device}")
    for r in rows:
        if row_fits(r, args, clock):
            run_in_process(r, ranker, pool, sampler, args.row_seconds, args.max_requests)
            log(one_line(r))
    del ranker
    free_gpu_memory()


def measure_served(rows: list[Row], repository: Path, pool: list, sampler: Sampler, args: argparse.Namespace,
                   clock: Clock, info: dict[str, Any]) -> None:
    wanted = sorted({r.model for r in rows if r.model and not r.skipped})
    if not wanted or not clock.fits(args.row_seconds + 30):
        for r in rows:
            row_fits(r, args, clock)
        return
    log(f"starting tritonserver with {', '.join(wanted)}")
    started = time.monotonic()
    server, failed = start_server(repository, wanted, min(SERVER_START_S, max(clock.left() - 30, 30)))
    info["server_start_s"] = round(time.monotonic() - started, 1)
    for r in rows:
        if r.model in failed:
            r.failed = failed[r.model]
    if server is None:
        return
    log(f"tritonserver ready in {info['server_start_s']} s" + (f"; failed: {failed}" if failed else ""))
    try:
        for r in rows:
            if not r.failed and row_fits(r, args, clock):
                run_served(r, server, pool, sampler, args.row_seconds, args.max_requests)
                log(one_line(r))
    finally:
        server.stop()


def free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_line(r: Row) -> str:
    where = f"{r.spec} {r.mode:<10} c={r.concurrency:<3}"
    if r.skipped or r.failed:
        return f"{where} {'skipped' if r.skipped else 'FAILED'}: {r.skipped or r.failed}"
    f = r.figures
    checked = f["checked"]
    bad = f" WRONG: {checked['problems'][0]}" if checked["problems"] else ""
    return (f"{where} {f['users_per_s']:>9.1f} users/s  p50 {f['p50_ms']} ms  p99 {f['p99_ms']} ms  "
            f"errors {f['errors']}/{f['requests']}  batch {f['mean_batch']}  checked {checked['checked']} "
            f"(max_rel {checked['max_rel']:.1e}){bad}")


def print_table(rows: list[Row]) -> None:
    print(f"\n{'spec':<16} {'mode':<10} {'conc':>4} {'users/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
          f"{'requests':>8} {'batch':>6}  where the time goes (ms per request or batch)")
    for r in rows:
        if r.skipped or r.failed:
            print(f"{r.spec:<16} {r.mode:<10} {r.concurrency:>4}  {'skipped' if r.skipped else 'FAILED'}: "
                  f"{r.skipped or r.failed}")
            continue
        f = r.figures
        split = f.get("server_ms") or f.get("ranker_ms_per_batch") or {}
        print(f"{r.spec:<16} {r.mode:<10} {r.concurrency:>4} {f['users_per_s']:>9.1f} {f['p50_ms']:>8} "
              f"{f['p99_ms']:>8} {f['errors']:>7} {f['requests']:>8} {f['mean_batch']!s:>6}  "
              + ", ".join(f"{k} {v}" for k, v in split.items()))


def bad_rows(rows: list[Row]) -> list[str]:
    """Rows that make the run fail: errors, wrong answers, failures (skipped rows are listed, not failures)."""
    out = []
    for r in rows:
        f = r.figures
        if r.failed:
            out.append(f"{r.spec} {r.mode} c={r.concurrency}: failed")
        elif f and (f["errors"] or f["checked"]["problems"] or not f["checked"]["checked"]):
            out.append(f"{r.spec} {r.mode} c={r.concurrency}: errors {f['errors']}, "
                       f"{len(f['checked']['problems'])} wrong of {f['checked']['checked']} checked")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.deadline)
    rows: list[Row] = []
    specs: dict[str, Any] = {}
    for spec_file in args.specs:
        spec_rows, info = run_spec(spec_file, args, clock)
        rows += spec_rows
        specs[spec_rows[0].spec if spec_rows else spec_file.stem] = info
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r.spec, order[r.mode], r.concurrency))
    print_table(rows)
    slug = device_slug()
    path = write_result(args.out or f"serve-{slug}", {
        "what": "served GR models under closed-loop load: one user per request, gRPC over loopback, every answer's "
                "form checked, a sample against PyTorch float64; client and server share the machine"
                + ("" if slug != "cpu" else "; CPU numbers, not the GPU claim"),
        "specs": specs,
        "rows": [r.as_dict() for r in rows],
    })
    log(f"wrote {path}")
    problems = bad_rows(rows)
    for problem in problems:
        print(f"NOT CLEAN: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
