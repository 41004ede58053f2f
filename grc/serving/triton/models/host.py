"""The instance's host threads: torch's intra-op pool from the bundle's ``intra_op_threads``, on every instance kind.

On a CPU instance the model computes there. On a GPU instance torch's host work is copies and small ops (the
layout's pinned staging, the scores' fetch), yet with torch's default pool (one thread per core) the fused model's
stub used 4-6 cores' worth of CPU time per second of wall served at 16 clients on the H200 (trace.py's figures,
session 14): OpenMP threads spinning after each parallel copy, on cores the server's own threads and other
instances need. One thread cut the `upload` phase 1.6 -> 0.5 ms per execute there; users/s moved within the
run-to-run noise (bench/results/history-cache-notes.md, session 14).
"""

from __future__ import annotations


def set_host_threads(params: dict[str, str]) -> None:
    """torch.set_num_threads(intra_op_threads) unless it is 0 (torch's default: every core)."""
    import torch

    threads = int(params.get("intra_op_threads", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
