"""weights: seeded init or checkpoint import -> sharded safetensors + manifest."""

from __future__ import annotations

from typing import Any

from grc.stages.base import Context, Stage


def run(ctx: Context) -> dict[str, Any]:
    from grc.weights import import_checkpoint, write_init  # torch: only when the stage runs

    spec = ctx.spec
    source = spec.weights.source
    last = [-1]

    def progress(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct // 10 != last[0]:  # one line per 10%: visible on big models, quiet on small ones
            last[0] = pct // 10
            ctx.log(f"weights: {done / 2**30:.2f} / {total / 2**30:.2f} GiB written ({pct}%)")

    if spec.weights.checkpoint is not None:
        manifest = import_checkpoint(spec.model, spec.weights, ctx.out, ctx.loaded.path.parent, progress)
    else:
        manifest = write_init(spec.model, spec.weights, source, ctx.out, progress)  # type: ignore[arg-type]
    counts, sizes = manifest["parameters"], manifest["bytes"]
    ctx.log(
        f"weights: {counts['total']:,} parameters ({counts['embedding']:,} embedding as {manifest['table_dtype']}, "
        f"{sizes['embedding'] / 2**20:.1f} MiB; {counts['dense']:,} dense) in {len(manifest['shards'])} shard(s)"
    )
    return manifest


STAGE = Stage(
    name="weights",
    output="weights",
    reads=("model", "weights"),
    inputs=(),
    toolkits=("torch", "safetensors", "numpy"),
    run=run,
    doc="seeded init or checkpoint import -> sharded safetensors + manifest.json",
)
