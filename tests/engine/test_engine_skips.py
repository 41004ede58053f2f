"""Targets that cannot be built here are skipped with a reason and no file; nothing fake is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from grc.engine import plugin_build, toolkits
from grc.spec.loader import load_spec
from grc.stages import engine, plugins
from grc.stages.base import Context
from tests.conftest import in_dir


def _ctx(spec: Path, out: Path, inputs: dict[str, Path]) -> Context:
    with in_dir(spec.parent):
        loaded = load_spec(spec.name)
    out.mkdir(parents=True)
    return Context(loaded=loaded, out=out, inputs=inputs, console=Console(quiet=True))


def test_no_nvcc_skips_the_plugins_and_then_every_target(
    built_tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> Path:
        raise plugin_build.Unavailable("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): install the CUDA toolkit")

    monkeypatch.setattr(plugin_build, "find_nvcc", missing)
    spec, artifacts = built_tiny
    ctx = _ctx(spec, tmp_path / "plugins", {})
    manifest = plugins.run(ctx)
    assert manifest["status"] == "skipped" and "nvcc not found" in manifest["reason"]
    assert not any(ctx.out.iterdir())
    (ctx.out / "manifest.json").write_text(json.dumps(manifest))
    ectx = _ctx(spec, tmp_path / "engines", {"surgery": artifacts / "hstu-tiny" / "surgery", "plugins": ctx.out})
    out = engine.run(ectx)
    assert out["built"] == [] and set(out["skipped"]) == {"sm80", "sm89", "h100"}
    if "tensorrt_rtx" in toolkits.installed():
        assert "nvcc not found" in out["skipped"]["sm80"]
    assert not any(ectx.out.iterdir())  # no plan, no metadata for what was not built


def test_no_toolkit_names_what_to_install(
    built_tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toolkits, "installed", lambda: {})
    spec, artifacts = built_tiny
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "manifest.json").write_text(json.dumps({"status": "skipped", "reason": "test"}))
    ctx = _ctx(
        spec, tmp_path / "engines", {"surgery": artifacts / "hstu-tiny" / "surgery", "plugins": tmp_path / "plugins"}
    )
    out = engine.run(ctx)
    assert out["built"] == []
    assert "tensorrt_rtx is not installed" in out["skipped"]["sm80"] and toolkits.RTX_PIN in out["skipped"]["sm80"]
    assert "full TensorRT" in out["skipped"]["h100"]


def _skipped_plugins(root: Path, reason: str) -> Path:
    (root / "plugins").mkdir(parents=True)
    (root / "plugins" / "manifest.json").write_text(json.dumps(plugins.skipped(reason)))
    return root


def test_engine_tests_fail_when_the_plugins_were_skipped_by_a_grc_regression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A headers sha256 or download regression makes the plugins stage record "skipped" on a host
    with nvcc: the engine tests must fail on it, not skip, or the regression hides them all."""
    from tests.conftest import require_plugin_library

    monkeypatch.setattr(plugin_build, "find_nvcc", lambda: Path("/usr/local/cuda/bin/nvcc"))
    root = _skipped_plugins(tmp_path, f"{plugin_build.HEADERS_WHEEL_FILE} has sha256 0000, expected 1111")
    with pytest.raises(pytest.fail.Exception, match="although nvcc is installed"):
        require_plugin_library(root)


def test_engine_tests_skip_only_without_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import require_plugin_library

    def missing() -> Path:
        raise plugin_build.Unavailable("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): install the CUDA toolkit")

    monkeypatch.setattr(plugin_build, "find_nvcc", missing)
    root = _skipped_plugins(tmp_path, "nvcc not found")
    with pytest.raises(pytest.skip.Exception, match="nvcc"):
        require_plugin_library(root)
