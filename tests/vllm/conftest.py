"""tests/vllm: the vllm bundle (fast, CI) and a real vLLM serving it (marked ``vllm``).

The marked tests need the dedicated vLLM venv (``python -m grc.serving.vllm_env``, ~2 min, ~3 GB); they skip
when it is missing, unless GRC_VLLM_CREATE=1 lets them make it. Run them alone with
``python -m pytest -m vllm tests/vllm -q -s`` (-s prints the load figures).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: serves a bundle with a real vLLM (needs the vLLM venv; see tests/vllm)")
