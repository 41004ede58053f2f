"""The fused serving path on a GPU, checked start to end in one device call (issue 16): the same checks
as tests/serving/test_fused_gpu_real.py, without pytest (the device machine may lack it).

Sections, each with its time estimate (a section that would not fit the remaining budget is skipped
with a line saying so), results written as they come through bench/_common.write_result:
  padding   grc's kernels, float32 and bfloat16, real rows unpadded vs padded into CUDA-graph buckets
  gather    the UVA gather kernel reading pinned host memory, every table dtype, bit for bit
  tables    device and pinned_host tables (float, int8, fp8) vs the memory-mapped lookups, bit for bit
  served    tests/specs/mtgr-tiny-gpu.yaml built (aoti CUDA package), each fused model's Ranker on cuda:0,
            `grc deploy --detach` (smoke test vs float64), served on KIND_GPU: scores, graph-hit metrics;
            `grc deploy --stop` (the dry run serves its KIND_CPU variant: the same flow, no graphs)

    python bench/fused_gpu_check.py --out-dir DIR [--budget-s 420]
    python bench/fused_gpu_check.py --dry-run --out-dir DIR   # CPU: Triton interpreter, KIND_CPU serving
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before triton is imported: the interpreter flag is read when kernels are decorated
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import write_result
from tests.serving import fused_checks as fc
from tests.serving import fused_gpu_checks as gc

STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", flush=True)


def padding(device: str, seed: int) -> dict[str, Any]:
    out = {}
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        result = fc.padding_errors("triton", dtype, seed, device=device, graphs=device != "cpu")
        fc.assert_padding_exact(result, fc.PAD_TOL[name], seed, graphs=device != "cpu")
        out[name] = result
    return out


def gather(device: str, seed: int) -> dict[str, Any]:
    result = fc.gather_errors(seed, device=device)
    assert all(result.values()), result
    return result


def tables(device: str, seed: int, work: Path) -> dict[str, Any]:
    from grc.build.progress import BuildRecords
    from grc.build.runner import build
    from grc.spec.loader import load_spec

    out: dict[str, Any] = {}
    for kind in ("bfloat16", "int8", "fp8_e4m3"):
        folder = work / f"tables-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        spec = folder / "mtgr-tiny.yaml"
        spec.write_text(f"extends: {fc.MTGR_TINY}\nweights:\n  init: {{seed: 3, embedding_dtype: {kind}}}\n")
        loaded = load_spec(spec)
        assert build(loaded, folder / "artifacts" / "mtgr-tiny", only=["weights"], records=BuildRecords()) == 0
        for placement in ("device", "pinned_host"):
            result = fc.table_matches(
                folder / "artifacts" / "mtgr-tiny" / "weights",
                loaded.spec.model,
                placement,
                seed,
                device=device if device == "cpu" else "cuda:0",
            )
            assert result and all(result.values()), (kind, placement, result)
            out[f"{kind}/{placement}"] = result
    return out


def served(device: str, seed: int, work: Path) -> dict[str, Any]:
    if device == "cpu":  # the dry run: the same flow on the KIND_CPU variant of the spec
        result = gc.served_on_gpu(work / "served", seed, gc.cpu_variant(work / "spec"), "cpu")
    else:
        result = gc.served_on_gpu(work / "served", seed)
    gc.assert_served(result, seed, graphs=device != "cpu")
    return result


SECTIONS: list[tuple[str, float, Callable[..., dict[str, Any]]]] = [
    ("padding", 60, padding),
    ("gather", 10, gather),
    ("tables", 40, tables),
    ("served", 300, served),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would end after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, KIND_CPU serving")
    opts = parser.parse_args()
    device = "cpu" if opts.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("fused_gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); use --dry-run on a CPU")
        return 2
    seed = secrets.randbits(31)
    words = re.findall(r"[A-Za-z]+\d+\w*", torch.cuda.get_device_name()) if device == "cuda" else ["dry-run"]
    gpu = words[-1].lower() if words else "gpu"  # 'h200' from 'NVIDIA H200', as bench/kernels.py names it
    out = opts.out_dir / f"fused-gpu-check-{gpu}.json"
    results: dict[str, Any] = {"seed": seed, "sections": {}}
    say(f"torch {torch.__version__} on {gpu}; seed {seed}; budget {opts.budget_s:.0f} s")
    failed = False
    with tempfile.TemporaryDirectory(prefix="fused-gpu-") as tmp:
        for name, estimate, run in SECTIONS:
            left = opts.budget_s - (time.monotonic() - STARTED)
            if estimate > left:
                results["sections"][name] = {"status": "skipped", "why": f"needs ~{estimate:.0f} s, {left:.0f} s left"}
            else:
                t0 = time.monotonic()
                try:
                    args = (device, seed) if name in ("padding", "gather") else (device, seed, Path(tmp))
                    results["sections"][name] = {"status": "passed", "result": run(*args)}
                except Exception as exc:
                    failed = True
                    results["sections"][name] = {
                        "status": "failed",
                        "error": f"{type(exc).__name__}: {exc}"[:4000],
                        "traceback": traceback.format_exc()[-4000:],
                    }
                results["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
            section = results["sections"][name]
            say(f"{name}: {section['status']} {section.get('why') or section.get('error', '')[:300]}")
            write_result(out, results)
    say(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
