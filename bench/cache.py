"""The build cache for mtgr-small: full build, no-op build, a fresh clone with a warm local store,
and a fresh clone with an empty local store and a warm remote store (nginx WebDAV on 127.0.0.1).

    python bench/cache.py [--spec mtgr-small]
Writes bench/results/cache.json. The target: a warm fresh-clone build under 10% of the full build.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, clone, grc, write_result

sys.path.insert(0, str(REPO))
from grc.cache.nginx import NginxStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="mtgr-small")
    args = parser.parse_args()
    spec = f"specs/{args.spec}.yaml"
    with tempfile.TemporaryDirectory(prefix="grc-bench-cache-") as tmp:
        base = Path(tmp)
        with NginxStore(base / "nginx") as url:
            first = clone(base / "a")
            warm = {"GRC_CACHE": "on", "GRC_CACHE_DIR": str(base / "local"), "GRC_REMOTE_CACHE": url}
            rows = {"full build (cold, uploads to the remote store)": grc(["build", spec], first, warm)}
            rows["no-op build"] = grc(["build", spec], first, warm)
            rows["fresh clone, warm local store"] = grc(["build", spec], clone(base / "b"), warm)
            remote_only = {**warm, "GRC_CACHE_DIR": str(base / "empty-local"), "GRC_REMOTE_CACHE_READ_ONLY": "1"}
            rows["fresh clone, empty local, warm remote"] = grc(["build", spec], clone(base / "c"), remote_only)
            remote_bytes = sum(f.stat().st_size for f in (base / "nginx" / "store").rglob("*") if f.is_file())
    full = next(iter(rows.values())).wall_s
    print(f"{'build of ' + args.spec:<48} {'seconds':>8} {'of full':>8} {'cpu s':>8}")
    for what, t in rows.items():
        print(f"{what:<48} {t.wall_s:>8.2f} {100 * t.wall_s / full:>7.1f}% {t.cpu_s:>8.2f}")
    print(f"remote store: {remote_bytes / 2**30:.2f} GiB")
    rounded = {k: {"wall_s": round(t.wall_s, 3), "cpu_s": round(t.cpu_s, 3)} for k, t in rows.items()}
    path = write_result("cache", {"spec": args.spec, "rows": rounded, "remote_store_bytes": remote_bytes})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
