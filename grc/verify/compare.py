"""One comparator for every backend (onnxruntime, engines, servers) against the PyTorch oracle.

max_abs = max |a - b|;  max_rel = max |a - b| / max |b|  (relative to the output's scale, so a
near-zero reference element does not blow the figure up). NaN or shape mismatch always fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from grc.spec.schema import Tolerance


@dataclass(frozen=True)
class Figure:
    backend: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    tol_abs: float
    tol_rel: float
    ok: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def compare(backend: str, case: str, output: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> Figure:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or not np.isfinite(actual).all():
        return Figure(backend, case, output, float("inf"), float("inf"), tol.max_abs, tol.max_rel, False)
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    return Figure(backend, case, output, err, rel, tol.max_abs, tol.max_rel, err <= tol.max_abs and rel <= tol.max_rel)


def format_figures(figures: list[Figure]) -> str:
    lines = [f"{'backend':<10} {'case':<26} {'output':<8} {'max_abs':>10} {'max_rel':>10}  tolerance (abs/rel)"]
    for f in figures:
        mark = "ok" if f.ok else "FAIL"
        lines.append(
            f"{f.backend:<10} {f.case:<26} {f.output:<8} {f.max_abs:>10.3e} {f.max_rel:>10.3e}  "
            f"{f.tol_abs:.1e}/{f.tol_rel:.1e} {mark}"
        )
    return "\n".join(lines)
