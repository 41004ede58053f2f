"""What the aoti stage adds for quality: the fp8 package's calibration, and the ranking gates of
every package (``verify.ranking``) against the fp32 PyTorch model.

The aoti stage reads the dense model only (no tables), so both sets of users are the package's
own kind of input: random N(0, 1) tokens (``grc.aoti.inputs.random_inputs``), calibration users
from ``engine.calibration.seed`` and held-out users from ``verify.ranking.seed`` (the spec
refuses the two being equal). Every fp8 GEMM's input comes out of a norm (uvqk after the group
norm, out after the norm-gate, the heads after the final norm), so its range hardly depends on the
tokens' scale. The ranking does: N(0, 1) tokens make candidates that differ more than the
projector's tokens do (hstu-tiny's fp8 model: Kendall tau 0.96 on these users, 0.78-0.82 on
verify's), so these gates are the kinder test; verify's gates on the int8 / fp8 engine graphs use
the real tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from grc.aoti.build import Checks
from grc.aoti.inputs import JaggedInputs, random_inputs
from grc.engine.quantize import feeds_digest
from grc.errors import StageError
from grc.model.fp8 import E4M3_MAX, KINDS, PACKAGE_GEMMS, calibrate, scales_of, to_fp8
from grc.model.gr import GRDense
from grc.spec.schema import Spec
from grc.verify.ranking import Gates, RankFigure, candidate_scores, format_rank_figures, rank_figures, user_shape


def users(spec: Spec, seed: int, count: int, history: int, candidates: int | None) -> JaggedInputs:
    h, c = user_shape(spec.model, history, candidates)
    return random_inputs(spec.model, count, h, c, torch.Generator().manual_seed(seed), ragged=False)


def fp8_package_model(
    dense: GRDense, spec: Spec, gemms: tuple[str, ...] = PACKAGE_GEMMS
) -> tuple[GRDense, dict[str, Any]]:
    """The fp8 model to compile (scales calibrated on engine.calibration's users) and its record.
    ``gemms``: which GEMM kinds go fp8 (grc.model.fp8.KINDS; the package: PACKAGE_GEMMS)."""
    cal = spec.engine.calibration
    batch = users(spec, cal.seed, cal.users, cal.history, cal.candidates)
    amax = calibrate(dense, [batch.args()])
    model = to_fp8(dense, amax, gemms=gemms)
    names = {"uvqk": "HSTU uvqk projections", "out": "HSTU output projections", "heads": "the heads' first GEMM"}
    digest = feeds_digest(
        {k: v.numpy() for k, v in zip(("tokens", "offsets", "num_candidates", "timestamps"), batch.args(), strict=True)}
    )
    record = {
        "precision": "fp8",
        "fp8_gemms": list(gemms),
        "gemms": ", ".join(names[k] for k in KINDS if k in gemms) + ": torch._scaled_mm, float8 e4m3 "
        f"(saturating at ±{E4M3_MAX:g}), row-wise scales, fast accumulation, bfloat16 out; "
        + ", ".join(names[k] for k in KINDS if k not in gemms)
        + (", " if set(KINDS) - set(gemms) else "")
        + "attention, norms and the rest in bfloat16 (grc.model.fp8.PACKAGE_GEMMS says why)",
        "weight_scales": "per output channel: amax / 448",
        "activation_scales": "per tensor: the power of two >= calibrated amax / 448, stored in the package",
        "calibration": {
            "seed": cal.seed,
            "users": batch.users,
            "tokens": int(batch.offsets[-1]),
            "inputs": "random N(0, 1) tokens (the aoti stage reads no tables)",
            "digest": digest,
        },
        "scales": scales_of(model),
    }
    return model, record


Figures = Callable[[Any, torch.device, torch.dtype], list[RankFigure]]


def held_out_reference(dense: GRDense, spec: Spec) -> tuple[JaggedInputs, np.ndarray]:
    """verify.ranking's held-out users and ``dense``'s float32 scores of them on the CPU: computed once
    per build and shared by every target's check (mtgr-small: about a minute of CPU)."""
    gates = spec.verify.ranking
    held_out = users(spec, gates.seed, gates.users, gates.history, gates.candidates)
    with torch.no_grad():
        expected = copy.deepcopy(dense).float().eval().forward_jagged(*held_out.args()).numpy()
    return held_out, expected


def ranking_figures(
    dense: GRDense,
    spec: Spec,
    backend: str,
    precision: str,
    reference: tuple[JaggedInputs, np.ndarray] | None = None,
) -> Figures:
    """A function of a package runner: its ranking of held-out users vs ``dense`` in float32 (CPU).
    ``reference``: ``held_out_reference(dense, spec)`` when the caller already has it."""
    gates = spec.verify.ranking
    held_out, expected = reference or held_out_reference(dense, spec)
    limits = Gates(gates.top_k, gates.min_top_k_overlap, gates.min_kendall_tau, gates.max_mean_abs, gates.max_abs)
    offsets = np.concatenate([[0], np.cumsum(held_out.num_candidates.numpy())])

    def figures(runner: Any, device: torch.device, dtype: torch.dtype) -> list[RankFigure]:
        with torch.no_grad():
            actual = runner(*held_out.to(device, dtype).args())
        scores = actual.float().cpu().numpy().astype(np.float64)
        return rank_figures(
            backend,
            precision,
            list(spec.model.tasks),
            candidate_scores(scores, held_out.offsets, held_out.num_candidates),
            candidate_scores(expected.astype(np.float64), held_out.offsets, held_out.num_candidates),
            offsets,
            limits,
        )

    return figures


UNGATED = (
    "a 16-bit package that quantizes nothing: its ranking is recorded, not gated. On seeded random weights the "
    "held-out candidates' scores lie within ~1e-3 of each other, below bfloat16's rounding of the scores, so any "
    "16-bit run reorders them (mtgr-small, eager bfloat16 vs float32: Kendall tau 0.05-0.58, max |Δscore| 2e-3); "
    "the parity tolerance (engine.aoti.parity) is this package's gate"
)


def ranking_check(
    dense: GRDense,
    spec: Spec,
    backend: str,
    precision: str,
    gate: bool = True,
    reference: tuple[JaggedInputs, np.ndarray] | None = None,
) -> Checks:
    """``ranking_figures`` as a package check: fails past the gates (with the table), else the record.
    ``gate=False`` (16-bit packages that quantize nothing, see UNGATED): the figures are recorded only."""
    gates = spec.verify.ranking
    figures_of = ranking_figures(dense, spec, backend, precision, reference)

    def check(runner: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        figures = figures_of(runner, device, dtype)
        table = format_rank_figures(figures)
        if gate and not all(f.ok for f in figures):
            raise StageError(f"{backend}: ranking gates (verify.ranking) failed against the fp32 model:\n{table}")
        return {
            "ranking": {
                "reference": "GRDense.forward_jagged, PyTorch float32 on CPU, held-out users "
                f"(verify.ranking.seed {gates.seed})",
                "gated": gate,
                **({} if gate else {"why_not_gated": UNGATED}),
                "gates": gates.model_dump(),
                "figures": [f.as_dict() for f in figures],
            }
        }

    return check
