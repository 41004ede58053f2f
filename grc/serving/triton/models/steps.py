"""One execute() of any python step of the bundle, written once: one bad request fails alone.

Triton hands a python model a list of requests (the dynamic batcher's merge) and expects one response per
request; an exception out of execute() fails every request in the list, other clients' included. So here:
each request is read and checked on its own, or all together by a step that checks them at once (fused:
Ranker.check_all), one verdict per request either way (a RequestError becomes HTTP 400 / INVALID_ARGUMENT
naming the problem); the good ones run as ONE batch, and when that batch raises, each runs alone so that only the one
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
    check_all: Callable[[list[dict[str, np.ndarray | None]]], list[Checked | RequestError]] | None = None,
) -> list[Any]:
    """Responses for ``requests``: ``check`` each one's inputs (raise RequestError to refuse it), then
    ``run`` the checked ones as one batch (outputs per request, in order). ``clock``: the host time of
    reading, checking and responding laps into it (``run`` laps its own phases into the same clock).
    ``check_all``: checks all the requests at once (per request what ``check`` returns, or the RequestError it
    raises); where it raises, each request is checked alone with ``check``."""
    clock = clock or PhaseClock()
    clock.start()
    responses: list[Any] = [None] * len(requests)
    raws: list[tuple[int, dict[str, np.ndarray | None]]] = []
    for i, request in enumerate(requests):
        try:
            raws.append((i, io.read_all(request, inputs)))
        except Exception as exc:
            responses[i] = _refused(name, exc)
    clock.lap("read")
    good: list[tuple[int, Checked]] = []
    checks = _check_isolated(name, [raw for _, raw in raws], check, check_all)
    for (i, _), checked in zip(raws, checks, strict=True):
        if isinstance(checked, BaseException):
            responses[i] = _refused(name, checked)
        else:
            good.append((i, checked))
    clock.lap("check")
    outs = _run_isolated([c for _, c in good], run)
    clock.start()  # ``run`` lapped its own phases (the Ranker) or none: responding starts now
    for (i, _), out in zip(good, outs, strict=True):
        responses[i] = _internal(name, out) if isinstance(out, BaseException) else io.response(out)
    clock.lap("respond")
    return responses


def _check_isolated(
    name: str,
    raws: list[dict[str, np.ndarray | None]],
    check: Callable[[dict[str, np.ndarray | None]], Checked],
    check_all: Callable[[list[dict[str, np.ndarray | None]]], list[Checked | RequestError]] | None,
) -> list[Checked | BaseException]:
    if check_all is not None:
        try:
            return list(check_all(raws))
        except Exception as exc:  # a bug of ours: each request alone below, so that only the one it trips fails
            trace = "".join(traceback.format_exception(exc))
            io.log(f"{name}: checking the requests together failed, so each is checked alone: {trace}")
    results: list[Checked | BaseException] = []
    for raw in raws:
        try:
            results.append(check(raw))
        except Exception as exc:
            results.append(exc)
    return results


def _refused(name: str, exc: BaseException) -> Any:
    """A RequestError as the client's error (400), anything else as ours (500, the traceback logged)."""
    if isinstance(exc, RequestError):
        return io.error_response(f"{name}: bad request: {exc}")
    return _internal(name, exc)


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
