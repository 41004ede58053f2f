"""Check the HSTUAttention CUDA kernel against the PyTorch padded reference, on a GPU.

    python plugins/check_kernel.py --arch sm_90 --out bench/results/plugin-kernel-h100.json

Compiles plugins/kernel_check.cu (the plugin's kernel behind C entry points) with nvcc for the
given arch, runs it through ctypes on torch CUDA tensors, and compares with
grc.model.attention.hstu_attention_padded in float64 on the CPU. Exit status 1 if a case fails.
Needs a GPU, nvcc and torch with CUDA; TensorRT is not involved (no TensorRT build runs on sm90).
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from grc.model.attention import hstu_attention_padded  # noqa: E402

TOL = {"f32": 1e-5, "f16": 2e-2, "bf16": 6e-2}  # max |a-b| / max |ref| (grc.verify.compare's max_rel)
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# (name, users, N, heads, dqk, dv, P, NB, causal, int64_ends): covers padding, one key tile and several,
# clamped positions (P small), clamped time buckets (NB small, large gaps), wide heads, MTGR's 32 and
# 64 time buckets with timestamps at the int64 ends (saturated gaps: the last bucket, not a wrap)
CASES = [
    ("tiny", 2, 8, 2, 16, 16, 32, 16, True, False),
    ("full-history", 3, 40, 2, 16, 16, 8, 6, False, False),
    ("multi-tile", 2, 300, 4, 32, 64, 64, 20, True, False),
    ("wide-head", 2, 160, 2, 128, 128, 256, 32, True, False),
    ("int64-ends-nb32", 2, 64, 2, 32, 32, 16, 32, True, True),
    ("int64-ends-nb64", 2, 64, 2, 32, 32, 16, 64, False, True),
]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def build(arch: str, out: Path) -> list[str]:
    cmd = [
        "nvcc",
        "-std=c++17",
        "-O2",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        f"-arch={arch}",
        "-I",
        str(HERE),
        "-o",
        str(out),
        str(HERE / "kernel_check.cu"),
    ]
    subprocess.run(cmd, check=True)
    return cmd


def make_case(
    users: int, n: int, heads: int, dqk: int, dv: int, p: int, nb: int, seed: int, int64_ends: bool = False
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, n // 3), n + 1, (users,), generator=g)
    lengths[0] = n
    candidates = torch.stack([torch.randint(1, int(length), (1,), generator=g)[0] for length in lengths])
    gaps = torch.randint(0, 1 << 20, (users, n), generator=g)  # large gaps reach the last time bucket
    timestamps = torch.cumsum(gaps, 1).long() + 1_700_000_000
    if int64_ends:  # some events at INT64_MIN / INT64_MAX: gaps up to 2**64 - 1, saturated
        ends = torch.tensor([INT64_MIN, INT64_MAX, INT64_MIN + 1, -1])
        pick = torch.randint(0, 4, (users, n), generator=g)
        timestamps = torch.where(torch.rand(users, n, generator=g) < 0.4, ends[pick], timestamps)
    return {
        "q": torch.randn(users, n, heads, dqk, generator=g),
        "k": torch.randn(users, n, heads, dqk, generator=g),
        "v": torch.randn(users, n, heads, dv, generator=g),
        "lengths": lengths.long(),
        "num_candidates": candidates.long(),
        "timestamps": timestamps,
        "pos_w": torch.randn(heads, 2 * p - 1, generator=g),
        "ts_w": torch.randn(heads, nb, generator=g),
    }


def reference(t: dict[str, torch.Tensor], dtype: torch.dtype, alpha: float, norm: float, causal: bool) -> torch.Tensor:
    """float64 padded reference on the inputs rounded to the kernel's dtype."""
    x = {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in t.items()}
    return hstu_attention_padded(x["q"], x["k"], x["v"], x["lengths"], x["num_candidates"], x["timestamps"],
                                 x["pos_w"], x["ts_w"], alpha, norm, causal)  # fmt: skip


def run_kernel(
    lib: ctypes.CDLL, kind: str, t: dict[str, torch.Tensor], alpha: float, norm: float, causal: bool
) -> torch.Tensor:
    dt = DTYPES[kind]
    dev = {k: (v.to(dt) if v.is_floating_point() else v).cuda().contiguous() for k, v in t.items()}
    users, n, heads, dqk = dev["q"].shape
    dv = dev["v"].shape[-1]
    out = torch.full((users, n, heads, dv), float("nan"), dtype=dt, device="cuda")
    fn = getattr(lib, f"grc_hstu_attention_{kind}")
    fn.restype = ctypes.c_int
    ptr = [
        ctypes.c_void_p(dev[k].data_ptr())
        for k in ("q", "k", "v", "lengths", "num_candidates", "timestamps", "pos_w", "ts_w")
    ]
    p = (dev["pos_w"].shape[1] + 1) // 2
    err = fn(
        *ptr,
        ctypes.c_void_p(out.data_ptr()),
        users,
        n,
        heads,
        dqk,
        dv,
        p,
        dev["ts_w"].shape[1],
        ctypes.c_float(alpha),
        ctypes.c_float(norm),
        int(causal),
    )
    if err != 0:
        raise RuntimeError(f"kernel returned CUDA error {err}")
    return out.float().cpu()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = Path(tmp) / "libgrc_kernel_check.so"
        started = time.perf_counter()
        cmd = build(args.arch, lib_path)
        compile_s = time.perf_counter() - started
        lib = ctypes.CDLL(str(lib_path))
        for i, (name, users, n, heads, dqk, dv, p, nb, causal, int64_ends) in enumerate(CASES):
            t = make_case(users, n, heads, dqk, dv, p, nb, seed=i, int64_ends=int64_ends)
            alpha, norm = dqk**-0.5, float(n + 7)  # norm is the spec's max_seq_len, not N: make them differ
            for kind, tol in TOL.items():
                # the reference sees the same rounded inputs as the kernel (fp16/bf16 casts happen before)
                ref_k = reference(t, DTYPES[kind], alpha, norm, causal)
                got = run_kernel(lib, kind, t, alpha, norm, causal).double()
                err = float((got - ref_k).abs().max())
                scale = float(ref_k.abs().max())
                rel = err / scale if scale else err
                padding_zero = all(bool((got[b, int(t["lengths"][b]) :] == 0).all()) for b in range(users))
                good = bool(torch.isfinite(got).all()) and rel <= tol and padding_zero
                ok &= good
                rows.append(
                    {
                        "case": name,
                        "dtype": kind,
                        "users": users,
                        "tokens": n,
                        "heads": heads,
                        "dqk": dqk,
                        "dv": dv,
                        "position_buckets": p,
                        "time_buckets": nb,
                        "causal": causal,
                        "max_abs": err,
                        "max_rel": rel,
                        "tol_rel": tol,
                        "padding_rows_zero": padding_zero,
                        "ok": good,
                    }
                )
                print(
                    f"{name:<13} {kind:<5} max_abs {err:.3e} max_rel {rel:.3e} (tol {tol:.0e}) "
                    f"{'ok' if good else 'FAIL'}"
                )
    result = {
        "what": "grc HSTUAttention CUDA kernel (plugins/hstu_attention_kernel.cuh) vs "
        "grc.model.attention.hstu_attention_padded (float64, CPU)",
        "gpu": torch.cuda.get_device_name(0),
        "arch": args.arch,
        "nvcc_command": [Path(c).name if "/" in c else c for c in cmd],
        "nvcc_seconds": round(compile_s, 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "all_ok": ok,
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _common import write_result  # provenance (argv, commit, source digest, device, versions) by code

    write_result(args.out, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
