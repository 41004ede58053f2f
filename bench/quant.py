"""Quantized embedding tables on mtgr-small's shapes: table bytes per precision, lookup time, and
the ranking figures verify gates on (grc.stages.verify.ranking, the PyTorch backend) vs fp32.

    python bench/quant.py [--spec specs/mtgr-small.yaml] [--rows-divisor 100]

mtgr-small's tables hold 16M rows (7.5 GiB in float32); drawing, writing and reading them once
per precision is more than a shared 2-core box should spend on one figure, so by default every
table keeps its width (what sets the bytes ratio and the error per row) and the tables of a
million rows or more (user, item) keep 1/100 of their rows (--rows-divisor 1 for the real
thing). The dense model is mtgr-small's, unchanged.
Writes bench/results/quant.json. Targets (issue 19): int8 and fp8 tables <= 52% of the bf16
table bytes, top-10 overlap >= 0.95 and Kendall tau >= 0.95 vs fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, write_result

sys.path.insert(0, str(REPO))

PRECISIONS = ("float32", "bfloat16", "int8", "fp8_e4m3")
LOOKUP_IDS = 100_000
BIG_TABLE_ROWS = 1_000_000


def main() -> None:
    import torch
    import yaml
    from rich.console import Console

    from grc.spec.loader import load_spec
    from grc.stages.base import Context
    from grc.stages.verify import ranking
    from grc.weights import MANIFEST, load_model, open_tables, write_init

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(REPO / "specs" / "mtgr-small.yaml"))
    parser.add_argument("--rows-divisor", type=int, default=100, help="keep 1/N of every table's rows")
    parser.add_argument("--out", default="quant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_spec(Path(args.spec)).spec
    data = base.model_dump(mode="json", exclude_none=True)
    for table in data["model"]["tables"].values():  # the big ones only: user and item, 99% of the rows
        if table["vocab_size"] >= BIG_TABLE_ROWS:
            table["vocab_size"] //= args.rows_divisor
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="grc-bench-quant-") as tmp:
        for precision in PRECISIONS:
            data["weights"] = {**data["weights"], "init": {**data["weights"]["init"], "embedding_dtype": precision}}
            spec_file = Path(tmp) / f"{precision}.yaml"
            spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
            loaded = load_spec(spec_file)
            spec = loaded.spec
            folder = Path(tmp) / precision
            folder.mkdir()
            started = time.perf_counter()
            manifest = write_init(spec.model, spec.weights, spec.weights.source, folder)  # type: ignore[arg-type]
            (folder / MANIFEST).write_text(json.dumps(manifest))
            write_s = time.perf_counter() - started
            tables = open_tables(spec.model, folder)
            ids = {n: torch.randint(0, t.vocab_size, (LOOKUP_IDS,)) for n, t in spec.model.tables.items()}
            for name, chosen in ids.items():  # once to fault the pages in: the figure is the warm lookup
                tables.lookup(name, chosen)
            started = time.perf_counter()
            for name, chosen in ids.items():
                tables.lookup(name, chosen)
            lookup_s = time.perf_counter() - started
            ctx = Context(loaded=loaded, out=folder, inputs={"weights": folder}, console=Console(quiet=True))
            figures = ranking(ctx, load_model(spec.model, folder), tables, backends={})
            rows[precision] = {
                "table_bytes": manifest["bytes"]["embedding"],
                "dense_bytes": manifest["bytes"]["dense"],
                "write_s": round(write_s, 2),
                f"lookup_{LOOKUP_IDS}_rows_per_table_s": round(lookup_s, 4),
                "ranking": [f.as_dict() for f in figures],
                "gates_pass": all(f.ok for f in figures),
            }
            worst = {
                k: (min if k.startswith(("top", "kendall")) else max)(getattr(f, k) for f in figures)
                for k in ("top_k_overlap", "kendall_tau", "mean_abs", "max_abs")
            }
            rows[precision]["worst_over_tasks"] = worst
            print(
                f"{precision:<9} tables {manifest['bytes']['embedding'] / 2**20:8.1f} MiB  "
                f"lookup {lookup_s * 1e3:7.1f} ms  " + "  ".join(f"{k} {v:.4g}" for k, v in worst.items())
            )
    bf16 = rows["bfloat16"]["table_bytes"]
    for row in rows.values():
        row["table_bytes_of_bf16"] = round(row["table_bytes"] / bf16, 4)
    targets = {
        p: {
            "bytes <= 52% of bf16": rows[p]["table_bytes_of_bf16"] <= 0.52,
            "top-10 overlap >= 0.95": rows[p]["worst_over_tasks"]["top_k_overlap"] >= 0.95,
            "kendall tau >= 0.95": rows[p]["worst_over_tasks"]["kendall_tau"] >= 0.95,
        }
        for p in ("int8", "fp8_e4m3")
    }
    path = write_result(
        args.out,
        {
            "spec": base.name,
            "rows_divisor": args.rows_divisor,
            "tables": {
                n: {"vocab_size": t["vocab_size"], "dim": t.get("dim") or data["model"]["embedding_dim"]}
                for n, t in data["model"]["tables"].items()
            },
            "held_out_users": base.verify.ranking.users,
            "candidates_per_user": base.verify.ranking.candidates or base.model.max_candidates,
            "reference": "PyTorch float32, tables drawn again from the seeded init",
            "precisions": rows,
            "targets": targets,
        },
    )
    print(json.dumps(targets, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
