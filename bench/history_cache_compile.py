"""What one new autotuning key of grc's attention kernel costs before a device run's first figure: the
seconds Triton takes to compile each config listed for a spec's head dim for Hopper (sm_90), on this host
(no GPU needed: Triton's own ptxas), with the specialisation a launch on the GPU gives (pointers and strides
divisible by 16). bench/history_cache_device.py's first calls pay 4 of these per new key (one more per new
integer specialisation); bench/results/history-cache-notes.md quotes them.

    python bench/history_cache_compile.py [--spec specs/mtgr-small.yaml] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result
from grc.spec.loader import load_spec


def compile_seconds(head_dim: int, positions: int, partial: bool, config: tuple[int, ...]) -> float:
    """Seconds to compile the bf16 attention kernel (the GPU's variant: tanh SiLU, inline PTX) for sm_90."""
    from kernels.hstu_attention import PTX_CVT, PTX_GATHER, PTX_SHFL, _hstu_fwd_kernel, _launch_options
    from tests.kernels.test_hopper_compile import compile_kernel

    options = _launch_options(config)
    const = {"CAUSAL": True, "FAST_SILU": True, "ALLOW_TS_FAST": True, "P": positions, "DQK": head_dim,
             "DV": head_dim, "BLOCK_M": options.pop("BLOCK_M"), "BLOCK_N": options.pop("BLOCK_N"),
             "BLOCK_DQK": head_dim, "BLOCK_DV": head_dim, "DOT_PREC": "tf32", "DOT_UPCAST": False,
             "PTX": PTX_GATHER | PTX_CVT | PTX_SHFL, "ABLATE": 0, "SEARCH": 256, "PARTIAL": partial}  # fmt: skip
    pointers = {n: "*bf16" for n in ("Q", "K", "V")} | {n: "*i64" for n in ("q_offsets", "kv_offsets", "ts", "ncand")}
    pointers |= {n: "*fp32" for n in ("time_tab", "pos_tab", "far_tab")} | {"Out": "*fp32" if partial else "*bf16"}
    start = time.perf_counter()
    compile_kernel(_hstu_fwd_kernel, pointers, const, ("alpha", "inv_norm"), "fp32", options)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="specs/mtgr-small.yaml")
    ap.add_argument("--out", default="history-cache-compile-cpu", help="result name or .json path")
    args = ap.parse_args()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="grc-compile-")  # every compile a real one
    from kernels.hstu_attention import CONFIGS

    cfg = load_spec(args.spec).spec.model
    head = max(cfg.hstu.head_qk, cfg.hstu.head_v)
    padded = min((d for d in CONFIGS if d >= head), default=max(CONFIGS))
    rows = []
    for partial in (True, False):
        for config in CONFIGS[padded]:
            seconds = compile_seconds(padded, cfg.hstu.position_buckets, partial, config)
            rows.append({"partial": partial, "config": list(config), "seconds": round(seconds, 2)})
            print(rows[-1], flush=True)
    result = {"spec": args.spec, "head_dim": padded, "target": "sm_90 (Triton's ptxas on this host)", "cases": rows}
    out = Path(args.out) if args.out.endswith(".json") else args.out
    print(f"wrote {write_result(out, result)}")


if __name__ == "__main__":
    main()
