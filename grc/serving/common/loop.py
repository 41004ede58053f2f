"""The closed-loop load generator both servers' load tests drive.

``concurrency`` threads each hold one connection and send requests back to back until ``requests`` were issued or
the time limit passed. A failed request is counted and reported (never hidden); its thread reconnects and goes on.
What a request is, and how it is sent, is the caller's ``connect``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Connection(Protocol):
    def send(self, index: int) -> Any:
        """Send request ``index``; returns its answer, raises on any failure."""

    def close(self) -> None: ...


@dataclass
class LoopResult:
    issued: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: dict[int, Any] = field(default_factory=dict)


def closed_loop(
    connect: Callable[[], Connection], requests: int, concurrency: int, time_limit_s: float, keep_answers: bool = False
) -> LoopResult:
    lock = threading.Lock()
    result = LoopResult(issued=0, seconds=0.0)
    deadline = time.monotonic() + time_limit_s

    def next_index() -> int | None:
        with lock:
            if result.issued >= requests or time.monotonic() > deadline:
                return None
            result.issued += 1
            return result.issued - 1

    def worker() -> None:
        connection = connect()
        try:
            while (index := next_index()) is not None:
                t0 = time.perf_counter()
                try:
                    answer = connection.send(index)
                except Exception as exc:  # counted, reported, never hidden
                    connection.close()
                    connection = connect()
                    with lock:
                        result.errors.append(f"request {index}: {type(exc).__name__}: {exc}")
                    continue
                elapsed_ms = (time.perf_counter() - t0) * 1000
                with lock:
                    result.latencies_ms.append(elapsed_ms)
                    if keep_answers:
                        result.answers[index] = answer
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit_s + 60)
    result.seconds = time.perf_counter() - started
    return result
