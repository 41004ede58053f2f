"""Which C++ compiler builds AOTInductor packages that load on this machine, and why the others crash.

Earlier lent H200 images crashed loading grc's packages (SIGSEGV in ``std::regex`` inside the model
.so, bench/results/e2e-notes.md); the last image's compiler was /opt/gcc/bin/g++. The suspicion tested
here: the model .so inlines libstdc++ template code from its compiler's headers, and the process has
another (older) libstdc++ loaded, the one torch was started with. For every g++ found, this builds a
small CUDA package through grc's own compile path (``grc.aoti.build.compile_package``, CXX set to
that compiler) in a child, then loads and runs it in fresh children: plain, and with that compiler's
libstdc++ preloaded. It records each compiler's version and libstdc++ (path, newest GLIBCXX symbol
version) beside the libstdc++ a torch process maps.

    python bench/gpu_aoti_probe.py --out-dir DIR      (a CUDA GPU; ~2-3 min)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write_result

HERE = Path(__file__).resolve()


def glibcxx_newest(lib: str) -> str | None:
    try:
        data = Path(lib).read_bytes()
    except OSError:
        return None
    found = {tuple(int(x) for x in m.split(b".")) for m in re.findall(rb"GLIBCXX_(3\.4(?:\.\d+)?)\x00", data)}
    return "GLIBCXX_" + ".".join(map(str, max(found))) if found else None


def compiler_info(cxx: str) -> dict[str, object]:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    lib = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    real = os.path.realpath(lib) if lib and os.path.isabs(lib) else None
    return {
        "cxx": cxx,
        "version": version[0] if version else None,
        "libstdcxx": real,
        "glibcxx_newest": glibcxx_newest(real) if real else None,
    }


def loaded_libstdcxx() -> str | None:
    code = "import torch, re; print([l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l][:1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    paths = re.findall(r"'([^']+)'", out)
    return os.path.realpath(paths[0]) if paths else None


def compilers() -> list[str]:
    found = [shutil.which("g++"), "/usr/bin/g++", *sorted(glob.glob("/opt/gcc*/bin/g++"))]
    seen: dict[str, str] = {}
    for c in found:
        if c and os.path.isfile(c):
            seen.setdefault(os.path.realpath(c), c)
    return list(seen.values())


# ----------------------------------------------------------------------------- children


def child_compile(out: str) -> None:
    import torch

    from grc.aoti.build import compile_package

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(64, 64)
            self.b = torch.nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.nn.functional.silu(self.a(x)))

    net = Net().cuda().eval()
    x = torch.randn(8, 64, device="cuda")
    rows = torch.export.Dim("rows", min=2, max=4096)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: rows},))
    seconds = compile_package(program, Path(out), {})
    torch.save(net.state_dict(), Path(out).with_suffix(".ref"))
    print(json.dumps({"compile_s": round(seconds, 1)}))


def child_load(package: str) -> None:
    import torch

    run = torch._inductor.aoti_load_package(package)
    x = torch.randn(5, 64, device="cuda")
    y = run(x)
    y = y[0] if isinstance(y, (list, tuple)) else y
    print(json.dumps({"loaded": True, "shape": list(y.shape), "finite": bool(torch.isfinite(y).all())}))


# ----------------------------------------------------------------------------- parent


def run(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, object]:
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "error": f"timed out after {timeout:.0f} s"}
    tail = (done.stdout + done.stderr).strip().splitlines()[-6:]
    return {"rc": done.returncode, "seconds": round(time.perf_counter() - started, 1), "tail": tail}


def probe(cxx: str, work: Path) -> dict[str, object]:
    info = compiler_info(cxx)
    package = work / f"{abs(hash(cxx)):x}" / "model.pt2"
    package.parent.mkdir(parents=True)
    env = {**os.environ, "CXX": cxx, "TORCHINDUCTOR_CACHE_DIR": str(package.parent / "inductor")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    info["compile"] = run([sys.executable, str(HERE), "--child-compile", str(package)], env, 400)
    if not package.is_file():
        return info
    base = {k: v for k, v in env.items() if k != "CXX"}
    info["load"] = run([sys.executable, "-X", "faulthandler", str(HERE), "--child-load", str(package)], base, 120)
    if info.get("libstdcxx"):
        preload = {**base, "LD_PRELOAD": str(info["libstdcxx"])}
        info["load_preloaded"] = run(
            [sys.executable, "-X", "faulthandler", str(HERE), "--child-load", str(package)], preload, 120
        )
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--child-compile")
    parser.add_argument("--child-load")
    args = parser.parse_args()
    if args.child_compile:
        return child_compile(args.child_compile)
    if args.child_load:
        return child_load(args.child_load)
    import torch

    loaded = loaded_libstdcxx()
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "process_libstdcxx": loaded,
        "process_glibcxx_newest": glibcxx_newest(loaded) if loaded else None,
        "compilers": [],
    }
    print(json.dumps(result, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(4) as pool:
        probed = list(pool.map(lambda c: probe(c, Path(tmp)), compilers()))
    result["compilers"] = probed
    for c in probed:
        print(json.dumps(c, indent=1), flush=True)
    print("wrote", write_result(Path(args.out_dir) / "aoti-probe-h200.json", result))


if __name__ == "__main__":
    main()
