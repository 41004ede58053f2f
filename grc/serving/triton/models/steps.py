"""One execute() of any python step of the bundle, written once: one bad request fails alone.

Triton hands a python model a list of requests (the dynamic batcher's merge) and expects one response per
request; an exception out of execute() fails every request in the list, other clients' included. So here:
each request is read and checked on its own (a RequestError becomes HTTP 400 / INVALID_ARGUMENT naming the
problem), the good ones run as ONE batch, and when that batch raises, each runs alone so that only the one
that fails gets the error (HTTP 500 / INTERNAL). Nothing escapes execute(), and no message carries a path of
the server (the full error goes to the server log).
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from grc.serving.common.validate import RequestError
from grc.serving.ranker.phases import PhaseClock
from grc.serving.triton.models import tensor_io as io

Checked = TypeVar("Checked")
_PATH = re.compile(r"(?:/[\w.@+-]+){2,}/?")


def client_message(exc: BaseException) -> str:
    """An unexpected error as a client may see it: its type and text, server paths replaced."""
    return _PATH.sub("<path>", f"{type(exc).__name__}: {exc}")


def execute(
    requests: list[Any],
    name: str,
    inputs: tuple[str, ...] | list[str],
    check: Callable[[dict[str, np.ndarray | None]], Checked],
    run: Callable[[list[Checked]], list[dict[str, np.ndarray]]],
    clock: PhaseClock | None = None,
) -> list[Any]:
    """Responses for ``requests``: ``check`` each one's inputs (raise RequestError to refuse it), then
    ``run`` the checked ones as one batch (outputs per request, in order). ``clock``: the host time of
    reading, checking and responding laps into it (``run`` laps its own phases into the same clock)."""
    clock = clock or PhaseClock()
    clock.start()
    responses: list[Any] = [None] * len(requests)
    good: list[tuple[int, Checked]] = []
    for i, request in enumerate(requests):
        try:
            raw = io.read_all(request, inputs)
            clock.lap("read")
            good.append((i, check(raw)))
        except RequestError as exc:
            responses[i] = io.error_response(f"{name}: bad request: {exc}")
        except Exception as exc:  # a bug of ours, not the client's: 500, and the log has the traceback
            responses[i] = _internal(name, exc)
        clock.lap("check")
    outs = _run_isolated([c for _, c in good], run)
    clock.start()  # ``run`` lapped its own phases (the Ranker) or none: responding starts now
    for (i, _), out in zip(good, outs, strict=True):
        responses[i] = _internal(name, out) if isinstance(out, BaseException) else io.response(out)
    clock.lap("respond")
    return responses


def _run_isolated(
    items: list[Checked], run: Callable[[list[Checked]], list[dict[str, np.ndarray]]]
) -> list[dict[str, np.ndarray] | BaseException]:
    if not items:
        return []
    try:
        return list(run(items))
    except Exception as exc:
        if len(items) == 1:
            return [exc]
    results: list[dict[str, np.ndarray] | BaseException] = []
    for item in items:  # the batch failed: find who made it fail, serve the others
        try:
            results.append(run([item])[0])
        except Exception as exc:
            results.append(exc)
    return results


def _internal(name: str, exc: BaseException) -> Any:
    io.log(f"{name}: {''.join(traceback.format_exception(exc))}")
    return io.error_response(f"{name}: internal error: {client_message(exc)}", invalid_argument=False)
