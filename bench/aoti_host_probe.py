"""Does the host CPU's code generation break AOTInductor packages on this machine? One call, one table.

    python bench/aoti_host_probe.py --out DIR

Why: AOTInductor compiles the package's C++ wrapper with ``-march=native`` plus the ISA flags of
the build host (``-mavx512* -mamx-*``). On some lent machines every package, even a CPU MLP,
crashed when loaded, inside ``std::regex`` construction in the model .so (the regex templates are
instantiated in the wrapper, so they are compiled with those flags); on another machine the same
build loaded. This script separates the causes on one machine:
  1. a ~10-line .so that builds the same regex as the AOTI runtime, compiled with Inductor's
     flags one group at a time and loaded after ``import torch`` (seconds per variant);
  2. a CPU MLP package compiled with Inductor's default and with the architecture pinned
     (``cpp.march``: generic x86-64-v3 / none), each loaded in a fresh process.
Records uname, the CPU model and flags gcc's -march=native resolves to. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REGEX_SO = r"""
#include <regex>
#include <string>
extern "C" int grc_regex_probe(void) {
  std::regex re("(cpu|cuda|xpu|mps|privateuseone)(:([0-9]+))?");  // the shape of parse_device_str's
  std::smatch m;
  std::string s("cuda:0");
  return std::regex_match(s, m, re) ? 1 : 0;
}
"""
ISA = "-mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx512vnni -mamx-tile -mamx-bf16 -mamx-int8 -mavx512bf16"
SO_VARIANTS = {
    "plain_O1": "-O1",
    "march_native": "-O1 -march=native",
    "isa_flags": f"-O1 {ISA}",
    "inductor_like": f"-O1 -march=native {ISA} -fopenmp -ffp-contract=off -fno-math-errno",
    "x86_64_v3": "-O1 -march=x86-64-v3",
    "x86_64_v4": "-O1 -march=x86-64-v4",
}


def sh(cmd: str, timeout: float = 60) -> str:
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    return (done.stdout + done.stderr).strip()


def host() -> dict[str, Any]:
    info: dict[str, Any] = {"uname": " ".join(platform.uname()), "python": platform.python_version()}
    cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    for line in cpu.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model name", "flags", "microcode"):
            info[key.strip()] = val.strip()
    info["gcc_native"] = sh("g++ -march=native -Q --help=target | grep -E '^ +-m(arch|tune)=' | head -2")
    info["gcc_native_amx_avx512"] = sh("g++ -march=native -Q --help=target | grep -E 'm(amx|avx512f)' | head -8")
    info["gxx_version"] = sh("g++ --version | head -1")
    code = "import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())"
    info["torch_cpu_capability"] = sh(f"{sys.executable} -c '{code}'")
    return info


def regex_so(work: Path) -> dict[str, Any]:
    src = work / "probe.cpp"
    src.write_text(REGEX_SO)
    rows: dict[str, Any] = {}
    for name, flags in SO_VARIANTS.items():
        so = work / f"probe_{name}.so"
        built = subprocess.run(
            f"g++ {flags} -fPIC -shared -std=c++17 {src} -o {so}", shell=True, capture_output=True, text=True
        )
        if built.returncode:
            rows[name] = {"flags": flags, "build": built.stderr[-400:]}
            continue
        code = f"import torch, ctypes; print('regex ->', ctypes.CDLL('{so}').grc_regex_probe())"
        run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True)
        rows[name] = {"flags": flags, "rc": run.returncode, "out": (run.stdout + run.stderr)[-200:].strip()}
        print(f"  regex .so {name:<14} rc {run.returncode}  {run.stdout.strip()}", flush=True)
    return rows


def compile_mlp(path: Path, configs: dict[str, Any]) -> None:
    import torch

    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 8)).eval()
    x = torch.randn(37, 64)
    rows = torch.export.Dim("rows", min=2, max=1 << 20)
    program = torch.export.export(mod, (x,), dynamic_shapes={"input": {0: rows}})
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)


def load_mlp(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    mod = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 8)).eval()
    x = torch.randn(37, 64)
    print("PROBE stage=load", flush=True)
    run = torch._inductor.aoti_load_package(str(path))
    print("PROBE stage=run", flush=True)
    got = run(x)
    err = float((got - mod(x)).abs().max() / mod(x).abs().max())
    print(f"PROBE rel_err={err:.3e}", flush=True)


# MLP package builds: Inductor configs and compiler environment per variant
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "default": ({}, {}),
    "wrapper": ({}, {"CXX": "toolchain"}),  # session 2's loading build: CXX = a script running /usr/bin/g++
    "drop-isa": ({}, {"CXX": "toolchain", "GRC_CXX_DROP": f"-march=native {ISA}"}),
    "cxx-abs": ({"cpp.cxx": "which:g++"}, {}),  # grc's setting in session 3's first call (crashed there)
    "march-v3": ({"cpp.march": "x86-64-v3"}, {}),
    "march-none": ({"cpp.march": ""}, {}),
    "novec": ({"cpp.vec_isa_ok": False}, {}),
    "march-v3-novec": ({"cpp.march": "x86-64-v3", "cpp.vec_isa_ok": False}, {}),
}


def packages(work: Path, variants: list[str]) -> dict[str, Any]:
    """Compile every variant at once (one process and Inductor cache each), then load each in a
    fresh process."""
    import torch

    rows: dict[str, Any] = {"cpp.march config exists": hasattr(torch._inductor.config.cpp, "march")}
    toolchain = str(Path(__file__).resolve().parent / "toolchain" / "g++")
    jobs = {}
    for variant in variants:
        configs, extra = VARIANTS[variant]
        missing = [k for k in configs if not hasattr(torch._inductor.config.cpp, k.split(".")[1])]
        if missing:
            rows[variant] = {"skipped": f"Inductor config {missing} missing in this torch"}
            continue
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"cache_{variant}")}
        env.update({k: toolchain if v == "toolchain" else v for k, v in extra.items()})
        configs = {k: shutil.which(v[6:]) if str(v).startswith("which:") else v for k, v in configs.items()}
        pkg = work / f"mlp_{variant}.pt2"
        cmd = [sys.executable, __file__, "--compile", str(pkg), json.dumps(configs)]
        jobs[variant] = (
            pkg,
            env,
            time.perf_counter(),
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        )
    for variant, (pkg, env, t0, proc) in jobs.items():
        log, _ = proc.communicate()
        row: dict[str, Any] = {"configs": VARIANTS[variant][0], "env": VARIANTS[variant][1]}
        row.update(compile_rc=proc.returncode, compile_s=round(time.perf_counter() - t0, 1))
        if proc.returncode:
            row["compile_tail"] = log[-600:]
        else:
            ran = subprocess.run(
                [sys.executable, "-X", "faulthandler", __file__, "--load", str(pkg)],
                capture_output=True,
                text=True,
                env=env,
            )
            row["load_rc"] = ran.returncode
            row["load_tail"] = (ran.stdout + ran.stderr)[-500:].strip()
        rows[variant] = row
        print(f"  package {variant:<15} compile rc {row['compile_rc']} load rc {row.get('load_rc')}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--packages",
        default=",".join(VARIANTS),
        help=f"MLP package builds, of {list(VARIANTS)}",
    )
    p.add_argument("--compile", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile:
        compile_mlp(Path(args.compile[0]), json.loads(args.compile[1]))
        return
    if args.load:
        load_mlp(Path(args.load))
        return
    work = Path(tempfile.mkdtemp(prefix="grc-host-probe-"))
    result: dict[str, Any] = {"host": host()}
    print(json.dumps(result["host"], indent=1)[:1500], flush=True)
    result["regex_so"] = regex_so(work)
    result["packages"] = packages(work, [v for v in args.packages.split(",") if v])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "aoti-host-probe.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
