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
A served row's connections can be spread over --client-processes processes (bench/serve_client.py): one Python
gRPC client process is GIL-bound below what a GPU server answers. Every answer's form is checked (a bad one
counts as an error); the first --sample pool requests' answers are checked against the PyTorch float64 model
within the spec's tolerance (bf16's on KIND_GPU). Concurrencies run largest first (the
targets' rows); in_process runs after the server has stopped (the GPU to itself; time is kept for it), last
because a package that crashes its loader would end this process: the result file is rewritten after every
row, so the rows before stay. A row the --deadline leaves no room for is listed with the reason.
--grc-failed REASON marks grc and in_process failed up front (the device script's fallback when the aoti
package did not build). Writes bench/results/serve-<device>.json (--out: another name or path).
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import REPO, write_result
from serve_modes import (
    MODES,
    SERVER_MODES,
    Clients,
    InProcess,
    Row,
    ranker_class,
    run_in_process,
    run_served,
    served_model,
    start_server,
)
from serve_pool import Sampler, request_pool, size_ranges

SERVER_START_S = 300.0  # loading three fused GPU models (tables to the GPU, graphs captured) on a cold machine
IN_PROCESS_WAIT_S = 10.0  # kept for the in_process Ranker's load beyond the server's start (they overlap)
ROW_OVERHEAD_S = 5.0  # a row's warm-up, client start and answer checks beyond its --row-seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", type=Path, required=True, help="spec files whose triton bundle is served")
    p.add_argument(
        "--artifacts",
        type=Path,
        default=REPO / "artifacts",
        help="where `grc build` put <spec>/ (the triton stage is built there when missing)",
    )
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--in-process-concurrency", nargs="+", type=int, help="in_process batches (default: --concurrency)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--row-seconds", type=float, default=20.0, help="load time of one row (warm-up apart)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="requests of one row, at most")
    p.add_argument("--deadline", type=float, default=420.0, help="seconds for the whole run; later rows skipped")
    p.add_argument("--pool", type=int, default=256, help="requests in the pool")
    p.add_argument("--sample", type=int, default=16, help="pool requests whose answers are checked vs float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="result name under bench/results/ or a .json path (default serve-<device>)")
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes the gRPC connections of a served row are spread over (the GIL caps one)",
    )
    p.add_argument("--grc-failed", metavar="REASON", help="grc's model could not be built: its rows fail with REASON")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.concurrency + (args.in_process_concurrency or [])):
        p.error(f"--concurrency: expected positive integers, got {args.concurrency}")
    if args.client_processes < 1:
        p.error(f"--client-processes: expected a positive integer, got {args.client_processes}")
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


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    """One run: its deadline, the rows so far (the result file is rewritten after each), one spec at a time."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.end = time.monotonic() + args.deadline
        self.reserve = 0.0  # seconds kept for the in_process rows while the server's rows run
        self.slug = device_slug()
        self.specs: dict[str, Any] = {}
        self.rows: list[Row] = []

    # ---- time
    def left(self) -> float:
        return self.end - time.monotonic() - self.reserve

    def fits(self, row: Row) -> bool:
        """Whether ``row`` is to run: not failed or skipped already, and its time still fits (else skipped)."""
        if row.skipped or row.failed:
            return False
        if self.left() < self.args.row_seconds + ROW_OVERHEAD_S:
            row.skipped = f"the run's --deadline {self.args.deadline:.0f} s left {max(self.left(), 0):.0f} s"
        return not row.skipped

    # ---- results
    def ordered(self) -> list[Row]:
        order = {m: i for i, m in enumerate(MODES)}
        return sorted(self.rows, key=lambda r: (r.spec, order[r.mode], r.concurrency))

    def save(self, complete: bool = False) -> Path:
        what = (
            "served GR models under closed-loop load: one user per request, gRPC over loopback, every answer's "
            "form checked, a sample against PyTorch float64; client and server share the machine"
            + ("; CPU numbers, not the GPU claim" if self.slug == "cpu" else "")
        )
        rows = [r.as_dict() for r in self.ordered()]
        data = {"what": what, "complete": complete, "specs": self.specs, "rows": rows}
        return write_result(self.args.out or f"serve-{self.slug}", data)

    def measure(self, row: Row, how: Callable[..., None], *args: Any) -> None:
        """One row; what breaks it (a client process, a lost server) fails that row, saying why, not the run."""
        try:
            how(row, *args)
        except Exception as exc:
            row.failed = f"{type(exc).__name__}: {exc}"
        log(one_line(row))
        self.save()

    # ---- one spec
    def run_spec(self, spec_file: Path) -> None:
        from grc.build.runner import build
        from grc.serving.triton import bundle as bd
        from grc.spec.loader import load_spec

        args = self.args
        loaded = load_spec(spec_file)
        spec = loaded.spec
        root = args.artifacts / spec.name
        if not (root / "triton" / bd.BUNDLE_JSON).is_file():
            log(f"{spec.name}: building the triton bundle into {root}")
            if build(loaded, root, only=["triton"]) != 0:
                raise SystemExit(f"{spec_file}: `grc build` of the triton stage failed (see above)")
        pool = request_pool(spec.model, args.pool, args.seed)
        tolerance = bd.served_tolerance(bd.load_description(root / "triton"), spec)
        self.sampler = Sampler(spec, root / "weights", pool, tolerance, args.sample)
        self.repository = root / "triton" / bd.MODEL_REPOSITORY
        concurrencies = sorted(set(args.concurrency), reverse=True)
        direct_c = sorted(set(args.in_process_concurrency or args.concurrency), reverse=True)
        rows = [
            Row(spec.name, m, c, served_model(spec, m)) for c in concurrencies for m in args.modes if m != "in_process"
        ]
        rows += [
            Row(spec.name, "in_process", c, served_model(spec, "in_process"))
            for c in direct_c
            if "in_process" in args.modes
        ]
        for row in rows:
            if args.grc_failed and row.mode in ("grc", "in_process"):
                row.failed = args.grc_failed
            elif row.model is None:
                row.skipped = f"the bundle serves no {MODES[row.mode]} model (bundles.triton.backend / extra_backends)"
        self.specs[spec.name] = {
            "pool": describe_pool(spec, args),
            "tolerance": self.sampler.check({})["tolerance"],
            "served": served_config(spec),
        }
        self.rows += rows
        try:
            ranker_class()
        except ImportError as exc:  # before any time is kept for them
            for r in rows:
                if r.mode == "in_process":
                    r.skipped = r.skipped or f"grc.serving.ranker cannot be imported here ({exc})"
        direct = [r for r in rows if r.mode == "in_process" and not (r.failed or r.skipped)]
        self.reserve = IN_PROCESS_WAIT_S + len(direct) * (args.row_seconds + ROW_OVERHEAD_S) if direct else 0.0
        # While tritonserver loads its models (a minute and more on a GPU), this process loads the in_process
        # Ranker and computes the sampled answers' float64 references: both idle until their rows run, the
        # Ranker's rows after the server has stopped (the GPU to itself).
        background = [Background(self.sampler.prepare)]
        if direct:
            model_dir = self.repository / str(direct[0].model) / str(spec.bundles.triton.model_version)
            background.append(Background(lambda: InProcess(model_dir)))
        clients = Clients(args.client_processes, spec_file.resolve(), args.pool, args.seed)
        self.measure_served(spec.name, [r for r in rows if r.mode in SERVER_MODES], pool, clients, background[0])
        background[0].result()
        self.reserve = 0.0
        if direct:
            self.measure_in_process(spec, direct, pool, background[1])

    def measure_served(
        self, spec_name: str, rows: list[Row], pool: list, clients: Clients, references: Background
    ) -> None:
        wanted = sorted({r.model for r in rows if r.model and not (r.skipped or r.failed)})
        if not wanted or not any(self.fits(r) for r in rows):
            return
        log(f"starting tritonserver with {', '.join(wanted)}")
        started = time.monotonic()
        server, failed = start_server(self.repository, wanted, min(SERVER_START_S, max(self.left() - 30, 30)))
        self.specs[spec_name]["server_start_s"] = round(time.monotonic() - started, 1)
        for r in rows:
            if r.model in failed and not r.failed:
                r.failed = failed[r.model]
        self.save()
        if server is None:
            return
        log(f"tritonserver ready in {time.monotonic() - started:.1f} s" + (f"; failed: {failed}" if failed else ""))
        references.result()  # computed meanwhile: no row waits for them, none computes them twice
        try:
            # the largest concurrency first, grc then eager (the targets' rows); kernels, the extra row, last
            for r in sorted(rows, key=lambda r: (r.mode == "kernels", -r.concurrency, SERVER_MODES.index(r.mode))):
                if self.fits(r):
                    self.measure(
                        r,
                        run_served,
                        server,
                        pool,
                        self.sampler,
                        self.args.row_seconds,
                        self.args.max_requests,
                        clients,
                    )
        finally:
            server.stop()

    def measure_in_process(self, spec: Any, rows: list[Row], pool: list, loading: Background) -> None:
        try:
            ranker = loading.result()
        except Exception as exc:  # reported in its rows; the run goes on
            for r in rows:
                r.failed = f"Ranker.from_model_dir({rows[0].model}): {type(exc).__name__}: {exc}"
            return
        log(f"{spec.name}: in_process Ranker of {rows[0].model} loaded in {ranker.load_s:.1f} s on {ranker.device}")
        for r in rows:
            if self.fits(r):
                self.measure(
                    r, run_in_process, ranker, pool, self.sampler, self.args.row_seconds, self.args.max_requests
                )
        del ranker
        free_gpu_memory()


class Background:
    """``fn()`` in a thread; ``result()`` waits for it and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any]):
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # handed to whoever waits for the value
            self.error = exc

    def result(self) -> Any:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def served_config(spec: Any) -> dict[str, Any]:
    """What was served, as the result must say it (two runs of one spec differ by these): the bundle's
    batching, instances and GPU settings from the spec the bundle was built from."""
    t = spec.bundles.triton
    keys = ("pipeline", "backend", "extra_backends", "instance_kind", "instance_count", "max_batch_size",
            "preferred_batch_sizes", "max_queue_delay_us")  # fmt: skip
    return {
        **{k: getattr(t, k) for k in keys},
        "gpu": t.gpu.model_dump(mode="json"),
        "history_cache": t.history_cache.enabled,
    }


def describe_pool(spec: Any, args: argparse.Namespace) -> str:
    (h_lo, h_hi), (c_lo, c_hi) = size_ranges(spec.model)
    return (
        f"{args.pool} one-user requests (numpy seed {args.seed}): history {h_lo}..{h_hi} events, candidates "
        f"{c_lo}..{c_hi}, uniform"
    )


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
    return (
        f"{where} {f['users_per_s']:>9.1f} users/s  p50 {f['p50_ms']} ms  p99 {f['p99_ms']} ms  "
        f"errors {f['errors']}/{f['requests']}  batch {f['mean_batch']}  checked {checked['checked']} "
        f"(max_rel {checked['max_rel']:.1e}){bad}"
    )


def print_table(rows: list[Row]) -> None:
    print(
        f"\n{'spec':<16} {'mode':<10} {'conc':>4} {'users/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'requests':>8} {'batch':>6}  where the time goes (ms per request or batch)"
    )
    for r in rows:
        if r.skipped or r.failed:
            print(
                f"{r.spec:<16} {r.mode:<10} {r.concurrency:>4}  {'skipped' if r.skipped else 'FAILED'}: "
                f"{r.skipped or r.failed}"
            )
            continue
        f = r.figures
        split = f.get("server_ms") or f.get("ranker_ms_per_batch") or {}
        print(
            f"{r.spec:<16} {r.mode:<10} {r.concurrency:>4} {f['users_per_s']:>9.1f} {f['p50_ms']:>8} "
            f"{f['p99_ms']:>8} {f['errors']:>7} {f['requests']:>8} {f['mean_batch']!s:>6}  "
            + ", ".join(f"{k} {v}" for k, v in split.items())
        )
        if f.get("phase_ms_per_batch"):  # the fused model's execute(), phase by phase (ms per batch)
            backend = f" | backend {f['backend_ms_per_batch']}" if "backend_ms_per_batch" in f else ""
            phases = ", ".join(f"{k} {v}" for k, v in f["phase_ms_per_batch"].items())
            print(f"{'':<30}{'phases ms per batch:':>34} {phases}{backend}")


def bad_rows(rows: list[Row]) -> list[str]:
    """Rows that make the run fail: errors, wrong answers, failures (skipped rows are listed, not failures)."""
    out = []
    for r in rows:
        f = r.figures
        if r.failed:
            out.append(f"{r.spec} {r.mode} c={r.concurrency}: failed")
        elif f and (f["errors"] or f["checked"]["problems"] or not f["checked"]["checked"]):
            out.append(
                f"{r.spec} {r.mode} c={r.concurrency}: errors {f['errors']}, "
                f"{len(f['checked']['problems'])} wrong of {f['checked']['checked']} checked"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    bench = Bench(parse_args(argv))
    for spec_file in bench.args.specs:
        bench.run_spec(spec_file)
    path = bench.save(complete=True)
    print_table(bench.ordered())
    log(f"wrote {path}")
    problems = bad_rows(bench.rows)
    for problem in problems:
        print(f"NOT CLEAN: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
