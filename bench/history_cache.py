"""In-process benchmark of the user-history cache: the dense model's full forward vs the cached
score step (GRDense.score against a prefilled cache), one user, on the CPU or a CUDA GPU.

Shapes: 1 user x history in {1000, max_seq_len - 256 - profile tokens} x candidates in {256, 512}
(the long history is the longest beside 256 candidates); a shape whose tokens (profile + history +
candidates) exceed max_seq_len is recorded as skipped. Weights are
the spec's deterministic random init (dense part only: tokens are random, the projector and the
tables do not run). Each figure is the median of --repeat timed runs after one warm-up run; the
cached step scores the candidates (and --delta new history events) against a cache prefilled
once, untimed. Both paths are checked to give the same scores.

    python bench/history_cache.py [--spec specs/mtgr-small.yaml] [--repeat 5] [--delta 0]
                                  [--out bench/results/history-cache-<device>.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # grc and kernels from a checkout

from bench._common import write_result
from grc.model.gr import GRDense
from grc.model.params import dense_params, init_tensor
from grc.spec.loader import load_spec
from grc.spec.schema import ModelConfig


def dense_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> GRDense:
    model = GRDense(cfg)
    state = {
        p.name.removeprefix("dense."): init_tensor(p, 0, 0.02, dtype)
        for p in dense_params(cfg)
        if p.name.startswith("dense.")
    }
    model.load_state_dict(state)  # copied into the float32 parameters: the values rounded to dtype
    return model.eval().to(device=device, dtype=dtype)  # and the parameters in dtype, so the model computes in it


def synced(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call, the device synchronized before and after it, and its result (a path's
    first call: Triton compiles and autotunes in it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def timed(run: Callable[[], torch.Tensor], repeat: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeat`` runs after one warm-up, and the last result."""
    out = run()
    times = []
    for _ in range(repeat):
        seconds, out = synced(run, device)
        times.append(seconds)
    return statistics.median(times), out


def case(
    model: GRDense,
    history: int,
    candidates: int,
    delta: int,
    repeat: int,
    impl: str,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, object]:
    cfg = model.cfg
    profile = len(cfg.profile)
    n = profile + history + candidates
    if n > cfg.hstu.max_seq_len:
        return {"skipped": f"{n} tokens exceed max_seq_len {cfg.hstu.max_seq_len}"}
    gen = torch.Generator().manual_seed(history * 1000 + candidates)
    tokens = torch.randn(n, cfg.d_model, generator=gen).to(device, dtype)
    now = 1_750_000_000
    gaps = (2.0 ** (torch.rand(history, generator=gen) * 21)).to(torch.int64).sort(descending=True).values
    stamps = torch.cat([torch.full((profile,), now), now - gaps, torch.full((candidates,), now)]).to(device)
    offsets = torch.tensor([0, n], device=device)
    nc = torch.tensor([candidates], device=device)
    cached = profile + history - delta
    with torch.no_grad():
        cache = model.prefill(tokens[:cached], stamps[:cached], profile, now, impl)
        full_s, full = timed(
            lambda: model.forward_jagged(tokens, offsets, nc, stamps, impl)[-candidates:], repeat, device
        )
        rest = tokens[cached:]
        rest_offsets = torch.tensor([0, rest.shape[0]], device=device)
        score_s, scored = timed(
            lambda: model.score([cache], rest, rest_offsets, nc, stamps[cached:], [now], impl)[0], repeat, device
        )
    diff = (scored.double() - full.double()).abs().max().item()
    return {
        "tokens": n,
        "cached_tokens": cached,
        "new_tokens": n - cached,
        "full_forward_ms": full_s * 1e3,
        "cached_score_ms": score_s * 1e3,
        "speedup": full_s / score_s,
        "max_abs_diff": diff,
        "cache_mb": cache.nbytes / (1 << 20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="specs/mtgr-small.yaml")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--delta", type=int, default=0, help="new history events per cached request")
    ap.add_argument("--impl", choices=["pytorch", "triton"], help="default: triton on CUDA, pytorch on the CPU")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", help="result file (default bench/results/history-cache-<cpu|cuda>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impl = args.impl or ("triton" if device.type == "cuda" else "pytorch")
    dtype = getattr(torch, args.dtype)
    spec = load_spec(args.spec).spec
    model = dense_model(spec.model, device, dtype)
    rows = []
    for history in (1000, spec.model.hstu.max_seq_len - 256 - len(spec.model.profile)):
        for candidates in (256, 512):
            row = {
                "history": history,
                "candidates": candidates,
                **case(model, history, candidates, args.delta, args.repeat, impl, device, dtype),
            }
            print(row, flush=True)
            rows.append(row)
    out = args.out or f"history-cache-{device.type}"
    path = write_result(
        Path(out) if args.out else out,
        {
            "spec": spec.name,
            "impl": impl,
            "dtype": args.dtype,
            "delta": args.delta,
            "repeat": args.repeat,
            "threads": torch.get_num_threads(),
            "cases": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
