"""The attention kernels now vs at an earlier commit, side by side in one run on one CUDA GPU.

    git archive REV kernels | tar -x -C artifacts/before     # the earlier kernels/ (on this side, from git)
    python bench/kernels_ab.py --before artifacts/before/kernels --label REV [--head-dims 128,256,64]
        [--seqs 8192,2048,512] [--budget-s S] [--out-dir DIR]

Per head dim and seq (64k tokens, bf16, causal, bench/kernels.py's tables and head counts): the Triton kernel
(autotuned) and the Gluon sm90 kernel (its default config), before and now, back to back so that clock drift hits
both; every row checked against the float64 reference on fresh inputs into a NaN-poisoned output (bound 1e-2, as
bench/gpu_kernels_check.py). A cross-run comparison of two result files mixes in each run's clocks; this does not.
Writes kernels-ab-<gpu>.json (provenance by code) and prints the table with now / before time ratios.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.kernels as bench
from bench._common import RESULTS, write_result
from bench.kernels_explore import Launcher, row
from bench.report import ab_pairs
from kernels import hstu_hopper
from kernels.hstu_attention import hstu_attention_cached_triton

SMALL = ([700, 300, 1200], [100, 0, 300], None)  # the exactness check's users (lengths, candidates)


def load_before(folder: Path) -> tuple[ModuleType, ModuleType]:
    """(hstu_attention, hstu_hopper) of an earlier kernels/ folder, imported as package kernels_before (its
    __init__ left out: it would register the grc:: ops a second time)."""
    root = Path(tempfile.mkdtemp(prefix="kernels-before-"))
    pkg = root / "kernels_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for src in folder.glob("*.py"):
        if src.name != "__init__.py":
            text = re.sub(r"\bfrom kernels\b", "from kernels_before", src.read_text())
            (pkg / src.name).write_text(re.sub(r"\bimport kernels\b", "import kernels_before", text))
    sys.path.insert(0, str(root))  # kept: Triton reads a kernel's source file again when it compiles
    attention = importlib.import_module("kernels_before.hstu_attention")
    return attention, importlib.import_module("kernels_before.hstu_hopper")


def launchers(before: tuple[ModuleType, ModuleType], d: int, kernels: str) -> list[tuple[str, Launcher]]:
    attn_b, hop_b = before
    out: list[tuple[str, Launcher]] = []
    if "triton" in kernels.split(","):
        out += [("triton before", attn_b.hstu_attention_cached_triton), ("triton now", hstu_attention_cached_triton)]
    if "hopper" in kernels.split(",") and d in hstu_hopper.SUPPORTED_HEAD_DIMS:
        out += [("hopper before", hop_b.hstu_attention_hopper), ("hopper now", hstu_hopper.hstu_attention_hopper)]
    return out


def print_table(rows: list[dict[str, Any]], label: str) -> None:
    print(f"\n  d   seq heads | kernel  | before ({label}) ms | now ms | now / before | %peak now | rel err b / n")
    for variant, b, n in ab_pairs(rows):
        errs = f"{b['rel_err_f64']:.1e} / {n['rel_err_f64']:.1e}"
        print(f"{n['d']:4} {n['seq']:5} {n['heads']:5} | {variant:7} | {b['ms']:16.3f} | {n['ms']:6.3f} | "
              f"{n['ms'] / b['ms']:12.3f} | {n['pct_of_peak']:8.1f}% | {errs}")  # fmt: skip
    for r in rows:
        if "ms" not in r:
            print(f"  {r['item']}: {r.get('error') or r.get('skipped')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="an earlier commit's kernels/ folder")
    parser.add_argument("--label", default="before", help="what --before is (a commit)")
    parser.add_argument("--head-dims", default="128,256,64")
    parser.add_argument("--seqs", default="8192,2048,512")
    parser.add_argument("--kernels", default="triton,hopper", help="which kernels to time: triton, hopper or both")
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    opts = parser.parse_args()
    before = load_before(opts.before)
    deadline = time.monotonic() + opts.budget_s
    peak = bench.matmul_peak_tflops()
    print(f"matmul peak {peak:.0f} TFLOP/s")
    rows: list[dict[str, Any]] = []
    result = {"before": opts.label, "matmul_peak_tflops": peak, "rows": rows}
    out = opts.out_dir / f"kernels-ab-{bench.gpu_tag()}.json"
    for d in map(int, opts.head_dims.split(",")):
        for seq in map(int, opts.seqs.split(",")):
            users = bench.TOTAL_TOKENS // seq
            big = ([seq] * users, [0] * users, None)
            for variant, launch in launchers(before, d, opts.kernels):
                item = f"{variant} d{d} seq {seq}"
                if time.monotonic() > deadline:
                    rows.append({"item": item, "skipped": "time budget spent"})
                    continue
                job = functools.partial(row, "ab", variant, launch, big, SMALL, bench.HEADS_AT[d][-1], d,
                                        bench.TABLES[d], peak)  # fmt: skip
                try:
                    rows.append(job())
                    print(f"{item}: {rows[-1]['ms']:.3f} ms, rel err {rows[-1]['rel_err_f64']:.1e}", flush=True)
                except Exception as exc:  # one failing variant must not lose the rest of the run
                    rows.append({"item": item, "error": f"{type(exc).__name__}: {exc}"[:500]})
                    print(f"{item}: {rows[-1]['error']}", flush=True)
                write_result(out, result)
    print_table(rows, opts.label)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
