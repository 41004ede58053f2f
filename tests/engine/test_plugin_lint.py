"""The plugin library's lint never passes unchecked (issue 15): without nm / readelf it fails, naming them."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import pytest

from grc.engine.plugin_build import lint_library


def _a_shared_library() -> Path:
    return next((Path(onnxruntime.__file__).parent / "capi").glob("*.so"))


def test_lint_fails_without_binutils(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = _a_shared_library()
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path))  # an empty folder: neither nm nor readelf
        with pytest.raises(RuntimeError, match=r"cannot lint .*\.so: nm and readelf not found on PATH \(install "
                                               r"binutils\)"):  # fmt: skip
            lint_library(library)
    report = lint_library(library)  # with them: every check is made
    assert {"exported", "entry_points_ok", "needed", "links_tensorrt_or_cudart"} <= set(report)
    assert report["entry_points_ok"] is False  # not a TensorRT plugin library: the lint says so
