"""Weights: byte-identical for a seed, readable by the official safetensors, checkpoint import."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from grc.errors import StageError
from grc.spec.loader import load_spec
from grc.weights import import_checkpoint, load_model, write_init
from tests.conftest import TEST_SPECS

SPEC = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec


def _write(folder: Path, seed: int = 3, shard_mb: int = 1) -> dict:
    folder.mkdir(parents=True)
    cfg = SPEC.weights.model_copy(update={"shard_size_mb": shard_mb})
    init = SPEC.weights.source.model_copy(update={"seed": seed})  # type: ignore[union-attr]
    return write_init(SPEC.model, cfg, init, folder)


def _bytes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a, b, c = _write(tmp_path / "a"), _write(tmp_path / "b"), _write(tmp_path / "c", seed=4)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert a["shards"] == b["shards"]
    assert _bytes(tmp_path / "a") != _bytes(tmp_path / "c") and c["parameters"] == a["parameters"]


def test_shards_load_with_official_safetensors_and_match_manifest(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "w", shard_mb=1)
    files = sorted((tmp_path / "w").glob("*.safetensors"))
    assert len(files) == len(manifest["shards"]) >= 1
    loaded = {}
    for f in files:
        loaded.update(load_file(str(f)))
    assert set(loaded) == set(manifest["tensors"])
    for name, info in manifest["tensors"].items():
        assert list(loaded[name].shape) == info["shape"]
    total = sum(t.numel() for t in loaded.values())
    assert total == manifest["parameters"]["total"]
    for shard in manifest["shards"]:
        assert hashlib.sha256((tmp_path / "w" / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert all(t.abs().max() > 0 for t in loaded.values())  # every tensor initialised, none left zero


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _whole_tables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-join row blocks into one [vocab, dim] tensor per table, as another trainer would save them."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        if name.startswith("tables."):
            blocks.setdefault(name.split(".")[1], []).append((name, t))
        else:
            out[f"model.{name}"] = t
    for table, parts in blocks.items():
        out[f"model.tables.{table}.weight"] = torch.cat([t for _, t in sorted(parts)])
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_checkpoint_import_round_trip(tmp_path: Path, fmt: str) -> None:
    _write(tmp_path / "src")
    original = _state_dict(tmp_path / "src")
    ckpt = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pt")
    whole = _whole_tables(original)
    if fmt == "safetensors":
        save_file(whole, str(ckpt))
    else:
        torch.save({"state_dict": whole}, ckpt)
    cfg = SPEC.weights.model_copy(update={"checkpoint": ckpt, "init": None, "key_map": {"model.": ""}})
    (tmp_path / "dst").mkdir()
    manifest = import_checkpoint(SPEC.model, cfg, tmp_path / "dst", tmp_path)
    (tmp_path / "dst" / "manifest.json").write_text(json.dumps(manifest))  # the graph writes it in a build
    imported = _state_dict(tmp_path / "dst")
    assert set(imported) == set(original)
    for name in original:
        torch.testing.assert_close(imported[name], original[name], rtol=0, atol=0)
    load_model(SPEC.model, tmp_path / "dst")  # the model loads what was imported


def test_checkpoint_mismatch_lists_every_key(tmp_path: Path) -> None:
    _write(tmp_path / "src")
    state = _whole_tables(_state_dict(tmp_path / "src"))
    state.pop("model.dense.heads.w1")
    state["model.dense.heads.w2"] = torch.zeros(3, 3)
    state["model.extra.thing"] = torch.zeros(1)
    save_file(state, str(tmp_path / "c.safetensors"))
    cfg = SPEC.weights.model_copy(
        update={"checkpoint": tmp_path / "c.safetensors", "init": None, "key_map": {"model.": ""}}
    )
    (tmp_path / "dst").mkdir()
    with pytest.raises(StageError) as err:
        import_checkpoint(SPEC.model, cfg, tmp_path / "dst", tmp_path)
    text = str(err.value)
    assert "missing: dense.heads.w1" in text
    assert "unexpected: extra.thing" in text
    assert "wrong shape: dense.heads.w2: expected shape [4, 16], checkpoint has [3, 3]" in text


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("unpickled arbitrary code",))


def test_pickled_objects_are_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"dense.heads.w1": _Boom()}, fh)
    cfg = SPEC.weights.model_copy(update={"checkpoint": evil, "init": None})
    (tmp_path / "dst").mkdir()
    with pytest.raises(StageError, match="not a weights-only state_dict"):
        import_checkpoint(SPEC.model, cfg, tmp_path / "dst", tmp_path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_manifest_counts_match_the_spec(tmp_path: Path) -> None:
    from grc.model.params import parameter_summary

    manifest = _write(tmp_path / "w")
    assert manifest["parameters"]["total"] == sum(c for _, _, c in parameter_summary(SPEC.model))
    assert json.loads((tmp_path / "w" / "model.safetensors.index.json").read_text())["weight_map"]
