"""The real tritonserver the serving tests start (installed on first use from the nvidia-pytriton wheel)."""

from __future__ import annotations

import pytest

from grc.serving.tritonserver import ServerInstall, TritonServerError, ensure_tritonserver


@pytest.fixture(scope="module")
def install() -> ServerInstall:
    try:
        return ensure_tritonserver()
    except TritonServerError as exc:
        pytest.skip(f"tritonserver cannot be obtained here (pip install of nvidia-pytriton failed): {exc}")
