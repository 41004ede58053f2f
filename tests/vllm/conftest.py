"""tests/vllm: the vllm bundle (fast, CI) and a real vLLM serving it (marked ``vllm``).

The marked tests need the dedicated vLLM venv (``python -m grc.serving.vllm_env``, ~2 min, ~3 GB): they make it
when it is missing (one worker at a time, under a lock), and skip with the reason only where it cannot be made
(no route to PyPI) or GRC_VLLM_CREATE=0 says not to. Run them alone with
``python -m pytest -m vllm tests/vllm -q -s`` (-s prints the load figures).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: serves a bundle with a real vLLM (needs the vLLM venv; see tests/vllm)")
