"""tests/vllm: the vllm bundle (fast, CI) and a real vLLM serving it (marked ``vllm``).

The marked tests need the dedicated vLLM venv (``python -m grc.serving.vllm.env``, ~2 min, ~3 GB): they make it
when it is missing (one worker at a time, under a lock), and skip only where GRC_VLLM_CREATE=0 says not to make
it; a venv that cannot be made (grc's installer, pip, the network) fails them. Run them alone with
``python -m pytest -m vllm tests/vllm -q -s`` (-s prints the load figures).
"""

from __future__ import annotations

import os

import pytest

from grc.serving.vllm import env as vllm_env


def require_vllm_venv() -> vllm_env.VllmEnv:
    """The venv, made when missing; skipped only when GRC_VLLM_CREATE=0 says not to make it."""
    found = vllm_env.find_venv()
    if found is not None:
        return found
    if os.environ.get("GRC_VLLM_CREATE") == "0":
        pytest.skip(
            f"no vLLM venv at {vllm_env.default_path()} ({vllm_env.ENV_VAR} overrides) and GRC_VLLM_CREATE=0: "
            f"make it with `{vllm_env.create_command()}` (~2 min, ~3 GB)"
        )
    return vllm_env.ensure()  # under a lock: another worker may be making it


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: serves a bundle with a real vLLM (needs the vLLM venv; see tests/vllm)")
