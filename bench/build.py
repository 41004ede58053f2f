"""Wall time of a full and of a no-op ``grc build`` (hstu-tiny, mtgr-small), against interpreter start-up.

    python bench/build.py [--specs hstu-tiny mtgr-small]
Writes bench/results/build.json. The target: a no-op build under 1 s beyond interpreter start-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clone, fastest, grc, interpreter_startup, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=["hstu-tiny", "mtgr-small"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="grc-bench-") as tmp:
        work = clone(Path(tmp) / "clone")
        startup = interpreter_startup(work)
        env = {"GRC_CACHE": "off"}  # measure the stages themselves, not the build cache
        for name in args.specs:
            spec = f"specs/{name}.yaml"
            full = grc(["build", spec], work, env)
            noop = fastest([grc(["build", spec], work, env) for _ in range(3)])
            rows.append(
                {
                    "spec": name,
                    "full_s": round(full.wall_s, 2),
                    "full_cpu_s": round(full.cpu_s, 2),
                    "noop_s": round(noop.wall_s, 3),
                    "noop_cpu_s": round(noop.cpu_s, 3),
                    "noop_beyond_startup_s": round(noop.wall_s - startup.wall_s, 3),
                }
            )
    print(f"interpreter start-up: {startup.wall_s:.3f} s")
    print(f"{'spec':<12} {'full build':>11} {'(cpu)':>9} {'no-op build':>12} {'(cpu)':>8} {'no-op - start-up':>17}")
    for r in rows:
        print(
            f"{r['spec']:<12} {r['full_s']:>10.2f}s {r['full_cpu_s']:>8.2f}s {r['noop_s']:>11.3f}s "
            f"{r['noop_cpu_s']:>7.3f}s {r['noop_beyond_startup_s']:>16.3f}s"
        )
    path = write_result(
        "build",
        {"interpreter_startup_s": round(startup.wall_s, 3), "interpreter_startup_cpu_s": round(startup.cpu_s, 3),
         "rows": rows},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
