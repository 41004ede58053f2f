"""The history cache's router: the name clients call when ``history_cache.instances`` > 1.

Each user's entry lives in ONE store, so each user's requests must reach one instance. Triton's own
scheduler spreads requests over a model's instances as they free up, so the cache runs as N models of
one instance each (``<model_name>-cache-<k>``, each its own store), and this BLS model sends every user
to model ``shard_of(user_id, N)`` (grc/serving/common/history_cache.py): the same user, the same store, on
any router instance and after any restart. A request of several users is split by shard, the parts
run concurrently (async BLS) and the answers are put back in the request's order. A request without
``user_id`` caches nothing and goes whole to the shards in turn; a malformed ``user_id`` goes whole to
shard 0, which refuses it with the cached model's own message. A shard's error is passed on as it is.

Why not Triton's sequence batcher (which also pins a correlation id to an instance): it pins a
sequence only between its START and END flags and frees it after an idle timeout, so clients would
have to send the user as the correlation id with flags on every request, and a returning user could
land elsewhere; a hash of the id needs neither.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import traceback
from typing import Any

import numpy as np

from grc.serving.common.history_cache import shard_of
from grc.serving.triton.models import steps
from grc.serving.triton.models import tensor_io as io

USER_ID = "user_id"


def split_by_shard(users: np.ndarray | None, batch: int, shards: int, turn: int) -> dict[int, np.ndarray]:
    """shard -> the request's rows (users) it serves, in order. Without usable ids: every row to
    shard ``turn`` (no user: nothing to keep together; a malformed id: the shard refuses it)."""
    if users is None or users.shape != (batch, 1) or users.dtype != np.int64:
        return {turn: np.arange(batch)}
    owner = np.array([shard_of(int(u), shards) for u in users[:, 0]], np.int64)
    return {int(k): np.flatnonzero(owner == k) for k in np.unique(owner)}


class ShardError(Exception):
    """A shard answered with an error: passed on to the client with its message and kind."""

    def __init__(self, error: Any):
        super().__init__(error.message())
        self.error = error


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        params = io.parameters(args)
        self.name = args["model_name"]
        self.shards: list[str] = json.loads(params["shards"])
        self.inputs: list[str] = json.loads(params["inputs"])
        self.outputs: list[str] = json.loads(params["outputs"])
        self.turn = itertools.count()

    async def execute(self, requests: list[Any]) -> list[Any]:
        routed = [self._route(r) for r in requests]
        results = await asyncio.gather(*routed, return_exceptions=True)
        responses = []
        for result in results:
            if isinstance(result, ShardError):
                responses.append(io.pb().InferenceResponse(error=result.error))
            elif isinstance(result, BaseException):  # ours, not the client's: 500, the log has the traceback
                io.log(f"{self.name}: {''.join(traceback.format_exception(result))}")
                message = f"{self.name}: internal error: {steps.client_message(result)}"
                responses.append(io.error_response(message, invalid_argument=False))
            else:
                responses.append(io.response(result))
        return responses

    async def _route(self, request: Any) -> dict[str, np.ndarray]:
        arrays = {n: a.copy() for n, a in io.read_all(request, self.inputs).items() if a is not None}
        batch = next(a.shape[0] for n, a in arrays.items() if n != USER_ID)
        parts = split_by_shard(arrays.get(USER_ID), batch, len(self.shards), next(self.turn) % len(self.shards))
        if len(parts) == 1:
            ((shard, _),) = parts.items()
            return await self._ask(shard, arrays)
        answers = await asyncio.gather(
            *(self._ask(k, {n: a[rows] for n, a in arrays.items()}) for k, rows in parts.items())
        )
        merged = {}
        for name in self.outputs:
            first = answers[0][name]
            out = np.empty((batch, *first.shape[1:]), first.dtype)
            for rows, answer in zip(parts.values(), answers, strict=True):
                out[rows] = answer[name]
            merged[name] = out
        return merged

    async def _ask(self, shard: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = io.pb()
        request = pb.InferenceRequest(
            model_name=self.shards[shard],
            inputs=[io.tensor(n, a) for n, a in arrays.items()],
            requested_output_names=self.outputs,
        )
        response = await request.async_exec()
        if response.has_error():
            raise ShardError(response.error())
        return {n: np.from_dlpack(pb.get_output_tensor_by_name(response, n)).copy() for n in self.outputs}
