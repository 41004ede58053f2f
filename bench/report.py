"""The README's measured figures, generated from bench/results: nothing typed by hand.

    python bench/report.py            # rewrite every block between <!-- report:NAME --> and <!-- /report:NAME -->
    python bench/report.py --check    # exit 1, naming each block and the difference, when README and JSON disagree

Each block is rendered by one function below from the result files it names, and says which file
(and which commit, device and date) its figures come from; files marked ``"provenance": "legacy"``
say so in the block. The test suite runs ``--check`` (tests/test_report.py).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BLOCK = re.compile(r"<!-- report:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->", re.S)

# The H200 runs the README quotes, one per spec: replace them with a new bench/gpu_run_e2e.sh result.
# newest first: session 19's SiLU runs (the package as built, u's SiLU in the norm-gate kernel, beside the one with
# SiLU of u as a pass of its own; one per spec), session 18's attention-kernel runs (the package with the Gluon
# kernel, the default, beside the one with the Triton kernel compiled in; one per spec), session 13's max-autotune
# run and session 11's SiLU-apart run (issue 21: the package with and without one option, nothing else), session
# 6's fuse run (fused vs unfused package vs torch.compile; no padded baseline ran in these)
E2E_GPU = (
    "e2e-h100-s26-mtgr-small.json", "e2e-h100-s26-mtgr-small-rounds.json", "e2e-h100-s25-mtgr-small.json",
    "e2e-h200-s22-mtgr-small.json",
    "e2e-h200-s19-mtgr-small-silu.json", "e2e-h200-s19-mtgr-base-silu.json",
    "e2e-h200-s18-mtgr-small-attention.json", "e2e-h200-s18-mtgr-base-attention.json",
    "e2e-h200-s13-mtgr-small-autotune.json", "e2e-h200-s11-mtgr-small-silu.json", "e2e-h200-s6-mtgr-small-fuse.json",
    "e2e-mtgr-small-h200.json",
)  # fmt: skip
BASELINES = ("eager_bf16_padded", "compile_bf16_padded", "compile_bf16_padded_graph")
MODE_LABELS = {
    "eager_bf16_padded": "PyTorch eager, padded batch (baseline)",
    "compile_bf16_padded": "PyTorch + torch.compile, padded batch (baseline)",
    "compile_bf16_padded_graph": "PyTorch + torch.compile + CUDA graph, padded batch (baseline)",
    "aoti_bf16_nograph": "grc AOTInductor package",
    "aoti_bf16": "grc AOTInductor package + CUDA graph",
    "aoti_bf16_triton_attention": "grc AOTInductor package with the Triton attention kernel "
    "(engine.aoti.attention: triton), + CUDA graph",
    "aoti_bf16_silu_passes": "grc AOTInductor package with SiLU of u as a pass of its own "
    "(grc.model.hstu.CONSUMER_SILU off), + CUDA graph",
    "aoti_bf16_silu": "grc AOTInductor package, SiLU apart from the UVQK GEMM (engine.aoti.silu_apart), + CUDA graph",
    "aoti_bf16_views": "grc AOTInductor package, the attention taking q, k, v as three views "
    "(grc.model.hstu.PACKED_VQK off), + CUDA graph",
    "aoti_bf16_vqk": "grc AOTInductor package, the attention taking the activated vqk whole "
    "(grc.model.hstu.PACKED_VQK, ATTENTION_GATE off), + CUDA graph",
    "aoti_bf16_vqk_gate": "grc AOTInductor package, the attention taking the activated vqk whole and applying the "
    "norm-gate (grc.model.hstu.PACKED_VQK + ATTENTION_GATE), + CUDA graph",
    # session 13 (e2e-h200-s13-mtgr-small-autotune.json, commit 9d70480): measured slower and removed since
    "aoti_bf16_autotune": "grc AOTInductor package compiled with Inductor's max-autotune (engine.aoti.max_autotune "
    "at 9d70480), + CUDA graph",
    "eager_bf16_triton": "grc kernels, eager",
    "eager_bf16_triton_graph": "grc kernels + CUDA graph",
    "compile_bf16_triton": "grc kernels + torch.compile + CUDA graph",
    "aoti_bf16_fused": "grc AOTInductor package, fused projections and heads, + CUDA graph",
    "eager_bf16_fused_graph": "grc kernels, fused projections and heads, + CUDA graph",
    "compile_bf16_fused": "grc kernels, fused, + torch.compile + CUDA graph",
}


class Results:
    """Reads result files by name, once each."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cache: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str) -> dict[str, Any]:
        if name not in self.cache:
            path = self.folder / name
            if not path.is_file():
                raise SystemExit(f"bench/report.py: {path} is missing (a README block is rendered from it)")
            self.cache[name] = json.loads(path.read_text())
        return self.cache[name]


# --------------------------------------------------------------------------- formatting
def num(x: float, digits: int = 3) -> str:
    """``digits`` significant figures, thousands separated, no exponent for ordinary sizes."""
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}".replace("e-0", "e-")
    if abs(x) >= 10 ** (digits - 1):
        return f"{round(x):,}"
    return f"{x:.{digits}g}"


def source(name: str, data: dict[str, Any]) -> str:
    """Where a block's figures come from: the file, and its commit, device and date (or 'legacy')."""
    device = data.get("device") or data.get("machine") or "device not recorded"
    date = str(data.get("date") or "undated")[:10]
    if data.get("provenance") == "legacy":
        return f"`bench/results/{name}` (legacy: {device}, {date}; its `known` field says how it was made)"
    commit = str(data.get("commit", "?"))[:7]
    dirty = ", uncommitted changes" if data.get("dirty") else ""
    load = f", load average {data['load_average'][0]:.1f} when written" if "load_average" in data else ""
    return f"`bench/results/{name}` (commit {commit}{dirty}; {device}{load}; {date})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --------------------------------------------------------------------------- blocks
def build_block(results: Results) -> str:
    data = results("build.json")
    rows = [
        [
            f"`{r['spec']}`",
            f"{num(r['full_s'])} s ({num(r['full_cpu_s'])} s)",
            f"{num(r['noop_s'])} s ({num(r['noop_cpu_s'])} s)",
            f"{num(r['noop_beyond_startup_s'])} s",
        ]
        for r in data["rows"]
    ]
    startup = f"{num(data['interpreter_startup_s'])} s"
    head = ["spec", "full build (CPU)", "no-op build (CPU)", f"no-op beyond interpreter start-up ({startup})"]
    return (
        f"`python bench/build.py` (build cache off, so every stage runs; wall time, and in brackets the CPU time "
        f"of grc and its children, which other jobs on the machine inflate far less), {source('build.json', data)}:"
        "\n\n" + table(head, rows)
    )


def cache_block(results: Results) -> str:
    data = results("cache.json")
    full = next(iter(data["rows"].values()))["wall_s"]
    rows = [
        [what, f"{num(t['wall_s'])} s", f"{num(t['cpu_s'])} s", f"{100 * t['wall_s'] / full:.1f}%"]
        for what, t in data["rows"].items()
    ]
    head = [f"build of `{data['spec']}`", "wall time", "CPU time", "of the full build (wall)"]
    return (
        f"`python bench/cache.py` (`{data['spec']}`, one run), {source('cache.json', data)}:\n\n"
        + table(head, rows)
        + f"\n\nThe remote store held {data['remote_store_bytes'] / 2**30:.2f} GiB after the run."
    )


def load_summary(run: dict[str, Any]) -> str:
    lat = run["latency_ms"]
    rate = num(run["requests_per_s"])
    return f"{run['errors']} errors, {rate} requests/s, p50 {num(lat['p50'])} ms, p99 {num(lat['p99'])} ms"


def triton_load_block(results: Results) -> str:
    data = results("triton-load.json")
    sizes = data["batch_sizes"]["dense_onnx"]
    one = data["baseline_max_batch_size_1"]
    worst = data["checked_vs_pytorch"]["max_abs"]
    return (
        f"`python bench/triton_load.py` (`{data['spec']}`, {data['requests']:,} requests per round at concurrency "
        f"{data['concurrency']} over loopback gRPC, median of {len(data['rounds'])} rounds), "
        f"{source('triton-load.json', data)}: {load_summary(data)}; the dense step ran "
        f"{sum(sizes.values()):,} executions for {data['requests']:,} requests (mean batch "
        f"{data['mean_batch']['dense_onnx']}, sizes {min(map(int, sizes))}-{max(map(int, sizes))}). The same bundle "
        f"with `max_batch_size: 1`: {load_summary(one)}. Answers checked against PyTorch: max_abs {num(worst, 2)}."
    )


def vllm_load_block(results: Results) -> str:
    data = results("vllm-load.json")
    rows = []
    worst = 0.0
    for name, r in data["runs"].items():
        steps = r["steps"]["requests_per_step"]
        rounds = [x["requests_per_s"] for x in r["rounds"]]
        worst = max(worst, r["checked_vs_pytorch"]["max_abs"], r.get("max_abs_vs_pytorch", 0.0))
        rows.append([
            name, f"{num(r['start_s'])} s", str(r["errors"]), num(r["requests_per_s"]),
            f"{num(r['latency_ms']['p50'])} / {num(r['latency_ms']['p99'])} ms",
            f"{steps['mean']} (max {steps['max']})", f"{num(min(rounds))}-{num(max(rounds))}",
        ])  # fmt: skip
    venv = data["venv"]
    head = ["server", "start to /health", "errors", "requests/s", "p50 / p99", "requests per step", "rounds (req/s)"]
    return (
        f"`python bench/vllm_load.py` (`{data['spec']}`, {data['requests']:,} requests per round at concurrency "
        f"{data['concurrency']} over loopback HTTP, median round), {source('vllm-load.json', data)}:\n\n"
        + table(head, rows)
        + f"\n\nEvery answer checked against PyTorch: max_abs {num(worst, 2)}. The venv took "
        f"{num(venv['seconds_to_make'])} s to make and holds {venv['gib']} GiB."
    )


def plugin_kernel_block(results: Results) -> str:
    data = results("plugin-kernel-h100.json")
    worst: dict[str, float] = {}
    for case in data["cases"]:
        worst[case["dtype"]] = max(worst.get(case["dtype"], 0.0), case["max_rel"])
    passed = "every case passed" if data["all_ok"] and all(c["ok"] for c in data["cases"]) else "NOT every case passed"
    figures = ", ".join(f"{dtype} max_rel {num(w, 2)}" for dtype, w in worst.items())
    where = source("plugin-kernel-h100.json", data)
    return f"On an H100 (sm_90) {passed} ({len(data['cases'])} cases; {figures}): {where}."


# The H200 kernel runs the README quotes (bench/kernels.py), newest first: s17 is the table as grc runs it (the eager
# ops pick the Gluon sm90 kernel at head dims 128 / 256, the Triton kernel at 64); s15 the Triton kernel's alone.
KERNEL_RUNS = ("kernels-h200-s17.json", "kernels-h200-s15.json")
# Both kernels now against an earlier commit's, back to back in one run (bench/kernels_ab.py).
KERNEL_AB_RUN = "kernels-ab-h200-s17.json"
KERNEL_COLUMNS = ["head dim (P / NB)", "seq", "heads", "candidates", "kernel", "ms", "TFLOP/s (% of peak)",
                  "SDPA TFLOP/s", "rel. error vs reference"]  # fmt: skip
# The Gluon kernel beside the Triton kernel in one run each (bench/kernels_explore.py --sections hopper), per head dim:
# the run that timed it with the configs it ships (s16c: d 128 and 64; s16b: d 256).
HOPPER_RUNS = {128: "kernels-explore-hopper-h200-s16c.json", 64: "kernels-explore-hopper-h200-s16c.json",
               256: "kernels-explore-hopper-h200-s16b.json"}  # fmt: skip


def kernels_block(results: Results) -> str:
    """The HSTU attention kernel's speed tables (issue 17), one per run in KERNEL_RUNS (a complete
    older table and a newer partial one may stand side by side): % of the same run's matmul peak."""
    return "\n\n".join(kernel_run_table(name, results(name)) for name in KERNEL_RUNS)


def kernel_run_table(name: str, data: dict[str, Any]) -> str:
    rows, left = [], 0
    for r in data["attention"]:
        if "ours_ms" not in r:
            left += 1
            continue
        pct, sdpa = r["pct_of_matmul_peak"], r.get("sdpa_tflops")
        rows.append([f"{r['d']} ({r['P']} / {r['NB']})", str(r["seq"]), str(r["heads"]), str(r["cands"]),
                     r.get("kernel", "triton"), num(r["ours_ms"]), f"{num(r['ours_tflops'])} ({pct:.0f}%)",
                     num(sdpa) if sdpa else "-", num(r["rel_err_vs_ref"], 2)])  # fmt: skip
    note = f" {left} rows were not reached in the run's time budget." if left else ""
    return (
        f"bf16, causal, 64k tokens per call, {source(name, data)}; TFLOP/s count unmasked pairs only "
        f"(4·d per pair per head); in brackets the share of the bf16 matmul peak measured in the same run "
        f"({num(data['matmul_peak_tflops'])} TFLOP/s); SDPA: dense causal softmax attention of the same shape, "
        f"no bias (a yardstick).{note}\n\n" + table(KERNEL_COLUMNS, rows)
    )


def kernels_hopper_block(results: Results) -> str:
    """The Gluon sm90 kernel's shipped config against the autotuned Triton kernel, timed side by side in one run per
    head dim (HOPPER_RUNS; without candidates, and one user's 256 queries on 4,096 cached keys replayed from a CUDA
    graph), each row checked against float64 in the run."""
    from kernels.hstu_hopper import DEFAULT_HEAD_DIMS, HOPPER_CONFIGS

    rows, sources = [], {}
    for d, name in HOPPER_RUNS.items():
        data = results(name)
        sources[name] = source(name, data)
        shipped = str(HOPPER_CONFIGS[d][0])  # rows name their config in options (older rows' names are ambiguous)
        seen: dict[tuple[int, str], dict[str, float]] = {}
        for r in data["rows"]:
            if r.get("d") != d or "ms" not in r:
                continue
            cached = r["variant"].endswith("cached")
            key = (r["seq"], "one user's last 256 (CUDA graph)" if cached else "all")
            hopper = r["options"].get("config") == shipped or r["variant"] == "hopper cached"
            kernel = "hopper" if hopper else "triton" if r["variant"].startswith("triton") else ""
            if kernel and kernel not in seen.setdefault(key, {}):  # the first of a seq: no candidates
                seen[key][kernel] = r["ms"] if r["ok"] else float("nan")
        for (seq, what), ms in seen.items():
            if "triton" in ms and "hopper" in ms:
                picked = "Gluon" if d in DEFAULT_HEAD_DIMS else "Triton"
                rows.append([str(d), str(seq), what, num(ms["triton"]), num(ms["hopper"]),
                             f"{ms['triton'] / ms['hopper']:.2f}x", picked])  # fmt: skip
    head = ["head dim", "seq", "queries", "Triton kernel ms", "Gluon kernel ms", "Gluon speed-up", "grc runs"]
    return "Side by side, " + "; ".join(sources.values()) + ":\n\n" + table(head, rows)


def ab_pairs(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kernel, before row, now row) of a bench/kernels_ab.py run, for every shape timed both ways: by head dim,
    then longest sequence first."""
    timed = {(r["d"], r["seq"], r["variant"]): r for r in rows if "ms" in r}
    shapes = sorted({(d, s, v.split()[0]) for d, s, v in timed}, key=lambda k: (k[0], -k[1], k[2]))
    return [(kernel, timed[(d, seq, f"{kernel} before")], timed[(d, seq, f"{kernel} now")])
            for d, seq, kernel in shapes
            if (d, seq, f"{kernel} before") in timed and (d, seq, f"{kernel} now") in timed]  # fmt: skip


def kernels_ab_block(results: Results) -> str:
    """Each kernel now against an earlier commit's (KERNEL_AB_RUN), timed back to back in one run, rows checked
    against float64 in the run."""
    data = results(KERNEL_AB_RUN)
    rows = []
    for variant, before, now in ab_pairs(data["rows"]):
        ok = "yes" if before["ok"] and now["ok"] else "NO"
        rows.append([str(now["d"]), str(now["seq"]), str(now["heads"]), variant, num(before["ms"]), num(now["ms"]),
                     f"{before['ms'] / now['ms']:.2f}x", f"{now['pct_of_peak']:.0f}%", ok])  # fmt: skip
    head = ["head dim", "seq", "heads", "kernel", f"{data['before']} ms", "now ms", "speed-up", "now % of peak",
            "both within 1e-2 of float64"]  # fmt: skip
    return (
        f"Now vs commit {data['before']}'s kernels, back to back in one run, {source(KERNEL_AB_RUN, data)} "
        f"(bf16, causal, 64k tokens, no candidates; matmul peak {num(data['matmul_peak_tflops'])} TFLOP/s that run):"
        "\n\n" + table(head, rows)
    )


def e2e_gpu_block(results: Results) -> str:
    parts = []
    for name in E2E_GPU:
        data = results(name)
        for spec, s in data["specs"].items():
            parts.append(e2e_spec_table(name, data, spec, s))
    return "\n\n".join(parts)


def e2e_spec_table(name: str, data: dict[str, Any], spec: str, s: dict[str, Any]) -> str:
    """One spec of one e2e run: p50 per mode and workload, the speed-up against the fastest
    PyTorch baseline of the same run (none quoted when the run had none), the FLOP-floor share."""
    shapes = {wl: w for wl, w in s["workloads"].items()}
    best = {}
    for wl in shapes:
        timed = [s["modes"][m][wl]["p50_ms"] for m in BASELINES if wl in s["modes"].get(m, {})]
        best[wl] = min(timed) if timed else None
    compared = any(best.values())
    # bench/e2e.py --rounds: the latency calls timed again in interleaved rounds, the median of their p50s
    rounds = max((len(r.get("latency", {}).get("rounds_p50_ms", [])) for r in s["modes"].values()), default=0)
    rows = []
    for mode, label in MODE_LABELS.items():
        if mode not in s["modes"]:
            continue
        cells = [label]
        for wl in shapes:
            r = s["modes"][mode].get(wl)
            if r is None:
                cells += ["failed" if f"{mode}:{wl}" in s.get("errors", {}) else "not run"] + ["–"] * compared
                continue
            speedup = f"{best[wl] / r['p50_ms']:.1f}x" if best[wl] else "–"
            cells += [f"{num(r['p50_ms'])} ms"] + [speedup] * compared
        if rounds:
            median = s["modes"][mode].get("latency", {}).get("rounds_median_p50_ms")
            cells.append(f"{num(median)} ms" if median is not None else "–")
        thr = s["modes"][mode].get("throughput")
        floor = shapes.get("throughput", {}).get("flop_floor_ms")
        cells.append(f"{100 * floor / thr['p50_ms']:.1f}%" if thr and floor else "–")
        rows.append(cells)
    head = ["mode"]
    for wl, w in shapes.items():
        tokens = w["profile_tokens"] + w["history"] + w["candidates"]
        head += [f"{wl} p50 ({w['users']} x {tokens:,} tokens)"] + ["x best baseline"] * compared
    head += [f"latency p50, median of {rounds} interleaved rounds"] if rounds else []
    head.append("of the FLOP floor (throughput)")
    parity = ""
    package = s.get("aoti_package")
    if package:
        figures = package["parity"]["figures"]
        worst = max(f["max_rel"] for f in figures)
        parity = (
            f" Package parity on the GPU vs float64: max rel. {num(worst, 2)} (tolerance {figures[0]['tol_rel']}), "
            f"{len(figures)} shapes; compiled in {num(package['build_seconds']['compile'])} s, "
            f"{package['bytes'] / 2**20:.1f} MiB."
        )
    missing = "" if compared else " No PyTorch baseline ran in this run: no speed-up is quoted."
    return f"**`{spec}`**, bf16, {source(name, data)}.{missing}{parity}\n\n" + table(head, rows)


SERVE_MODES = ("grc", "eager", "kernels", "in_process")


def serve_files(folder: Path) -> list[str]:
    """Every bench/serve.py result: the GPU runs first (the claim), the CPU dry run last; among them the
    current run of a spec (serve-<gpu>-<spec>.json) before the earlier runs kept beside it with a suffix."""
    names = sorted(p.name for p in folder.glob("serve-*.json"))
    stems = {Path(n).stem for n in names}  # a suffixed run's name extends its spec's current one with "-"
    return sorted(names, key=lambda n: (n.startswith("serve-cpu"), any(n.startswith(f"{s}-") for s in stems)))


def serve_block(results: Results) -> str:
    parts = [serve_table(name, results(name)) for name in serve_files(results.folder)]
    return "\n\n".join(parts) or "No bench/serve.py result yet."


def serve_table(name: str, data: dict[str, Any]) -> str:
    """One bench/serve.py run: a row per (spec, concurrency, mode), then the issue's targets as measured."""
    order = {m: i for i, m in enumerate(SERVE_MODES)}
    rows = []
    for r in sorted(data["rows"], key=lambda r: (r["spec"], -r["concurrency"], order[r["mode"]])):
        head = [f"`{r['spec']}`", str(r["concurrency"]), r["mode"]]
        if "users_per_s" not in r:
            why = r.get("failed") or r.get("skipped") or "?"
            rows.append([*head, "failed" if "failed" in r else "not run", "–", "–", "–", "–", why[:100]])
            continue
        checked = r["checked"]
        verdict = "wrong" if checked["problems"] else f"{checked['checked']} ok, max rel. {num(checked['max_rel'], 2)}"
        rows.append([
            *head, num(r["users_per_s"]), f"{num(r['p50_ms'])} / {num(r['p99_ms'])} ms",
            f"{r['errors']} / {r['requests']:,}", num(r["mean_batch"]) if r.get("mean_batch") else "–",
            graph_counts(r), verdict,
        ])  # fmt: skip
    header = ["spec", "concurrency", "mode", "users/s", "p50 / p99", "errors / requests", "mean batch",
              "CUDA graph hits / misses", "answers vs PyTorch float64 (sample)"]  # fmt: skip
    cpu = "not the GPU claim" in data.get("what", "")
    label = "CPU dry run (tiny spec; CPU numbers, not the GPU claim)" if cpu else "GPU run"
    args = list(data["argv"][1:])
    if "--grc-failed" in args:  # its reason is in the rows; the command line names the flag
        args[args.index("--grc-failed") + 1] = "REASON"
    argv = " ".join(args).replace(str(REPO) + "/", "")
    return (
        f"**{label}**: `python bench/serve.py {argv}`, {source(name, data)}"
        + ("" if data.get("complete", True) else " (incomplete: the run ended before its last row)")
        + ":"
        + served_configs(data)
        + "\n\n"
        + table(header, rows)
        + "\n\nServed rows: one request per user, latency per request; in_process: latency per batch of "
        "`concurrency` requests (its users/s counts users).\n\n" + serve_targets(data["rows"])
    )


def served_configs(data: dict[str, Any]) -> str:
    """What each spec's bundle served with (bench/serve.py records it since session 6; older runs: nothing)."""
    parts = []
    for spec, s in data.get("specs", {}).items():
        c = s.get("served")
        if c:
            parts.append(
                f" `{spec}`: {c['pipeline']} pipeline, {c['backend']} on {c['instance_kind']}, "
                f"{c['instance_count']} instance(s), max batch {c['max_batch_size']}, "
                f"queue delay {c['max_queue_delay_us']} us, CUDA graphs {c['gpu']['cuda_graphs']}."
            )
    return "".join(parts)


def graph_counts(row: dict[str, Any]) -> str:
    """The dense step's CUDA-graph replays and misses in the row: the served model's counters (its /metrics), or
    the in-process Ranker's stats; '–' where the model keeps none (a CPU model, the eager baseline)."""
    served = row.get("grc_metrics", {})
    counts = (served.get("grc_cuda_graph_hits_total"), served.get("grc_cuda_graph_misses_total"))
    if counts == (None, None) and "ranker_stats" in row:
        counts = (row["ranker_stats"].get("graph_hits"), row["ranker_stats"].get("graph_misses"))
    if counts == (None, None) or counts == (0, 0):
        return "–"
    return " / ".join(f"{int(c or 0):,}" for c in counts)


def serve_targets(rows: list[dict[str, Any]]) -> str:
    """Issue 16's targets, per spec, from the rows (a ratio whose rows did not run says so)."""
    by = {(r["spec"], r["mode"], r["concurrency"]): r for r in rows if "users_per_s" in r}
    lines = []

    def ratio(spec: str, a: str, b: str, c: int) -> float | None:
        x, y = by.get((spec, a, c)), by.get((spec, b, c))
        return x["users_per_s"] / y["users_per_s"] if x and y and y["users_per_s"] else None

    def met(value: float | None, ok: bool, text: str) -> str:
        return "not measured" if value is None else f"{text} ({'met' if ok else 'NOT met'})"

    for spec in sorted({r["spec"] for r in rows}):
        eager, ceiling = ratio(spec, "grc", "eager", 32), ratio(spec, "grc", "in_process", 32)
        grc8 = by.get((spec, "grc", 8))
        tail = grc8["p99_ms"] / grc8["p50_ms"] if grc8 else None
        errors = sum(r["errors"] for (s, _, _), r in by.items() if s == spec)
        lines.append(
            f"`{spec}` against issue 16's targets: grc served vs eager served at concurrency 32 "
            + met(eager, eager is not None and eager >= 5, f"{eager or 0:.1f}x, target >= 5x")
            + "; grc served vs in_process at concurrency 32 "
            + met(ceiling, ceiling is not None and ceiling >= 0.6, f"{100 * (ceiling or 0):.0f}%, target >= 60%")
            + "; grc p99 / p50 at concurrency 8 "
            + met(tail, tail is not None and tail <= 3, f"{tail or 0:.1f}x, target <= 3x")
            + f"; {errors} errors in all."
        )
    return "\n".join(lines)


SHARE_SPECS = ("mtgr-small", "mtgr-base", "mtgr-large")
QUANTIZED_LABELS = {"int8": "int8", "fp8_e4m3": "fp8"}


def table_share_block(results: Results) -> str:
    """No result file: the tables' share of each MTGR spec's parameters and their bytes per precision,
    computed from specs/*.yaml by the functions ``grc show`` prints them with (deterministic)."""
    sys.path.insert(0, str(REPO))
    from grc.model.params import parameter_bytes, parameter_summary, table_bytes
    from grc.spec.loader import load_spec

    rows = []
    for spec in SHARE_SPECS:
        model = load_spec(REPO / "specs" / f"{spec}.yaml").spec.model
        summary = parameter_summary(model)
        tables = [r for r in summary if r[1] == "embedding"]
        share = 100 * sum(r[2] for r in tables) / sum(r[2] for r in summary)
        size = parameter_bytes(model, *tables)
        rows.append(
            [f"`{spec}`", f"{share:.1f}%"] + [f"{100 * size[q] / size['bfloat16']:.1f}%" for q in QUANTIZED_LABELS]
        )
    width = ", ".join(
        f"{label} {100 * table_bytes(1, 128, q) / table_bytes(1, 128, 'bfloat16'):.1f}%"
        for q, label in QUANTIZED_LABELS.items()
    )
    head = ["spec", "tables' share of the parameters"] + [f"{q} tables' bytes vs bf16" for q in QUANTIZED_LABELS]
    return (
        "Computed from `specs/*.yaml` by `grc.model.params` (what `grc show` prints), no measurement:\n\n"
        + table(head, rows)
        + f"\n\nA row of width 128 (mtgr's user and item tables) takes, of bf16's bytes: {width}."
    )


def quant_block(results: Results) -> str:
    data = results("quant.json")
    rows = []
    for precision, p in data["precisions"].items():
        w = p["worst_over_tasks"]
        rows.append([
            precision, f"{p['table_bytes_of_bf16']:.3f}", f"{w['top_k_overlap']:.3f}", f"{w['kendall_tau']:.4f}",
            num(w["mean_abs"], 2), num(w["max_abs"], 2),
        ])  # fmt: skip
    lookups = ", ".join(
        f"{p['lookup_100000_rows_per_table_s']:.2f} s for {precision}" for precision, p in data["precisions"].items()
    )
    head = ["tables", "bytes vs bf16", "top-10 overlap", "Kendall tau", "mean \\|Δscore\\|", "max \\|Δscore\\|"]
    return (
        f"Measured on `{data['spec']}`'s shapes (`python bench/quant.py`), {source('quant.json', data)}; every "
        f"table at its {data['spec']} width, user and item cut to 1/{data['rows_divisor']} of their rows; "
        f"{data['spec']}'s dense model; {data['held_out_users']} held-out users × {data['candidates_per_user']} "
        f"candidates; worst task:\n\n"
        + table(head, rows)
        + f"\n\nA warm lookup of 100,000 ids in each of the {len(data['tables'])} tables (one thread, "
        f"memory-mapped, dequantized to float32) took {lookups}."
    )


def history_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in data["cases"]:
        if "skipped" in c:
            continue
        rows.append([
            f"{c['history']} x {c['candidates']}", f"{c['full_forward_ms'] / 1000:.2f} s",
            f"{c['cached_score_ms'] / 1000:.2f} s", f"{c['speedup']:.1f}x", f"{c['cache_mb']:.1f} MB",
        ])  # fmt: skip
    return rows


def history_cache_block(results: Results) -> str:
    data, delta = results("history-cache-cpu.json"), results("history-cache-cpu-delta10.json")
    worst = max(c["max_abs_diff"] for c in data["cases"] + delta["cases"] if "skipped" not in c)
    skipped = "; ".join(f"{c['history']} x {c['candidates']}: {c['skipped']}" for c in data["cases"] if "skipped" in c)
    speedups = ", ".join(f"{c['speedup']:.1f}x" for c in delta["cases"] if "skipped" not in c)
    head = [f"history x candidates ({data['spec']})", "full forward", "cached score", "speedup", "cache"]
    return (
        f"`python bench/history_cache.py --spec specs/{data['spec']}.yaml`, {source('history-cache-cpu.json', data)}: "
        f"dense model only, {data['dtype']}, torch threads: {data['threads']}, median of {data['repeat']}, "
        f"same scores (max |diff| {num(worst, 1)}):\n\n"
        + table(head, history_rows(data))
        + f"\n\nWith {delta['delta']} new history events per request (`--delta {delta['delta']}`), "
        f"{source('history-cache-cpu-delta10.json', delta)}: {speedups}. Skipped: {skipped}."
    )


def history_cache_gpu_block(results: Results) -> str:
    """The in-process device run (bench/gpu_run_history.sh) and the step's profile."""
    name = "history-cache-h200-s8-graphs.json"
    data, prof = results(name), results("history-cache-profile-h200.json")
    rows = []
    for c in data["cases"]:
        if "graph_cached_ms" not in c:
            continue
        served = "-"
        if "score_graphs_hit_ms" in c:
            miss, hit = c["score_graphs_miss_ms"], c["score_graphs_hit_ms"]
            served = f"{miss:.3f} -> {hit:.3f} ms ({c['score_graphs_speedup']:.1f}x)"
        errors = [v for k, v in c.items() if k.startswith("rel_err_") and k.endswith("_vs_fp64")]
        rows.append([
            f"{c['spec']} {c['dtype']} {c['history']} x {c['candidates']}", f"{c['full_forward_ms']:.2f} ms",
            f"{c['cached_score_ms']:.2f} ms ({c['speedup']:.1f}x)", f"{c['graph_uncached_ms']:.3f} ms",
            f"{c['graph_cached_ms']:.3f} ms ({c['graph_speedup']:.1f}x)", served, f"{num(max(errors), 1)}",
        ])  # fmt: skip
    head = ["case", "full forward, eager", "cached score, eager", "uncached step, CUDA graph",
            "cached step, CUDA graph", "served step (ScoreGraphs): miss -> hit, host work included",
            "max rel. err vs float64"]  # fmt: skip
    targets = [c for c in data["cases"] if c.get("target") and "graph_speedup" in c]
    verdicts = "; ".join(
        f"{c['spec']} {max(c.get('speedup', 0.0), c['graph_speedup']):.1f}x at best "
        f"({'met' if max(c.get('speedup', 0.0), c['graph_speedup']) >= 5 else 'NOT met'})"
        for c in targets
    )
    paths = "; ".join(
        f"{name.replace('_', ' ')} {p['wall_ms']:.2f} ms wall, {p['kernels']:g} kernels, {p['kernel_ms']:.2f} ms "
        f"on the device, {p['syncs']:g} host syncs"
        for name, p in prof["paths"].items()
    )
    return (
        f"`OUT=<folder> bash bench/gpu_run_history.sh`, {source(name, data)}, one user, "
        f"grc's kernels, median of {data['repeat']}:\n\n"
        + table(head, rows)
        + f"\n\nTarget: in-process score step >= 5x the full forward at the target shape (max_seq_len - 256 x 256): "
        f"{verdicts}. Where the time goes (`OUT=<folder> bash bench/gpu_run_history_profile.sh`, "
        f"{source('history-cache-profile-h200.json', prof)}, {prof['spec']} {prof['history']} x {prof['candidates']}): "
        f"{paths}." + "\n\n" + arena_profile(results)
    )


ARENA_PROFILES = (
    "history-cache-profile-h200-s19-arena-base-1000.json",
    "history-cache-profile-h200-s19-arena-base-default.json",
    "history-cache-profile-h200-s21-arena-base-1000.json",
    "history-cache-profile-h200-s21-arena-base-default.json",
    "history-cache-profile-h200-s21-diag-landed.json",
    "history-cache-profile-h200-s22-arena-base-default.json",
)


def arena_profile(results: Results) -> str:
    """The in-process profiles (sessions 19 and 21): the hit over the device arena beside the copies step (where the
    run timed it) and the eager full forward (bench/gpu_run_arena.sh), device time per call."""
    rows, ratios = [], []
    for name in ARENA_PROFILES:
        d = results(name)
        p = d["paths"]
        arena, full = (p[k]["kernel_ms"] for k in ("arena_score", "full_forward"))
        ratios.append((d["history"], full / arena, name))
        wall = {k: p[k]["wall_ms"] for k in p}
        copies = f"{p['graphs_score']['kernel_ms']:.3f} ms ({wall['graphs_score']:.3f})" if "graphs_score" in p else "-"
        rows.append([
            f"{d['spec']} {d['dtype']} {d['history']} x {d['candidates']}",
            f"{arena:.3f} ms ({wall['arena_score']:.3f})",
            copies, f"{full:.3f} ms ({wall['full_forward']:.2f})",
            f"{full / arena:.1f}x", source(name, d),
        ])  # fmt: skip
    head = ["case", "arena step, CUDA graph", "copies step, CUDA graph", "full forward, eager", "arena vs full",
            "source"]  # fmt: skip
    top = max(ratios)
    return (
        "The step over the device arena (`history_cache.store: arena`, the default; `OUT=<folder> bash "
        "bench/gpu_run_arena.sh`), device ms per call by torch.profiler (wall ms of one synchronized call):\n\n"
        + table(head, rows)
        + f"\n\nBy device time at the target shape ({top[0]} history): at best {top[1]:.1f}x the eager full forward "
        f"(`{top[2]}`; {'met' if top[1] >= 5 else 'NOT met'}: target >= 5x)."
    )


def history_cache_served_block(results: Results) -> str:
    data = results("history-cache-served-cpu.json")
    rows, miss = [], []
    for c in data["cases"]:
        eager, ort, hit = (
            c[k]["p50_ms"] / 1000 for k in ("uncached_pytorch", "uncached_onnxruntime_ensemble", "cached_hit")
        )
        miss.append(eager / ort)
        rows.append([
            f"{c['history']} x {c['candidates']}", f"{eager:.2f} s", f"{ort:.2f} s", f"{hit:.2f} s",
            f"{c['speedup_p50_vs_onnxruntime']:.1f}x",
        ])  # fmt: skip
    same = all(c["max_abs_diff_cached_vs_uncached"] == 0 for c in data["cases"])
    hits = all(c["hits_counted"] == c["cached_hit"]["requests"] + ("first_hit_ms" in c) for c in data["cases"])
    onnx = max(c["max_abs_diff_onnx_vs_cached"] for c in data["cases"])
    head = ["history x candidates", "uncached (same model, no user_id)", "uncached onnxruntime ensemble",
            "cached hit", "vs onnxruntime"]  # fmt: skip
    return (
        f"`python bench/history_cache_served.py` ({data['requests']} timed requests per mode), "
        f"{source('history-cache-served-cpu.json', data)}, p50:\n\n"
        + table(head, rows)
        + f"\n\nCached and uncached scores were {'bit-identical' if same else 'NOT identical'} (float32); "
        f"{'every' if hits else 'NOT every'} timed cached request counted as a hit; onnxruntime differs by "
        f"{num(onnx, 1)}. A miss costs the eager uncached time, {min(miss):.1f}-{max(miss):.1f}x the onnxruntime "
        "ensemble's on the CPU."
    )


# mtgr-base (session 22: the arena store, the cache's default on a GPU), mtgr-small
SERVED_GPU = ("history-cache-served-h200-s22-shapes.json", "history-cache-served-h200-small.json")
# the copies store's first mtgr-base run (shapes and sessions), then session-workload-only runs (--skip-shapes),
# oldest first: their rows join the tables
SERVED_SESSIONS = (
    "history-cache-served-h200.json",
    "history-cache-served-h200-s10-session.json", "history-cache-served-h200-s10-packed.json",
    "history-cache-served-h200-s11-session.json", "history-cache-served-h200-s12-shared.json",
    "history-cache-served-h200-s13-pool.json", "history-cache-served-h200-s13-streams.json",
    "history-cache-served-h200-s14-aligned-threads0.json", "history-cache-served-h200-s14-aligned-threads1.json",
    "history-cache-served-h200-s14-base3000.json", "history-cache-served-h200-s15-instances4.json",
    "history-cache-served-h200-s22-session.json", "history-cache-served-h200-s24-session-warm.json",
)  # fmt: skip
# per execute, ms: Triton's queue and compute, then the fused model's host phases (grc/serving/ranker/phases.py)
SERVED_PHASES = {
    "queue": ("nv_inference_queue_duration_us",),
    "compute": ("nv_inference_compute_infer_duration_us",),
    "read + check": ("grc_phase_read_seconds_total", "grc_phase_check_seconds_total"),
    "layout": ("grc_phase_layout_seconds_total",),
    "upload (before session 12: in layout)": ("grc_phase_upload_seconds_total",),
    "embed": ("grc_phase_embed_seconds_total",),
    "dense (host)": ("grc_phase_dense_seconds_total",),
    "fetch": ("grc_phase_fetch_seconds_total",),
    "rank + respond + metrics": (
        "grc_phase_rank_seconds_total", "grc_phase_respond_seconds_total", "grc_phase_metrics_seconds_total",
    ),
    "dense (device)": ("grc_dense_device_seconds_total",),
}  # fmt: skip


def phase_cells(split: dict[str, float]) -> list[str]:
    """SERVED_PHASES' cells of one per-execute split: "–" where the run exported none of a column's counters
    (an older model), "not timed" where they stayed zero (a hit's device time was not timed on the device)."""
    cells = []
    for keys in SERVED_PHASES.values():
        found = [split[k] for k in keys if k in split]
        cells.append("–" if not found else f"{sum(found):.2f}" if sum(found) else "not timed")
    return cells


def captures_cell(cached: dict[str, float]) -> str:
    """Graphs captured in a cached mode, their host seconds, and where recorded the eager warm-up runs among them."""
    if "graph_captures" not in cached:
        return "not recorded"
    cell = f"{cached['graph_captures']:.0f} ({cached['graph_capture_s']:.2f} s"
    if "graph_capture_warmup_s" in cached:
        cell += f"; eager warm-up runs {cached['graph_capture_warmup_s']:.2f} s"
    return cell + ")"


SESSION_HEAD = [
    "spec", "commit", "clients", "answered in the time (uncached / cached)", "uncached users/s", "cached users/s",
    "cached vs uncached", "hit ratio", "uncached p50 / p99 ms", "cached p50 / p99 ms", "errors", "cache bytes held",
    "exact (3 hits vs float64, 32 vs uncached)", "graphs captured in the cached mode (host s)",
]  # fmt: skip


def history_cache_served_gpu_block(results: Results) -> str:
    """The served device runs (bench/gpu_run_history_served.sh), one user per request: latency per shape, where
    an execute spends it, and the session workload where the run had one."""
    rows, phases, sessions, sources = [], [], [], []
    for name in SERVED_GPU + SERVED_SESSIONS:
        data = results(name)
        spec = data["spec"].removesuffix("-bench")
        argv = data["argv"]
        flags = " ".join(argv[argv.index("--budget-mb") :]) if "--budget-mb" in argv else ""  # BENCH_FLAGS
        more = f' BENCH_FLAGS="{flags}"' if flags else ""
        sources.append(
            f"`REQUESTS={data['requests']}{more} OUT=<folder> bash bench/gpu_run_history_served.sh {spec}`: "
            f"{source(name, data)}"
        )
        for c in data["cases"]:
            if "cached_hit" not in c:
                continue
            plain = next(v for k, v in c.items() if k.startswith("uncached_"))
            hit, speedup = c["cached_hit"], next(v for k, v in c.items() if k.startswith("speedup_p50_vs_"))
            rows.append([
                spec, f"{c['history']} x {c['candidates']}", f"{plain['p50_ms']:.2f} / {plain['p99_ms']:.2f} ms",
                f"{hit['p50_ms']:.2f} / {hit['p99_ms']:.2f} ms", f"{c['first_hit_ms']:.1f} ms", f"{speedup:.2f}x",
                f"{num(max(c['max_abs_diff_cached_vs_float64'], c['max_abs_diff_uncached_vs_float64']), 1)}",
                "yes" if c["clean"] else "NO",
            ])  # fmt: skip
            if c is data["cases"][0]:  # the long history: the issue's target shape
                for mode, split in c["phases_ms_per_execute"].items():
                    cells = phase_cells(split)
                    phases.append([spec, f"{c['history']} x {c['candidates']}", mode.replace("_", " "), *cells])
        for run in data.get("session", {}).get("runs", []):
            plain, cached = run["uncached"], run["cached"]
            for mode, figures in (("uncached", plain), ("cached", cached)):  # recorded from session 11 on
                if "phases_ms_per_execute" in figures:
                    split = figures["phases_ms_per_execute"]
                    where = f"session, {run['concurrency']} client(s), {split['executes']:.0f} executes"
                    phases.append([spec, where, mode, *phase_cells(split)])
            warm = " (warm pass first)" if run.get("warm_pass") else ""
            warm += f", {data['instances']} instances" if data.get("instances") else ""
            base = data["session"].get("base_history", 1000)
            warm += f", history {base} at the first visit" if base != 1000 else ""
            warm += f", intra_op_threads {data['intra_op_threads']}" if "intra_op_threads" in data else ""
            sessions.append([
                spec, str(data["commit"])[:7], f"{run['concurrency']}{warm}",
                f"{plain['responses']} / {cached['responses']}",
                f"{plain['users_per_s']:.0f}", f"{cached['users_per_s']:.0f}",
                f"{run['users_per_s_ratio']:.2f}x", f"{cached['hit_ratio']:.2f}",
                f"{plain['p50_ms']:.1f} / {plain['p99_ms']:.1f}", f"{cached['p50_ms']:.1f} / {cached['p99_ms']:.1f}",
                f"{plain['errors'] + cached['errors']}",
                f"{cached['bytes_held'] / 2**30:.2f} of {data['session']['budget_bytes'] / 2**30:.0f} GiB",
                "yes" if run["clean"] else "NO",
                captures_cell(cached),
            ])  # fmt: skip
    head = ["spec", "history x candidates", "uncached (aotinductor, no user_id) p50 / p99", "cached hit p50 / p99",
            "first hit (graph capture)", "hit vs uncached, p50", "max abs diff vs float64",
            "every hit counted, both within tolerance"]  # fmt: skip
    out = (
        "; ".join(sources)
        + ". One user per request over one gRPC connection, 30 timed requests per mode:\n\n"
        + table(head, rows)
        + "\n\nWhere one execute spends it (ms per execute, the long history and, where recorded, the session "
        "workload; Triton's queue and compute (summed over an execute's requests), the fused model's host phases "
        "inside compute, and the dense step's device time from CUDA events):\n\n"
        + table(["spec", "shape", "mode", *SERVED_PHASES], phases)
    )
    if sessions:
        first = next(results(n)["session"] for n in SERVED_GPU + SERVED_SESSIONS if "session" in results(n))
        out += (
            f"\n\nSession workload served ({first['users']} users x {first['visits']} visits in Zipf order "
            f"(exponent {first['zipf']}), history {first['base_history']} + {first['delta']} events per visit, "
            f"{first['candidates']} candidates, visits {first['gap_s']} s apart; uncached = the same requests without "
            f"user_id; at most {first['budget_s_per_mode']:.0f} s per mode):\n\n" + table(SESSION_HEAD, sessions)
        )
    return out


# in-process batches of cached users per step (bench/gpu_run_history_batches.sh), oldest first
BATCHES_GPU = (
    "history-cache-batches-h200-split.json", "history-cache-batches-h200-packed.json",
    "history-cache-batches-h200-s11-hoststamps.json", "history-cache-batches-h200-s12-split.json",
)  # fmt: skip
# the mixed hits-and-misses section (session 12 on): the A/B base (c2a6989's grc under the new bench, one call with
# the next), the shared key buffer (207f215), the landed commit with the capture's seconds split
MIXED_GPU = (
    "history-cache-batches-h200-s12-base-c2a6989-grc.json", "history-cache-batches-h200-s12-shared.json",
    "history-cache-batches-h200-s12-split.json",
)  # fmt: skip


def history_cache_batches_gpu_block(results: Results) -> str:
    """Several cached users per graphed score step vs their whole sequences in one graphed step, per commit."""
    rows, sources = [], []
    for name in BATCHES_GPU:
        data = results(name)
        sources.append(source(name, data))
        for r in data["rows"]:
            if "p50_ms" not in r:
                continue
            rows.append([
                str(data["commit"])[:7], str(r["users"]), f"{r['p50_ms']:.2f}", f"{r['replay_ms']:.2f}",
                f"{r['enqueue_ms']:.2f}", f"{r['uncached_ms']:.2f}", f"{r['users_per_s']:.0f}",
                f"{r['uncached_users_per_s']:.0f}", f"{r['cached_vs_uncached_users_per_s']:.2f}x",
                f"{r['first_step_s'] * 1e3:.0f} ms", num(r["max_abs_diff_vs_one_user"], 1),
            ])  # fmt: skip
    head = ["commit", "users per step", "cached step p50 ms", "its graph replay ms", "its host time ms",
            "uncached step (graph) ms", "cached users/s", "uncached users/s", "cached vs uncached",
            "first step of the size", "max abs diff vs one user per step"]  # fmt: skip
    first = results(BATCHES_GPU[0])
    return (
        f"`OUT=<folder> bash bench/gpu_run_history_batches.sh` ({first['spec']}, {first['dtype']}, warm-up "
        f"{first['warm_up_s']:.0f} s for {first['warm_up_keys']} attention keys first): "
        + "; ".join(sources)
        + ". Each user ~1,000 cached events + 10 new + 256 candidates:\n\n"
        + table(head, rows)
        + "\n\n"
        + mixed_table(results)
    )


def mixed_table(results: Results) -> str:
    """The mixed section: steps of 1..16 users, one in five a miss, one seeded order run twice."""
    rows, sources = [], []
    for name in MIXED_GPU:
        data = results(name)
        m = data["mixed"]
        tree = data.get("tree", "").split(" (")[0] or f"commit {str(data['commit'])[:7]}"
        sources.append(source(name, data) if "tree" not in data else f"`bench/results/{name}` ({tree}: its `tree`)")
        for label in ("first_pass", "second_pass"):
            p = m[label]
            spent = f"{p['capture_s']:.2f} ({p['capture_warmup_s']:.2f})" if "capture_s" in p else "not recorded"
            rows.append([
                tree, label.replace("_", " "), str(p["captures"]), spent, str(p["shapes_kept"]), f"{p['wall_s']:.2f}",
                f"{p['users_per_s']:.0f}", f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f}",
            ])  # fmt: skip
    head = ["tree", "pass", "graphs captured", "their host s (of which eager warm-up runs)", "shapes kept", "wall s",
            "users/s", "step p50 / p99 ms"]  # fmt: skip
    first = results(MIXED_GPU[0])["mixed"]
    return (
        f"Mixed hits and misses (`mixed`: {first['steps']} steps of 1-16 users, {first['users']} users, "
        f"{first['misses']} misses, one seeded order run twice): " + "; ".join(sources) + ":\n\n" + table(head, rows)
    )


BLOCKS: dict[str, Callable[[Results], str]] = {
    "history-cache-batches-gpu": history_cache_batches_gpu_block,
    "build": build_block,
    "cache": cache_block,
    "triton-load": triton_load_block,
    "serve": serve_block,
    "vllm-load": vllm_load_block,
    "plugin-kernel": plugin_kernel_block,
    "kernels": kernels_block,
    "kernels-hopper": kernels_hopper_block,
    "kernels-ab": kernels_ab_block,
    "e2e-gpu": e2e_gpu_block,
    "table-share": table_share_block,
    "quant": quant_block,
    "history-cache": history_cache_block,
    "history-cache-served": history_cache_served_block,
    "history-cache-gpu": history_cache_gpu_block,
    "history-cache-served-gpu": history_cache_served_gpu_block,
}


# --------------------------------------------------------------------------- README
def render(readme: str, results: Results) -> str:
    """The README with every report block regenerated. Unknown block names and blocks that are
    defined but absent are errors: a table nobody renders, or a renderer nobody reads, is a lie
    waiting to happen."""
    found = [m.group("name") for m in BLOCK.finditer(readme)]
    unknown = sorted(set(found) - set(BLOCKS))
    missing = sorted(set(BLOCKS) - set(found))
    opened = re.findall(r"<!-- report:([\w-]+) -->", readme)
    if unknown or missing or len(opened) != len(found):
        raise SystemExit(
            f"bench/report.py: README blocks unknown {unknown}, missing {missing}, unclosed "
            f"{sorted(set(opened) - set(found))} (known: {', '.join(BLOCKS)})"
        )
    return BLOCK.sub(
        lambda m: f"<!-- report:{m['name']} -->\n{BLOCKS[m['name']](results)}\n<!-- /report:{m['name']} -->", readme
    )


def differences(old: str, new: str) -> list[str]:
    """Per block whose text differs: its name and a unified diff (README -> generated)."""
    generated = {m["name"]: m["body"] for m in BLOCK.finditer(new)}
    out = []
    for m in BLOCK.finditer(old):
        if m["body"] != generated[m["name"]]:
            diff = difflib.unified_diff(
                m["body"].splitlines(), generated[m["name"]].splitlines(), "README.md", "bench/results", lineterm=""
            )
            out.append(f"report block '{m['name']}' disagrees with its JSON:\n" + "\n".join(diff))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare only; exit 1 on any difference")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    old = args.readme.read_text()
    new = render(old, Results(args.results))
    if args.check:
        problems = differences(old, new)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(
                f"{args.readme}: {len(problems)} report block(s) out of date: run python bench/report.py",
                file=sys.stderr,
            )
        return 1 if problems else 0
    if new != old:
        sys.path.insert(0, str(REPO))
        from grc.build.atomic import write_file

        write_file(args.readme, new.encode())
        print(f"{args.readme}: report blocks regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
