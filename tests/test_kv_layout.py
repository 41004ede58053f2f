"""An entry's packed K/V rows (grc/model/kv_cache.KVLayout): the graphed score step writes the new rows' K/V
through the per-layer views into the packed key buffers and copies a grown entry out as one run of rows, so the
views must alias the rows exactly, for every layer, with K and V of different widths."""

from __future__ import annotations

import torch

from grc.model.kv_cache import KVLayout, UserKV


def test_split_views_alias_the_packed_rows_and_pack_inverts_split() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    layout = KVLayout(layers=3, heads=2, head_qk=5, head_v=7)
    keys = [torch.randn(11, 2, 5, generator=gen) for _ in range(3)]
    values = [torch.randn(11, 2, 7, generator=gen) for _ in range(3)]
    rows = layout.pack(keys, values)
    assert rows.shape == (11, layout.width) == (11, 3 * 2 * (5 + 7))
    got_k, got_v = layout.split(rows)
    for a, b in zip((*got_k, *got_v), (*keys, *values), strict=True):
        assert torch.equal(a, b)
    # a write through a view (the step's index_copy_ at the new rows' slots) lands in the rows, and only there
    new = torch.randn(2, 2, 7, generator=gen)
    before = rows.clone()
    got_v[2].index_copy_(0, torch.tensor([4, 9]), new)
    assert torch.equal(layout.split(rows)[1][2][[4, 9]], new)
    changed = (rows != before).any(1).nonzero().view(-1).tolist()
    assert changed == [4, 9]
    assert torch.equal(layout.split(rows)[0][2], keys[2])  # the same layer's K untouched


def test_an_entry_extended_keeps_its_rows_and_restamps_its_profile() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    keys = [torch.randn(4, 1, 3, generator=gen) for _ in range(2)]
    values = [torch.randn(4, 1, 3, generator=gen) for _ in range(2)]
    kv = UserKV.from_layers(keys, values, torch.tensor([100, 100, 40, 60]), profile=2)
    more = kv.layout.pack(
        [torch.randn(2, 1, 3, generator=gen) for _ in range(2)], [torch.randn(2, 1, 3, generator=gen) for _ in range(2)]
    )
    grown = kv.extended(more, torch.tensor([150, 170]), now=200)
    assert grown.length == 6 and grown.timestamps.tolist() == [200, 200, 40, 60, 150, 170]
    assert torch.equal(grown.rows[:4], kv.rows) and torch.equal(grown.rows[4:], more)
    assert kv.timestamps.tolist() == [100, 100, 40, 60]  # immutable: the old entry as it was
    assert torch.equal(grown.keys[1][:4], keys[1])
    assert grown.nbytes == grown.rows.numel() * grown.rows.element_size() + 6 * 8
