"""Where an execute() of the fused model spends its host time, phase by phase (running totals in seconds).

A lap clock: ``start()`` when a phase sequence begins, ``lap(name)`` when a phase ends (the time since the
previous lap goes to ``name``). Wall time on the host: on a GPU the device work is queued asynchronously, so
``dense`` is the time to launch it and ``fetch`` the wait for the device plus the one device->host copy.
The fused model exports these as Triton custom metrics (models/fused.py); bench/serve.py's in_process rows
report the same names per batch, so a served row and its in-process ceiling compare phase by phase.
"""

from __future__ import annotations

import time

# in request-path order; the python model's own (read, check, respond, metrics) around the Ranker's
PHASES: dict[str, str] = {
    "read": "reading each request's input tensors (python backend -> numpy)",
    "check": "checking each request (validate.RequestParser)",
    "layout": "the batch's token layout on the host (numpy; with the history cache, the users' store lookups too)",
    "upload": "the layout's one host->device copy: staged in pinned memory, queued (on a CPU: views only)",
    "embed": "embedding lookups and the token projector (queued on a GPU)",
    "dense": "the dense step (launched, CUDA graph replay; on a CPU the whole step)",
    "fetch": "waiting for the device and the one device->host copy of the scores",
    "rank": "ranking and top k, per request (numpy)",
    "respond": "each request's response tensors (numpy -> python backend)",
    "metrics": "updating the model's Triton custom metrics (a message to the server per changed counter)",
}


class PhaseClock:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now
