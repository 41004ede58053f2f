"""When the python models' custom metrics are sent (grc/serving/triton/models/metrics.py): the decision is
grc's, so it is tested here with a recorder in place of the stub's MetricFamily (the real server's export of
the same metrics is tested in test_fused_real.py and test_triton_serving_real.py)."""

from __future__ import annotations

import sys
import time
import types
from typing import Any, ClassVar

import pytest

from grc.serving.triton.models import metrics as m

DECLARED = {
    "hits": ("grc_test_hits_total", "hits", False),
    "misses": ("grc_test_misses_total", "misses", False),
    "bytes": ("grc_test_bytes", "bytes", True),
}


class Recorder:
    """Stands in for triton_python_backend_utils.MetricFamily: records what would be sent to the server."""

    COUNTER, GAUGE = "counter", "gauge"
    sent: ClassVar[list[tuple[str, str, float]]] = []

    def __init__(self, name: str, description: str, kind: str):
        self.name = name

    def Metric(self, labels: dict[str, str]) -> Any:  # the backend's spelling
        family = self

        class Metric:
            def increment(self, value: float) -> None:
                Recorder.sent.append((family.name, "increment", value))

            def set(self, value: float) -> None:
                Recorder.sent.append((family.name, "set", value))

        return Metric()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, float]]:
    module = types.ModuleType("triton_python_backend_utils")
    module.MetricFamily = Recorder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    Recorder.sent = []
    return Recorder.sent


def test_unthrottled_metrics_send_every_change(sent: list[tuple[str, str, float]]) -> None:
    metrics = m.Metrics("model", DECLARED)
    metrics.update({"hits": 2, "misses": 0, "bytes": 10})
    metrics.update({"hits": 3, "misses": 0, "bytes": 12})
    assert sent == [
        ("grc_test_hits_total", "increment", 2),
        ("grc_test_bytes", "set", 10),
        ("grc_test_hits_total", "increment", 1),
        ("grc_test_bytes", "set", 12),
    ]


def test_a_gauge_that_did_not_move_is_not_sent(sent: list[tuple[str, str, float]]) -> None:
    """One message per change: a gauge that stays (the history cache's arena size, set at load) costs none."""
    metrics = m.Metrics("model", DECLARED)
    for _ in range(3):
        metrics.update({"hits": 0, "misses": 0, "bytes": 7})
    metrics.update({"hits": 0, "misses": 0, "bytes": 0})
    assert sent == [("grc_test_bytes", "set", 7), ("grc_test_bytes", "set", 0)]


def test_throttled_counters_wait_then_catch_up_with_the_totals(
    sent: list[tuple[str, str, float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    metrics = m.Metrics("model", DECLARED, every_s=0.25)
    metrics.update({"hits": 1, "misses": 0, "bytes": 5})  # the first update is sent
    assert [s[2] for s in sent if s[0] == "grc_test_hits_total"] == [1]
    for hits in range(2, 6):  # within 0.25 s: nothing sent
        now[0] += 0.05
        metrics.update({"hits": hits, "misses": 0, "bytes": 5})
    assert [s[2] for s in sent if s[0] == "grc_test_hits_total"] == [1]
    now[0] += 0.1  # 0.3 s after the first: the waiting total goes out in one increment
    metrics.update({"hits": 6, "misses": 0, "bytes": 5})
    assert [s[2] for s in sent if s[0] == "grc_test_hits_total"] == [1, 5]


def test_a_change_of_an_urgent_key_is_sent_at_once_with_the_waiting_totals(
    sent: list[tuple[str, str, float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    metrics = m.Metrics("model", DECLARED, every_s=0.25, urgent=frozenset({"misses"}))
    metrics.update({"hits": 1, "misses": 0, "bytes": 5})
    now[0] += 0.01
    metrics.update({"hits": 2, "misses": 0, "bytes": 5})  # waits
    now[0] += 0.01
    metrics.update({"hits": 3, "misses": 1, "bytes": 5})  # a miss: sent now, hits catch up
    counters = [(s[0], s[2]) for s in sent if s[1] == "increment"]
    assert counters == [("grc_test_hits_total", 1), ("grc_test_hits_total", 2), ("grc_test_misses_total", 1)]


def test_trailing_metrics_send_what_waited_once_the_interval_is_over(sent: list[tuple[str, str, float]]) -> None:
    """With ``trailing`` (the history cache's counters), totals held back go out from the model's own thread when the
    interval ends, with no update after them: the endpoint is exact once the model is idle that long. Values given
    as a function are read when sent, not at every update."""
    reads: list[int] = []
    hits = [0]

    def read() -> dict[str, float]:
        reads.append(hits[0])
        return {"hits": hits[0], "misses": 0, "bytes": 5}

    metrics = m.Metrics("model", DECLARED, every_s=0.2, trailing=True)
    started = time.monotonic()
    for total in range(1, 6):  # the first sent at once, the other four held within the interval
        hits[0] = total
        metrics.update(read)
    assert time.monotonic() - started < 0.2, "the updates took longer than the interval: nothing was held"
    assert [s[2] for s in sent if s[0] == "grc_test_hits_total"] == [1]
    assert reads == [1]  # a held update read nothing
    deadline = time.monotonic() + 5.0
    while len(sent) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [s[2] for s in sent if s[0] == "grc_test_hits_total"] == [1, 4]  # the waiting total, in one increment
    assert time.monotonic() - started >= 0.2
    assert reads == [1, 5]
    hits[0] = 7
    metrics.update(read)
    metrics.flush()  # the model unloaded: what waits goes now
    assert [s[2] for s in sent if s[0] == "grc_test_hits_total"] == [1, 4, 2]


def test_every_capture_figure_is_exported() -> None:
    """The fused model declares its metrics by hand; each capture figure the Ranker reports (GraphStats'
    capture_* fields, as graph_<name>) must have one, or a new figure would be measured and never exported."""
    from grc.serving.ranker.dense import CAPTURE_FIGURES
    from grc.serving.triton.models.fused import METRICS

    assert CAPTURE_FIGURES, "GraphStats has no capture_* figures: the check would pass vacuously"
    missing = {f"graph_{name}" for name in CAPTURE_FIGURES} - set(METRICS)
    assert not missing, f"fused.METRICS lacks {sorted(missing)}"
