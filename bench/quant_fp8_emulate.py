"""Which GEMMs can go fp8 and keep the ranking gates: the fp8 numerics emulated on the CPU.

    python bench/quant_fp8_emulate.py --spec mtgr-small --out bench/results/quant-fp8-emulated-mtgr-small.json

The dense model from the spec's seeded init (in memory: no tables, no artifacts), its fp8 copies
calibrated as the aoti stage calibrates (grc.engine.aoti_quality.fp8_package_model), one per set of
fp8 GEMMs, run in bfloat16 with the fp8 GEMMs emulated (grc/model/fp8.py ``emulate``: the same e4m3
operands, dequantized, multiplied in float32; what the H200's _scaled_mm computes up to its
accumulation order) and scored by verify.ranking's gates against the float32 model, as the bench
does on the GPU. A one-off CPU run (mtgr-small: about a minute per variant), not a test.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import torch  # noqa: E402
from _common import write_result  # noqa: E402

from grc.aoti.inputs import seeded_dense  # noqa: E402
from grc.aoti.model import JaggedDense  # noqa: E402
from grc.engine.aoti_quality import fp8_package_model, held_out_reference, ranking_figures  # noqa: E402
from grc.model.fp8 import KINDS, PACKAGE_GEMMS, set_emulate  # noqa: E402
from grc.spec.loader import load_spec  # noqa: E402
from grc.verify.ranking import format_rank_figures  # noqa: E402

VARIANTS: dict[str, tuple[str, ...]] = {
    "bf16": (),
    "fp8 all": KINDS,
    "fp8 uvqk+out (heads bf16)": ("uvqk", "out"),
    "fp8 uvqk (out, heads bf16)": ("uvqk",),
    "fp8 out (the package)": PACKAGE_GEMMS,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="mtgr-small", help="a spec name under specs/ or a YAML path")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = Path(args.spec) if args.spec.endswith(".yaml") else REPO / "specs" / f"{args.spec}.yaml"
    spec = load_spec(path).spec
    dense = seeded_dense(spec.model).eval()
    reference = held_out_reference(dense, spec)
    data: dict[str, Any] = {
        "what": "fp8 GEMM sets vs the ranking gates, e4m3 emulated on the CPU, bench/quant_fp8_emulate.py",
        "spec": spec.name,
        "device": "cpu (emulated e4m3 GEMMs, the rest bfloat16)",
        "torch": torch.__version__,
        "gates": spec.verify.ranking.model_dump(),
        "variants": {},
    }
    for label, gemms in VARIANTS.items():
        started = time.perf_counter()
        model = fp8_package_model(dense, spec, gemms)[0] if gemms else copy.deepcopy(dense)
        runner = JaggedDense(model.to(torch.bfloat16), "pytorch").eval()
        set_emulate(runner, True)
        figures = ranking_figures(dense, spec, "cpu-emu", label, reference)(runner, torch.device("cpu"), torch.bfloat16)
        passed = all(f.ok for f in figures)
        data["variants"][label] = {
            "fp8_gemms": list(gemms),
            "passed": passed,
            "figures": [f.as_dict() for f in figures],
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"{label}: {'passed' if passed else 'FAILED'}\n{format_rank_figures(figures)}", flush=True)
        if args.out is not None:
            write_result(args.out, data)


if __name__ == "__main__":
    main()
