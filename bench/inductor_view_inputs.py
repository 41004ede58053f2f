"""Probe (CPU, seconds): how Inductor hands an opaque custom op three column slices of one activated tensor, beside
the same op taking the activated tensor whole. Why: the package's latency call runs three SiLU/split kernels per
layer (session 25's profile: 9 of its 35 kernels), one per attention input; this says whether passing one packed
input (the op cutting its views) leaves one. Prints, per form, the buffers Inductor allocates before the op and the
kernels it writes them with, from the generated code (TORCH_COMPILE_DEBUG). On the CPU the C++ backend writes the three
buffers in one loop; the GPU's Triton backend writes one kernel per buffer (the package's profile).

    python bench/inductor_view_inputs.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.library import custom_op

D, HEADS = 64, 2  # per-input width; heads of D // HEADS


@custom_op("probe::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (q * k + v).contiguous()


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@custom_op("probe::attention_packed", mutates_args=())
def attention_packed(vqk: torch.Tensor, width: int) -> torch.Tensor:
    v, q, k = vqk[:, :width], vqk[:, width : 2 * width], vqk[:, 2 * width :]
    return (q * k + v).contiguous()


@attention_packed.register_fake
def _(vqk: torch.Tensor, width: int) -> torch.Tensor:
    return torch.empty((vqk.shape[0], width), dtype=vqk.dtype, device=vqk.device)


def views(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    pre = x @ w
    u, vqk = pre[:, :D], pre[:, D:]
    v, q, k = torch.split(torch.nn.functional.silu(vqk), [D, D, D], dim=-1)
    heads = [t.reshape(-1, HEADS, D // HEADS) for t in (q, k, v)]
    return torch.ops.probe.attention(*heads).reshape(-1, D) * u


def packed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    pre = x @ w
    u, vqk = pre[:, :D], pre[:, D:]
    return torch.ops.probe.attention_packed(torch.nn.functional.silu(vqk), D) * u


def run(form: str) -> None:
    """One form compiled and checked against eager (a child process: one debug folder each)."""
    fn = {"views": views, "packed": packed}[form]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU Inductor's Triton backend writes the kernels
    x, w = torch.randn(100, D, device=device), torch.randn(D, 4 * D, device=device)
    got = torch.compile(fn)(x, w)
    assert torch.allclose(got, fn(x, w), atol=1e-5), form


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--form":
        run(sys.argv[2])
        return
    for form in ("views", "packed"):
        with tempfile.TemporaryDirectory() as folder:
            # caches off: a cached compile writes no generated code to read
            env = {**os.environ, "TORCH_COMPILE_DEBUG": "1", "TORCH_COMPILE_DEBUG_DIR": folder,
                   "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # fmt: skip
            subprocess.run([sys.executable, __file__, "--form", form], check=True, env=env, capture_output=True)
            code = next(Path(folder).rglob("output_code.py")).read_text()
        call = code[code.index("def call(") :]
        op = call[: call.index("torch.ops.probe.")]
        buffers = re.findall(r"(buf\d+) = empty_strided\w*\((\([^)]*\)), (\([^)]*\))", op)
        kernels = re.findall(r"^\s+(\w+_fused_\w+)(?:\.run)?\(", op, re.M)
        where = "cuda" if torch.cuda.is_available() else "cpu"
        shapes = [f"{size} strides {strides}" for _, size, strides in buffers]
        print(f"{where} {form}: {len(buffers)} buffers before the op {shapes}, written by {kernels}")


if __name__ == "__main__":
    main()
