"""Quantized embedding tables: the stated error bounds on lookup, the safetensors round trip, the
bytes grc show promises, import from a float checkpoint, the fp32 reference verify compares to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from grc.model.params import init_tensor, table_bytes, table_params
from grc.model.tables import dequantize_rows, quantize_rows
from grc.spec.loader import load_spec
from grc.weights import import_checkpoint, open_tables, write_init
from grc.weights.reference import reference_weights
from tests.conftest import TEST_SPECS

SPEC = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec
QUANTIZED = ["int8", "fp8_e4m3"]


def _bound(kind: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The per-element error grc/model/tables.py states (plus float32 rounding of the arithmetic)."""
    s = scale.to(torch.float32)[:, None]
    bound = s / 2 if kind == "int8" else torch.maximum(x.abs() / 16, s / 1024)
    return bound * (1 + 1e-5) + 1e-12


def _write(folder: Path, dtype: str) -> dict:
    folder.mkdir(parents=True)
    init = SPEC.weights.source.model_copy(update={"embedding_dtype": dtype})  # type: ignore[union-attr]
    manifest = write_init(SPEC.model, SPEC.weights, init, folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))  # the graph writes it in a build
    return manifest


@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantize_rows_within_the_stated_bound(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    # rows of very different scales, a constant row and an all-zero row: each row gets its own factors
    x = torch.randn(64, 40, generator=gen) * torch.logspace(-4, 1, 64)[:, None]
    x[3], x[4] = 0.25, 0.0
    q = quantize_rows(x, kind, "t")
    factors = {k: v for k, v in q.items() if k != "codes"}
    y = dequantize_rows(q["codes"], factors, kind)
    assert ((y - x).abs() <= _bound(kind, x, q["scale"])).all()
    assert torch.equal(y[4], x[4])  # zero stays zero
    assert q["codes"].dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn)
    assert all(f.dtype == torch.float16 for f in factors.values())


def test_values_past_an_fp16_scale_fail_naming_the_row() -> None:
    x = torch.zeros(3, 4)
    x[2, 1] = 1e9  # / 448 is past fp16's 65,504
    with pytest.raises(ValueError, match=r"tables.item.00001 row 2: values too large for an fp16 scale"):
        quantize_rows(x, "fp8_e4m3", "tables.item.00001")


@pytest.mark.parametrize("kind", QUANTIZED)
def test_lookup_of_stored_quantized_rows_vs_float_rows(tmp_path: Path, kind: str) -> None:
    manifest = _write(tmp_path / "w", kind)
    tables = open_tables(SPEC.model, tmp_path / "w")
    _, ref_tables = reference_weights(SPEC.model, tmp_path / "w")
    for table, tcfg in SPEC.model.tables.items():
        ids = torch.arange(tcfg.vocab_size)
        got, want = tables.lookup(table, ids), ref_tables.lookup(table, ids)
        scales = torch.cat(
            [
                load_file(str(tmp_path / "w" / manifest["tensors"][f"{p.name}.scale"]["shard"]))[f"{p.name}.scale"]
                for p in table_params(SPEC.model, SPEC.weights.table_block_rows)
                if p.table == table
            ]
        )
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert ((got - want).abs() <= _bound(kind, want, scales)).all(), table
        assert not torch.equal(got, want)  # it is quantized: the check above is not vacuous
    # the reference is the seeded init drawn again in float32, exactly
    p = table_params(SPEC.model, SPEC.weights.table_block_rows)[0]
    block = init_tensor(p, manifest["source"]["init"]["seed"], 0.02, torch.float32)
    torch.testing.assert_close(ref_tables.lookup(str(p.table), torch.arange(p.shape[0])), block, rtol=0, atol=0)
    assert manifest["table_dtype"] == kind


@pytest.mark.parametrize("kind", QUANTIZED)
def test_quantized_shards_round_trip_through_official_safetensors(tmp_path: Path, kind: str) -> None:
    manifest = _write(tmp_path / "w", kind)
    state: dict[str, torch.Tensor] = {}
    for f in sorted((tmp_path / "w").glob("*.safetensors")):
        state.update(load_file(str(f)))
    assert set(state) == set(manifest["tensors"])
    tables = open_tables(SPEC.model, tmp_path / "w")
    for p in table_params(SPEC.model, SPEC.weights.table_block_rows):
        factors = {k: state[f"{p.name}.{k}"] for k in ("scale", "offset") if f"{p.name}.{k}" in state}
        assert set(factors) == ({"scale", "offset"} if kind == "int8" else {"scale"})
        rows = torch.arange(p.shape[0]) + p.block * SPEC.weights.table_block_rows
        # our memory-mapped lookup == dequantizing what the official reader loads
        torch.testing.assert_close(
            tables.lookup(str(p.table), rows), dequantize_rows(state[p.name], factors, kind), rtol=0, atol=0
        )
    # parameters count the codes, not the factors; the bytes are what grc show prints
    assert manifest["parameters"]["embedding"] == sum(p.numel for p in table_params(SPEC.model, 256))
    want = sum(table_bytes(t.vocab_size, SPEC.model.table_dim(n), kind) for n, t in SPEC.model.tables.items())
    assert manifest["bytes"]["embedding"] == want


def test_int8_and_fp8_tables_are_about_half_of_bf16_at_width_128() -> None:
    bf16 = table_bytes(1000, 128, "bfloat16")
    assert table_bytes(1000, 128, "int8") <= 0.52 * bf16 and table_bytes(1000, 128, "fp8_e4m3") <= 0.52 * bf16


def test_changing_table_dtype_leaves_the_dense_view_byte_identical(tmp_path: Path) -> None:
    _write(tmp_path / "a", "bfloat16")
    _write(tmp_path / "b", "int8")
    assert (tmp_path / "a" / "dense.json").read_bytes() == (tmp_path / "b" / "dense.json").read_bytes()
    view = json.loads((tmp_path / "a" / "dense.json").read_text())["tensors"]
    assert (
        view and all(len(t["sha256"]) == 64 for t in view.values()) and not any(n.startswith("tables.") for n in view)
    )


def test_import_float_checkpoint_quantizes_and_keeps_it_as_reference(tmp_path: Path) -> None:
    _write(tmp_path / "src", "float32")
    state: dict[str, torch.Tensor] = {}
    for f in sorted((tmp_path / "src").glob("*.safetensors")):
        state.update(load_file(str(f)))
    whole = {k: v for k, v in state.items() if not k.startswith("tables.")}
    for table in SPEC.model.tables:
        blocks = sorted(k for k in state if k.startswith(f"tables.{table}."))
        whole[f"tables.{table}.weight"] = torch.cat([state[k] for k in blocks])
    save_file(whole, str(tmp_path / "ckpt.safetensors"))
    cfg = SPEC.weights.model_copy(
        update={"checkpoint": tmp_path / "ckpt.safetensors", "init": None, "embedding_dtype": "int8"}
    )
    (tmp_path / "dst").mkdir()
    manifest = import_checkpoint(SPEC.model, cfg, tmp_path / "dst", tmp_path)
    (tmp_path / "dst" / "manifest.json").write_text(json.dumps(manifest))
    assert manifest["table_dtype"] == "int8"
    assert {manifest["tensors"][p.name]["dtype"] for p in table_params(SPEC.model, 256)} == {"I8"}
    _, ref_tables = reference_weights(SPEC.model, tmp_path / "dst")
    tables = open_tables(SPEC.model, tmp_path / "dst")
    ids = torch.arange(SPEC.model.tables["item"].vocab_size)
    torch.testing.assert_close(ref_tables.lookup("item", ids), whole["tables.item.weight"], rtol=0, atol=0)
    err = (tables.lookup("item", ids) - whole["tables.item.weight"]).abs().max()
    assert 0 < err < 1e-3  # std 0.02 rows: a 255-step row range is ~5e-4 per step


def test_embedding_dtype_outside_an_import_is_refused_naming_the_init_field() -> None:
    from pydantic import ValidationError

    from grc.spec.schema import WeightsConfig

    with pytest.raises(ValidationError, match=r"with seeded init use weights\.init\.embedding_dtype"):
        WeightsConfig.model_validate({"embedding_dtype": "int8"})


def test_grc_show_prints_bytes_per_table_precision(capsys: pytest.CaptureFixture[str]) -> None:
    from grc.cli import main
    from grc.model.params import parameter_bytes, parameter_summary

    assert main(["show", str(TEST_SPECS / "mtgr-tiny.yaml")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "parameters" in line and "int8" in line)
    assert all(p in header for p in ("float32", "bfloat16", "int8", "fp8_e4m3"))
    rows = [r for r in parameter_summary(SPEC.model) if r[1] == "embedding"]
    per = parameter_bytes(SPEC.model, *rows)
    want = sum(table_bytes(t.vocab_size, SPEC.model.table_dim(n), "int8") for n, t in SPEC.model.tables.items())
    assert per["int8"] == want and 2 * per["bfloat16"] == per["float32"]
    total_line = next(line for line in out.splitlines() if "embedding total" in line)
    assert f"{want / 1024:.1f} KiB" in total_line


def test_build_budget_counts_quantized_table_bytes() -> None:
    from grc.build.budget import stage_bytes

    def weights_bytes(dtype: str) -> int:
        init = SPEC.weights.source.model_copy(update={"embedding_dtype": dtype})  # type: ignore[union-attr]
        spec = SPEC.model_copy(update={"weights": SPEC.weights.model_copy(update={"init": init})})
        return next(e.bytes for e in stage_bytes(spec) if e.stage == "weights")

    dense = weights_bytes("float32") - sum(
        table_bytes(t.vocab_size, SPEC.model.table_dim(n), "float32") for n, t in SPEC.model.tables.items()
    )
    for dtype in ("bfloat16", "int8", "fp8_e4m3"):
        tables = sum(table_bytes(t.vocab_size, SPEC.model.table_dim(n), dtype) for n, t in SPEC.model.tables.items())
        assert weights_bytes(dtype) == dense + tables
