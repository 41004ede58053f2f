"""Runs fused_checks with grc's Triton kernels under TRITON_INTERPRET=1 and prints one JSON line.

Started by test_fused_ranker.py in a subprocess: the interpreter flag must be set before triton
decorates the kernels. argv: job seed [spec weights_dir model_dir]."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
from tests.serving import fused_checks as fc  # noqa: E402

job, seed = sys.argv[1], int(sys.argv[2])
if job == "padding":
    print(fc.dump(fc.padding_errors("triton", torch.float32, seed)))
elif job == "gather":
    print(fc.dump(fc.gather_errors(seed)))
elif job == "gather_concat":
    print(fc.dump(fc.gather_concat_errors(seed)))
elif job == "pinned_tables":
    print(fc.dump(fc.table_matches(Path(sys.argv[4]), fc.load_spec(Path(sys.argv[3])).spec.model, "pinned_host", seed)))
elif job == "ranker":
    print(fc.dump(fc.ranker_errors(Path(sys.argv[3]), Path(sys.argv[4]), "pytorch_kernels", seed, Path(sys.argv[5]))))
else:
    raise SystemExit(f"unknown job {job}")
