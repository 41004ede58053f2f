"""preprocess: raw request -> projected tokens of the dense model.

Checks every request (types, shapes, lengths that agree, ids inside their tables, history and
candidate counts), looks the ids up in the memory-mapped embedding tables and runs the token
projector, for all requests of an execution at once. A bad request gets its own error response;
the others in the same execution are served.

Out, per request of ``b`` users with ``L`` tokens each (profile + history + candidates):
tokens FP32 [b, L, D], timestamps INT64 [b, L], lengths INT64 [b, 1], num_candidates INT64 [b, 1].
With ``pad_to`` (the TensorRT step: the batcher concatenates requests, so shapes must agree)
tokens and timestamps are zero-padded to ``pad_to`` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from grc.serving import request as rq
from grc.serving.triton_models import tensor_io as io
from grc.spec.schema import ModelConfig

OUTPUTS = ("tokens", "timestamps", "lengths", "num_candidates")


class RequestError(ValueError):
    """A request the model cannot take; the message goes back to the client."""


def parse(arrays: dict[str, np.ndarray | None], cfg: ModelConfig, truncate: bool) -> dict[str, np.ndarray]:
    """Check one request; return its arrays (history cut to what fits when ``truncate``)."""
    specs = rq.request_inputs(cfg)
    missing = [s.name for s in specs if arrays.get(s.name) is None]
    if missing:
        raise RequestError(f"missing input(s): {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    users = None
    for spec in specs:
        a = arrays[spec.name]
        assert a is not None
        want = np.dtype(rq.NP_TYPES[spec.datatype])
        if a.dtype != want:
            raise RequestError(f"{spec.name}: expected {spec.datatype} (got {a.dtype})")
        if a.ndim != 1 + len(spec.dims):
            raise RequestError(f"{spec.name}: expected shape [batch, {', '.join(map(str, spec.dims))}] "
                               f"(got {list(a.shape)})")
        users = a.shape[0] if users is None else users
        if a.shape[0] != users:
            raise RequestError(f"{spec.name}: batch {a.shape[0]} differs from the other inputs' {users}")
        fixed = [(got, want) for got, want in zip(a.shape[1:], spec.dims, strict=True) if want != -1 and got != want]
        if fixed:
            raise RequestError(f"{spec.name}: expected shape [batch, {', '.join(map(str, spec.dims))}] "
                               f"(got {list(a.shape)})")
        out[spec.name] = a
    if not users:
        raise RequestError("empty request: batch dimension 0")
    history = [rq.history_input(t) for t in cfg.history] + [rq.HISTORY_TIME]
    candidates = [rq.candidate_input(t) for t in cfg.candidate] + ([rq.CROSS] if cfg.cross_features else [])
    h = _same_length(out, history, "history event")
    c = _same_length(out, candidates, "candidate")
    if h == 0:
        raise RequestError(f"empty history: {history[0]} has no events; a request needs at least one")
    if c == 0:
        raise RequestError(f"no candidates: {candidates[0]} is empty; a request needs at least one")
    if c > cfg.max_candidates:
        raise RequestError(f"too many candidates: {c} (model.max_candidates is {cfg.max_candidates})")
    for t in cfg.profile:
        _check_ids(out[rq.profile_input(t)], rq.profile_input(t), t, cfg)
    for t in cfg.history:
        _check_ids(out[rq.history_input(t)], rq.history_input(t), t, cfg)
    for t in cfg.candidate:
        _check_ids(out[rq.candidate_input(t)], rq.candidate_input(t), t, cfg)
    if cfg.cross_features and not np.isfinite(out[rq.CROSS]).all():
        raise RequestError(f"{rq.CROSS}: values must be finite")
    room = cfg.hstu.max_seq_len - len(cfg.profile) - c
    if h > room:
        if not truncate:
            raise RequestError(f"history too long: {h} events + {c} candidates + {len(cfg.profile)} profile tokens "
                               f"exceed max_seq_len {cfg.hstu.max_seq_len}")
        for name in history:  # keep the latest events
            out[name] = out[name][:, h - room :]
    return out


def _same_length(arrays: dict[str, np.ndarray], names: list[str], what: str) -> int:
    counts = {name: arrays[name].shape[1] for name in names}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{n} {k}" for n, k in counts.items())
        raise RequestError(f"every {what} tensor needs one value per {what}, got different lengths: {listed}")
    return next(iter(counts.values()))


def _check_ids(ids: np.ndarray, name: str, table: str, cfg: ModelConfig) -> None:
    vocab = cfg.tables[table].vocab_size
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise RequestError(f"{name}: unknown id {int(bad[0])}: the {table} table has ids 0..{vocab - 1}")


def merge(requests: list[dict[str, np.ndarray]], cfg: ModelConfig) -> Any:
    """Checked requests -> one ``grc.model.gr.Batch`` of all their users (jagged, in order)."""
    import torch

    from grc.model.gr import Batch

    parts = [rq.request_batch(r, cfg) for r in requests]

    def offsets(name: str) -> torch.Tensor:
        sizes = torch.cat([getattr(p, name)[1:] - getattr(p, name)[:-1] for p in parts])
        return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])

    return Batch(
        profile=torch.cat([p.profile for p in parts]),
        history={t: torch.cat([p.history[t] for p in parts]) for t in cfg.history},
        history_time=torch.cat([p.history_time for p in parts]),
        history_offsets=offsets("history_offsets"),
        candidates={t: torch.cat([p.candidates[t] for p in parts]) for t in cfg.candidate},
        candidate_offsets=offsets("candidate_offsets"),
        cross=torch.cat([p.cross for p in parts]),
        request_time=torch.cat([p.request_time for p in parts]),
    )


def project(requests: list[dict[str, np.ndarray]], projector: Any, tables: Any, cfg: ModelConfig,
            pad_to: int | None = None) -> list[dict[str, Any]]:
    """Checked requests -> per request the dense model's inputs (one projector call for all)."""
    import torch

    with torch.no_grad():
        tok = projector(merge(requests, cfg), tables)
    tokens, stamps = tok.tokens.to(torch.float32).numpy(), tok.timestamps.numpy()
    offsets = tok.offsets.tolist()
    outs, user = [], 0
    for r in requests:
        b = r[rq.REQUEST_TIME].shape[0]
        start, end = offsets[user], offsets[user + b]
        length = (end - start) // b
        c = r[rq.candidate_input(cfg.candidate[0])].shape[1]
        t = tokens[start:end].reshape(b, length, -1)
        s = stamps[start:end].reshape(b, length)
        if pad_to is not None:
            t = np.concatenate([t, np.zeros((b, pad_to - length, t.shape[2]), np.float32)], 1)
            s = np.concatenate([s, np.zeros((b, pad_to - length), np.int64)], 1)
        outs.append({"tokens": np.ascontiguousarray(t, np.float32), "timestamps": np.ascontiguousarray(s, np.int64),
                     "lengths": np.full((b, 1), length, np.int64), "num_candidates": np.full((b, 1), c, np.int64)})
        user += b
    return outs


def load_projector(cfg: ModelConfig, weights_dir: Path) -> Any:
    """The token projector with its weights, reading only its own tensors from the shards."""
    import torch

    from grc.model.gr import TokenProjector
    from grc.safetensors_io import memmap_tensor, read_header, to_float32
    from grc.weights import read_manifest

    manifest = read_manifest(weights_dir)
    projector = TokenProjector(cfg)
    state, headers = {}, {}
    for name in projector.state_dict():
        key = f"projector.{name}"
        shard = weights_dir / manifest["tensors"][key]["shard"]
        if shard not in headers:
            headers[shard] = read_header(shard)
        header, start = headers[shard]
        info = header[key]
        state[name] = to_float32(memmap_tensor(shard, info, start), info["dtype"]).reshape(info["shape"]).clone()
    projector.load_state_dict(state)
    return projector.eval().to(torch.float32)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from grc.weights import open_tables

        torch.set_num_threads(1)  # one core per stub; Triton scales with instances
        params = io.parameters(args)
        self.name = args["model_name"]
        self.cfg = ModelConfig.model_validate_json(params["grc_model"])
        self.truncate = params.get("truncate_history", "true") == "true"
        self.pad_to = int(params.get("pad_to", "0")) or None
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        self.projector = load_projector(self.cfg, weights)
        self.tables = open_tables(self.cfg, weights)
        self.names = [s.name for s in rq.request_inputs(self.cfg)]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, parse({n: io.read(request, n) for n in self.names}, self.cfg, self.truncate)))
            except RequestError as exc:
                responses[i] = io.error_response(f"{self.name}: bad request: {exc}")
        if good:
            try:
                outs = project([r for _, r in good], self.projector, self.tables, self.cfg, self.pad_to)
            except Exception as exc:
                for i, _ in good:
                    responses[i] = io.error_response(f"{self.name}: {type(exc).__name__}: {exc}", False)
            else:
                for (i, _), out in zip(good, outs, strict=True):
                    responses[i] = io.response(out)
        return responses
