"""The export entry point's per-token positions (grc.aoti.model.jagged_positions): each token's user found by one
binary search over the whole ``offsets`` (Inductor compiles it into one pointwise kernel on a GPU), not by int64
marks added with index_add and prefix-summed (aten's sort-based index_put fallback: ~12 device launches of the
mtgr-small latency call, e2e-h200-s22-mtgr-small.json). Exact against grc.model.jagged's eager formulas for every
layout, empty users included; the exported program holds the search over the offsets input itself (never a view
of it: Inductor's CUDA bucketize once read offsets[1:] from its base) and none of the marks' ops."""

from __future__ import annotations

import torch

from grc.aoti.inputs import seeded_dense
from grc.aoti.model import export_program, jagged_positions
from grc.model.jagged import lengths_of, local_index
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS


def _eager(offsets: torch.Tensor, num_candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GRDense.forward_jagged's idx and n_ctx (data-dependent sizes: eager only)."""
    lengths = lengths_of(offsets)
    return local_index(offsets), torch.repeat_interleave(lengths - num_candidates, lengths)


def test_positions_match_the_eager_formulas_for_every_layout() -> None:
    gen = torch.Generator().manual_seed(21)
    layouts = [[5], [1], [0, 4], [4, 0], [0, 0, 3, 0, 0], [2, 0, 0, 7, 1, 0], [1] * 9]
    sizes = torch.randint(1, 40, (50,), generator=gen).tolist()
    layouts += [torch.randint(0, 6, (n,), generator=gen).tolist() for n in sizes]
    for lengths in layouts:
        if sum(lengths) == 0:
            continue  # the export's token dim is at least 2
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(lengths).cumsum(0)
        cands = torch.tensor([int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lengths], dtype=torch.int64)
        idx, n_ctx = jagged_positions(offsets, cands, int(offsets[-1]))
        want_idx, want_ctx = _eager(offsets, cands)
        assert idx.dtype == torch.int64 and n_ctx.dtype == torch.int64
        assert torch.equal(idx, want_idx) and torch.equal(n_ctx, want_ctx), lengths


def test_the_export_searches_the_offsets_input_and_adds_no_marks() -> None:
    cfg = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec.model
    program = export_program(seeded_dense(cfg), torch.device("cpu"), torch.float32)
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    targets = {str(n.target) for n in nodes}
    assert not targets & {"aten.index_add.default", "aten.index_put.default", "aten.cumsum.default"}, targets
    assert not {t for t in targets if "sort" in t} - {"aten.searchsorted.Tensor"}, targets
    (search,) = [n for n in nodes if str(n.target) == "aten.searchsorted.Tensor"]
    boundaries = search.args[0]
    assert boundaries.op == "placeholder" and boundaries.name == "offsets", boundaries  # the input, not a view of it
    assert search.kwargs.get("right") is True


def test_the_gathers_stay_in_bounds_for_any_offsets() -> None:
    """Inductor autotunes a GPU package's kernels at compile time on made-up buffers (zeros for integer ones: offsets
    and the search's output alike); a gather past offsets' end there is a device-side assert that fails the build
    (H200, session 22). Clamped users keep every gather in bounds for zeros, unsorted or short offsets, and change
    nothing for valid ones (the test above)."""
    gen = torch.Generator().manual_seed(22)
    for users, total in ((1, 2), (3, 40), (16, 512)):
        for offsets in (
            torch.zeros(users + 1, dtype=torch.int64),
            torch.randint(-50, 600, (users + 1,), generator=gen),
            torch.arange(users + 1, dtype=torch.int64),  # ends before the last token
        ):
            idx, n_ctx = jagged_positions(offsets, torch.zeros(users, dtype=torch.int64), total)
            assert idx.shape == n_ctx.shape == (total,)
