"""Where does an AOTInductor GPU package of the dense model fail? One GPU call, one table.

    python bench/aoti_diagnose.py --out DIR [--spec hstu-tiny]

Each case is compiled in a child process and then loaded and run in another (a crash must not
take the table down); a load that dies is re-run under ``cuda-gdb`` for a host backtrace
(the device image has no gdb). Cases, smallest first:
  linear        a two-layer MLP, no custom ops             (does AOTI on this GPU work at all?)
  linear_cpu    the same on the CPU                        (AOTI on this host at all?)
  norm_gate     one grc.norm_gate (user Triton kernel)     (do user Triton kernels load?)
  attention     one grc.hstu_attention                     (the attention kernel alone)
  dense         JaggedDense of the spec, grc's configs     (what the aoti stage builds)
  dense_nometa  the same without aot_inductor.metadata     (our metadata vs the loader)
Each row: compile seconds, load rc, error vs the eager module, CUDA-graph replay, and the tail of
the log / backtrace. Not a test: a debugging instrument for the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = ("linear", "linear_cpu", "norm_gate", "attention", "dense", "dense_nometa")


def build_case(case: str, spec: str) -> tuple[Any, tuple[Any, ...], dict[str, Any] | None]:
    """(module, example args, dynamic shapes) on cuda in bf16."""
    import torch

    import kernels  # noqa: F401  registers torch.ops.grc.*
    from grc.aoti.inputs import random_inputs, seeded_dense
    from grc.aoti.model import JaggedDense, dynamic_shapes, trace_inputs
    from grc.spec.loader import load_spec

    dev, dt = (torch.device("cpu"), torch.float32) if case.endswith("_cpu") else (torch.device("cuda"), torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)  # nn.Linear's init: the same weights in the compiling and the loading process
    rows = torch.export.Dim("rows", min=2, max=1 << 20)
    if case in ("linear", "linear_cpu"):
        mod = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 8)).to(dev, dt)
        return mod.eval(), (torch.randn(37, 64, generator=gen).to(dev, dt),), {"input": {0: rows}}
    if case == "norm_gate":

        class NormGate(torch.nn.Module):
            def forward(self, a: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return torch.ops.grc.norm_gate(a, u, w, b, 1e-5) * 2.0

        args = tuple(torch.randn(*s, generator=gen).to(dev, dt) for s in ((37, 64), (37, 64), (64,), (64,)))
        return NormGate().eval(), args, {"a": {0: rows}, "u": {0: rows}, "w": None, "b": None}
    cfg = load_spec(REPO / "specs" / f"{spec}.yaml").spec.model
    dense = seeded_dense(cfg)
    if case == "attention":
        layer = next(iter(dense.hstu_layers)).to(dev, dt)
        inp = random_inputs(cfg, 2, 20, 3, gen, ragged=False).to(dev, dt)
        h = cfg.hstu
        q = torch.randn(int(inp.offsets[-1]), h.num_heads, h.head_qk, generator=gen).to(dev, dt)
        v = torch.randn(int(inp.offsets[-1]), h.num_heads, h.head_v, generator=gen).to(dev, dt)
        a = layer.attention
        nb = min(31, h.time_buckets)

        class Attn(torch.nn.Module):
            def forward(self, q, k, v, offsets, timestamps, num_candidates):  # type: ignore[no-untyped-def]
                return torch.ops.grc.hstu_attention(q, k, v, offsets, timestamps, num_candidates, a.pos_w,
                                                    a.ts_w[:, :nb], 0.125, 64.0, True)  # fmt: skip

        users = torch.export.Dim("users", min=1, max=1 << 16)
        tokens = torch.export.Dim("tokens", min=2, max=1 << 24)
        dyn = {"q": {0: tokens}, "k": {0: tokens}, "v": {0: tokens}, "offsets": {0: users + 1},
               "timestamps": {0: tokens}, "num_candidates": {0: users}}  # fmt: skip
        return Attn().eval(), (q, q.clone(), v, inp.offsets, inp.timestamps, inp.num_candidates), dyn
    model = JaggedDense(dense.to(dev, dt)).eval()
    return model, trace_inputs(dense, dev, dt).args(), dynamic_shapes()


def compile_case(case: str, spec: str, package: Path) -> None:
    import torch

    from grc.aoti.build import INDUCTOR_CONFIGS, _has_config

    mod, args, dyn = build_case(case, spec)
    import torch._inductor.config as inductor_config

    configs = {k: v for k, v in INDUCTOR_CONFIGS.items() if _has_config(inductor_config, k)}
    if case == "dense":
        configs["aot_inductor.metadata"] = {"grc.format": "grc-aoti/1", "grc.device": "cuda"}
    with torch.no_grad():
        program = torch.export.export(mod, args, dynamic_shapes=dyn, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs=configs)
    print("DIAG compiled", flush=True)


def load_case(case: str, spec: str, package: Path, how: str) -> None:
    import torch

    from grc.aoti.runtime import CudaGraphRunner, load, load_model_so

    mod, args, _ = build_case(case, spec)
    print("DIAG stage=load", flush=True)
    # "so": the model .so through the C++ runner, bypassing the .pt2 loader; else the loader grc uses
    run = load_model_so(package) if how == "so" else load(package, args[0].device, single_threaded=how == "single")

    print("DIAG stage=run", flush=True)
    with torch.no_grad():
        got = run(*args).float()
        want = mod(*args).float()
        if got.is_cuda:
            torch.cuda.synchronize()
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        print(f"DIAG rel_err={err:.3e}", flush=True)
        try:
            graphed = CudaGraphRunner(run, max_graphs=1)
            g = graphed(*args).float()
            torch.cuda.synchronize()
            print(f"DIAG graph=ok graph_err={float((g - want).abs().max() / want.abs().max()):.3e}", flush=True)
        except Exception as exc:
            print(f"DIAG graph=failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def child(argv: list[str], timeout: float, gdb: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-X", "faulthandler", __file__, *argv]
    if gdb:
        gdb_cmds = ["set pagination off", "run", "bt 30", "info registers rip", "x/6i $pc", "info sharedlibrary"]
        cmd = ["cuda-gdb", "-q", "-batch", *(a for c in gdb_cmds for a in ("-ex", c)), "--args", *cmd]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        rc: int | str = done.returncode
        log = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, log = "timeout", (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
    row: dict[str, Any] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    for ln in log.splitlines():
        if ln.startswith("DIAG "):
            key, _, val = ln[5:].partition("=")
            row[key.split()[0]] = val or key
    if gdb:  # the frames from the signal on, and the libraries loaded
        at = log.find("received signal")
        row["tail"] = log[max(0, at - 2000) : at + 12000] if at >= 0 else log[-8000:]
    elif rc != 0:
        row["tail"] = log[-4000:]
    return row


PROBE_CPP = r"""
#include <regex>
#include <string>
extern "C" int probe() {  // what AOTInductor's parse_device_str does when a model is created
  std::regex re("(cpu|cuda|xpu|mps)(:([0-9]+))?");
  std::smatch sm;
  std::string s = "cuda:0";
  return std::regex_match(s, sm, re) ? 1 : 0;
}
"""


def sh(cmd: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return (done.stdout + done.stderr).strip()[-1500:] + ("" if done.returncode == 0 else f" [rc {done.returncode}]")


def toolchain(work: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Which C++ runtime the process uses vs the compiler's, std::regex in a .so loaded after
    torch, and linear_cpu packages built with a logging g++ (as is / static runtime flags dropped),
    loaded plainly and with the compiler's libstdc++ preloaded. Returns (facts, env that loads)."""
    from concurrent.futures import ThreadPoolExecutor

    facts: dict[str, Any] = {}
    maps = "import torch; print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'stdc++' in l}))"
    facts["process_runtime"] = sh(f'{sys.executable} -c "{maps}"')
    gxx_rt = sh("realpath $(g++ -print-file-name=libstdc++.so.6)")
    facts["compiler_runtime"] = gxx_rt
    facts["glibcxx_max"] = sh(f"strings {gxx_rt} | grep -E '^GLIBCXX_3' | sort -V | tail -1")
    (work / "probe.cpp").write_text(PROBE_CPP)
    facts["probe_build"] = sh(f"g++ -shared -fPIC -O2 -std=c++17 -o {work}/probe.so {work}/probe.cpp")
    call = f"import torch, ctypes; print('regex probe ->', ctypes.CDLL('{work}/probe.so').probe())"
    facts["regex_after_torch"] = sh(f'{sys.executable} -X faulthandler -c "{call}" 2>&1 | tail -3')
    facts["regex_after_torch_static"] = sh(
        f"g++ -shared -fPIC -O2 -std=c++17 -static-libstdc++ -static-libgcc -o {work}/probe_s.so {work}/probe.cpp && "
        + f'{sys.executable} -X faulthandler -c "{call.replace("probe.so", "probe_s.so")}" 2>&1 | tail -3'
    )
    cxx = str(REPO / "bench" / "toolchain" / "g++")
    facts["machine"] = sh("uname -srm; nproc; grep -m1 'model name' /proc/cpuinfo; dmesg 2>/dev/null | head -1")
    variants = {
        "inductor_default": {"GRC_CXX_LOG": str(work / "cxx-default.log")},  # no CXX: Inductor's own choice
        "as_is": {"CXX": cxx, "GRC_CXX_LOG": str(work / "cxx-as_is.log")},
        "no_static_runtime": {
            "CXX": cxx,
            "GRC_CXX_LOG": str(work / "cxx-no_static.log"),
            "GRC_CXX_DROP": "-static-libstdc++ -static-libgcc",
        },
    }

    def build_and_load(name: str) -> dict[str, Any]:
        # Inductor's compile cache does not key on the compiler: one cache per variant
        env = {**variants[name], "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{name}")}
        pkg = work / f"linear_cpu-{name}.pt2"
        row: dict[str, Any] = {"compile": child(["--do", "compile", "linear_cpu", str(pkg)], 300, env=env)}
        log = Path(env["GRC_CXX_LOG"])
        row["cxx_commands"] = log.read_text().splitlines()[-4:] if log.exists() else "no g++ call logged"
        if not pkg.exists():
            return row
        so_dir = work / f"unz-{name}"
        sh(f"mkdir -p {so_dir} && cd {so_dir} && python3 -m zipfile -e {pkg} .")
        so = next(so_dir.rglob("*.so"), None)
        row["so_stdcxx_symbols"] = sh(f"nm -C --defined-only {so} | grep -c 'std::' ") if so else "no .so"
        row["so_codecvt_defined"] = sh(f"nm -C --defined-only {so} | grep -c 'codecvt' ") if so else "no .so"
        row["so_needed"] = sh(f"readelf -d {so} | grep NEEDED") if so else "no .so"
        loads = {"plain": {}, "preload_compiler_runtime": {"LD_PRELOAD": gxx_rt}}
        for how, lenv in loads.items():
            row[f"load_{how}"] = child(["--do", "package", "linear_cpu", str(pkg)], 150, env={**env, **lenv})
            if row[f"load_{how}"]["rc"] == 0:
                drop = ("GRC_CXX_LOG", "TORCHINDUCTOR_CACHE_DIR")
                row["fix"] = {k: v for k, v in {**env, **lenv}.items() if k not in drop}
                break
        return row

    with ThreadPoolExecutor(len(variants)) as pool:
        rows = dict(zip(variants, pool.map(build_and_load, variants), strict=True))
    # prefer a fix that changes nothing (Inductor's default loads): then the crash was the machine
    fix = next((rows[v]["fix"] for v in variants if "fix" in rows[v]), None)
    for name, row in rows.items():
        facts[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "cxx_commands"})[:1500], flush=True)
    return facts, fix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("aoti-diagnose"))
    p.add_argument("--spec", default="hstu-tiny")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--loads", default="package,single,so", help="how to load each GPU case")
    p.add_argument("--toolchain", action="store_true", help="C++ runtime checks and fixes first (see toolchain)")
    p.add_argument("--do", nargs=3, metavar=("WHAT", "CASE", "PACKAGE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.do:
        what, case, package = args.do
        if what == "compile":
            compile_case(case, args.spec, Path(package))
        else:
            load_case(case, args.spec, Path(package), what)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "grc-diag"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    table: dict[str, Any] = {}
    fix: dict[str, str] | None = {}
    if args.toolchain:
        table["toolchain"], fix = toolchain(work)
        (args.out / "aoti-diagnose.json").write_text(json.dumps(table, indent=1) + "\n")
        print("toolchain", json.dumps({k: v for k, v in table["toolchain"].items() if isinstance(v, str)}), flush=True)
        print("fix", json.dumps(fix), flush=True)
        if fix is None:
            return
        (args.out / "fix.env").write_text("".join(f"export {k}='{v}'\n" for k, v in fix.items()))
    for case in args.cases.split(","):
        pkg = work / f"{case}.pt2"
        row = {"compile": child(["--spec", args.spec, "--do", "compile", case, str(pkg)], 300, env=fix)}
        if pkg.exists():
            for how in ("package",) if case.endswith("_cpu") else args.loads.split(","):
                row[how] = child(["--spec", args.spec, "--do", how, case, str(pkg)], 120, env=fix)
                if row[how]["rc"] not in (0, "timeout") and how == "package":
                    row["gdb"] = child(["--spec", args.spec, "--do", how, case, str(pkg)], 200, gdb=True)
        table[case] = row
        (args.out / "aoti-diagnose.json").write_text(json.dumps(table, indent=1) + "\n")
        brief = {k: {kk: vv for kk, vv in v.items() if kk != "tail"} for k, v in row.items()}
        print(case, json.dumps(brief), flush=True)


if __name__ == "__main__":
    main()
