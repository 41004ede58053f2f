"""The mtgr-small package's latency call (1 user x 1,515 tokens, bf16, CUDA graph) built with each form of the
per-token user lookup in grc/aoti/model.py, one process: ``search`` (the landed ``jagged_positions``: one binary
search over the offsets), ``marks`` (sessions 19-22's int64 marks, index_add + cumsum: aten's sort-based index_put
on the GPU), ``search+combo`` (the search with Inductor's combo_kernels on). Per variant: compile seconds, p50 / min
of 300 replays (CUDA events), device kernels of one profiled replay by name, max relative error vs float64.

    OUT=$OUT python bench/aoti_positions_ab.py [variant ...]      # a CUDA sm90 GPU; -> $OUT/aoti-positions-ab.json

Session 22 ran this probe from an uncommitted copy: its raw output, without provenance, is
bench/results/aoti-positions-ab-h200-s22-probe.log (a log, not a result); committed afterwards so that the figures
quoted in grc/aoti/model.py have a source. A rerun writes a result with its provenance.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # grc and kernels from a checkout

import grc.aoti.build as build
import grc.aoti.model as am
from bench._common import write_result
from grc.aoti.inputs import random_inputs, seeded_dense
from grc.aoti.runtime import CudaGraphRunner, load
from grc.spec.loader import load_spec
from kernels import hstu_hopper


def marks_positions(
    offsets: torch.Tensor, num_candidates: torch.Tensor, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sessions 19-22's form: +1 at each user's end, prefix-summed into each token's user."""
    pos = torch.arange(total, device=offsets.device)
    ends = offsets[1:]
    marks = torch.zeros(total + 1, dtype=offsets.dtype, device=offsets.device)
    user = marks.index_add(0, ends, torch.ones_like(ends)).cumsum(0)[:total]
    return pos - offsets[:-1][user], (offsets[1:] - offsets[:-1] - num_candidates)[user]


def measure(name: str, dense: Any, lat: Any, want: torch.Tensor, dev: torch.device) -> dict[str, Any]:
    search = am.jagged_positions
    am.jagged_positions = marks_positions if name.startswith("marks") else search
    configs = dict(build.INDUCTOR_CONFIGS)
    if "combo" in name:
        build.INDUCTOR_CONFIGS["combo_kernels"] = True
    try:
        started = time.time()
        with hstu_hopper.kernel_choice("auto"):
            prog = am.export_program(dense, dev, torch.bfloat16)
            path = Path(tempfile.mkdtemp()) / "m.pt2"
            build.compile_package(prog, path, {})
        compile_s = time.time() - started
        graphs = CudaGraphRunner(load(path, "cuda", single_threaded=True), max_graphs=1)
        args = lat.args()
        with torch.no_grad():
            got = graphs(*args).clone()
            err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
            times = []
            for _ in range(300):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graphs(*args)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                graphs(*args)
                torch.cuda.synchronize()
    finally:
        am.jagged_positions = search
        build.INDUCTOR_CONFIGS.clear()
        build.INDUCTOR_CONFIGS.update(configs)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names: dict[str, int] = {}
    for e in events:
        names[e.name] = names.get(e.name, 0) + 1
    return {
        "compile_s": round(compile_s, 1), "p50_ms": round(statistics.median(times), 4), "min_ms": round(min(times), 4),
        "rel_err": err, "events": len(events), "device_ms": round(sum(e.device_time for e in events) / 1000, 4),
        "kernels": dict(sorted(names.items(), key=lambda kv: -kv[1])),
    }  # fmt: skip


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("aoti_positions_ab.py: torch sees no CUDA device")
    cfg = load_spec(Path(__file__).resolve().parents[1] / "specs/mtgr-small.yaml").spec.model
    dense = seeded_dense(cfg)
    dev = torch.device("cuda")
    lat = random_inputs(cfg, 1, 1000, 512, torch.Generator().manual_seed(0), ragged=False).to(dev, torch.bfloat16)
    want = dense.double().forward_jagged(*lat.to("cpu", torch.float64).args())
    dense.float()
    result: dict[str, Any] = {"spec": "mtgr-small", "shape": "1 x 1,515 (1000 history, 512 candidates)", "variants": {}}
    out = Path(os.environ.get("OUT", "."), "aoti-positions-ab.json")
    for name in sys.argv[1:] or ["search", "marks", "search+combo"]:
        try:
            result["variants"][name] = row = measure(name, dense, lat, want, dev)
            print(name, {k: v for k, v in row.items() if k != "kernels"}, flush=True)
        except Exception as exc:  # a variant that fails to build is a result: the next one still runs
            result["variants"][name] = {"error": repr(exc)[:2000]}
            print(name, "FAILED", repr(exc)[:500], flush=True)
        write_result(out, result)


if __name__ == "__main__":
    main()
