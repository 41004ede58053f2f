"""The instance's host threads: torch's intra-op pool from the bundle's ``intra_op_threads``, on every instance kind.

On a CPU instance the model computes there. On a GPU instance torch's host work is copies and small ops (the
layout's pinned staging, the scores' fetch), yet torch's default pool (one thread per core) made them parallel
regions whose OpenMP threads spin after each: the fused model's stub burned 4-6 cores of the H200 host's 16 while
its execute() ran ~2 ms (trace.py's figures, served at 16 clients, session 14), cores the server's own threads and
the other instances need.
"""

from __future__ import annotations


def set_host_threads(params: dict[str, str]) -> int:
    """torch.set_num_threads(intra_op_threads) unless it is 0 (torch's default: every core) -> the threads now."""
    import torch

    threads = int(params.get("intra_op_threads", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
