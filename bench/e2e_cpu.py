"""The CPU comparison of bench/e2e.py (--cpu): eager PyTorch (the jagged reference and the padded
form) vs onnxruntime on the exported ONNX vs the CPU AOTInductor package, hstu-tiny and
mtgr-small dense graphs at a small batch, float32. Writes through bench/_common.write_result."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import REPO, write_result
from e2e_measure import rel_error, stats, time_calls

from grc.aoti.inputs import JaggedInputs, random_inputs, seeded_dense
from grc.model.jagged import lengths_of, to_jagged, to_padded
from grc.spec.loader import load_spec

CPU_CASES = {
    "hstu-tiny": {"users": 4, "history": 40, "candidates": 16},
    "mtgr-small": {"users": 2, "history": 100, "candidates": 32},
}


def cpu_modes(dense: Any, inp: JaggedInputs, feeds: dict[str, Any], sess: Any, aoti_run: Callable[..., Any]) -> dict:
    """Each CPU mode as a call returning jagged scores [T, tasks]."""
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
    from grc.onnx.export import export_onnx

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    data: dict[str, Any] = {
        "threads": args.threads,
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
        rows: dict[str, Any] = {}
        for mode, fn in cpu_modes(dense, inp, feeds, sess, aoti_run).items():
            with torch.no_grad():
                res = fn()
                fn()
                times = time_calls(fn, cpu, 2.0, min_iters=5, max_iters=200)
            rows[mode] = {**stats(times, shape["users"]), "rel_err_vs_fp64": rel_error(res, ref)}
        base = rows["eager_padded_fp32"]["p50_ms"]  # the batched form a user runs; the jagged one is the oracle
        for r in rows.values():
            r["speedup_vs_eager_padded"] = round(base / r["p50_ms"], 2)
        data["specs"][name] = {
            "workload": shape,
            "tokens": int(inp.offsets[-1]),
            "onnx_export_seconds": round(export_s, 1),
            "aoti_build_seconds": json.loads((work / "cpu" / "metadata.json").read_text())["build_seconds"],
            "aoti_parity": entry["parity"],
            "modes": rows,
        }
        print(name, json.dumps(rows, indent=None), flush=True)
        write_result(args.out, data)
