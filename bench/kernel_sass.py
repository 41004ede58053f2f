"""Offline (no GPU): an HSTU attention kernel compiled for sm_90a with this Python's Triton and ptxas, per config:
registers, stack, spill bytes, and per key loop (a backward branch whose body holds HGMMA) the SASS instruction
count and what it holds: HGMMA, local loads/stores (spills inside the loop), MUFU, I2F, shuffles, global loads,
warpgroup barriers. The numbers kernels-notes.md quotes per loop come from here.

    python bench/kernel_sass.py 64/32/4/3/128 64/32/4/3/128/168     # BLOCK_M/BLOCK_N/warps/stages/head dim[/registers]
    python bench/kernel_sass.py --positions 256 64/64/4/2/64/168
    python bench/kernel_sass.py --hopper 64/64/4/2/2/1/128 64/32/4/2/2/0/256   # kernels/hstu_hopper.py (Gluon):
        # BLOCK_M/BLOCK_N/warps/K stages/V stages/Q in registers/head dim[/registers]

Run it with the Triton the device runs (3.6 on the lent H200's image): e.g. `python -m venv --system-site-packages
/tmp/t36 && /tmp/t36/bin/pip install --no-deps triton==3.6.0`, then `/tmp/t36/bin/python bench/kernel_sass.py ...`;
another version's code generation can differ. Prints one block per config; writes nothing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOOP_COUNTS = {  # column -> SASS opcode pattern
    "hgmma": r"HGMMA",
    "stl": r"\bSTL",
    "ldl": r"\bLDL",
    "mufu": r"MUFU",
    "i2f": r"\bI2F",
    "shfl": r"SHFL",
    "ldg": r"\bLDG",
    "wg_bar": r"WARPGROUP\.(DEPBAR|ARRIVE)",
}


def compile_config(config: tuple[int, ...], positions: int) -> Any:
    from kernels.hstu_attention import _hstu_fwd_kernel, _launch_options
    from tests.kernels.test_hopper_compile import ATTENTION_CONST, ATTENTION_PTRS, compile_kernel

    bm, bn, warps, stages, head = config[:5]
    options = _launch_options((bm, bn, warps, stages, *config[5:]))
    const = dict(ATTENTION_CONST, BLOCK_M=options.pop("BLOCK_M"), BLOCK_N=options.pop("BLOCK_N"), P=positions,
                 DQK=head, DV=head, BLOCK_DQK=head, BLOCK_DV=head)  # fmt: skip
    return compile_kernel(_hstu_fwd_kernel, ATTENTION_PTRS, const, ("alpha", "inv_norm"), "fp32", options)


def sass(compiled: Any) -> tuple[str, str]:
    """(ptxas -v report, cuobjdump -sass listing) of the compiled PTX, for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = Path(get_ptxas(90).path)
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = Path(tmp) / "k.ptx", Path(tmp) / "k.o"
        src.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(obj)],
                                capture_output=True, text=True, check=True)  # fmt: skip
        listing = subprocess.run([str(ptxas.parent / "cuobjdump"), "-sass", str(obj)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
    return report.stderr + report.stdout, listing.stdout


def key_loops(listing: str) -> list[dict[str, Any]]:
    """Every loop whose body holds HGMMA: its start address, instruction count and LOOP_COUNTS."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", listing)]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        jump = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        target = int(jump.group(1), 16) if jump else None
        if target is None or target >= addr or target not in index:
            continue
        body = [t for _, t in ins[index[target] : i + 1]]
        if any("HGMMA" in t for t in body):
            counts = {k: sum(1 for t in body if re.search(p, t)) for k, p in LOOP_COUNTS.items()}
            loops.append({"start": hex(target), "instructions": len(body), **counts})
    return loops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="BLOCK_M/BLOCK_N/warps/stages/head_dim[/max registers]")
    ap.add_argument("--positions", type=int, default=512, help="position buckets P (mtgr-base's 512 by default)")
    ap.add_argument("--hopper", action="store_true", help="the Gluon sm90 kernel (configs of 7 or 8 numbers)")
    args = ap.parse_args()
    import triton

    print(f"triton {triton.__version__}, sm_90a, P {args.positions}")
    for text in args.configs:
        config = tuple(int(x) for x in text.split("/"))
        if args.hopper:
            if len(config) not in (7, 8):
                ap.error(f"{text}: expected BLOCK_M/BLOCK_N/warps/K stages/V stages/Q in registers/head dim[/regs]")
            from tests.kernels.test_hstu_hopper import compile_hopper

            cap = config[7] if len(config) > 7 else None
            compiled = compile_hopper(config[:6], config[6], positions=args.positions, maxnreg=cap)
        elif len(config) not in (5, 6):
            ap.error(f"{text}: expected BLOCK_M/BLOCK_N/warps/stages/head_dim[/max registers]")
        else:
            compiled = compile_config(config, args.positions)
        report, listing = sass(compiled)
        regs = re.findall(r"Used (\d+) registers", report)
        stack = re.findall(r"(\d+) bytes stack frame", report)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        print(f"{text}: registers {regs}, stack {stack} B, spill stores/loads {spills} B, "
              f"shared {compiled.metadata.shared} B, wgmma serialised (C7515): {'C7515' in report}")  # fmt: skip
        for loop in key_loops(listing):
            print("   ", "  ".join(f"{k} {v}" for k, v in loop.items()))


if __name__ == "__main__":
    main()
