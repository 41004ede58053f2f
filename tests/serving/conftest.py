"""The real tritonserver the serving tests start (installed on first use from the nvidia-pytriton wheel).

Skipped only where its documented prerequisite is missing: a Linux x86_64 or aarch64 host (the wheel's
platforms). Anything else that stops ``ensure_tritonserver`` (grc's installer, pip, the network) fails
the tests: an installer regression must not hide the serving suite.
"""

from __future__ import annotations

import platform
import sys

import pytest

from grc.serving.triton.server import ServerInstall, ensure_tritonserver

PLATFORMS = {("linux", "x86_64"), ("linux", "aarch64")}


def require_tritonserver() -> ServerInstall:
    host = (sys.platform, platform.machine())
    if host not in PLATFORMS:
        pytest.skip(f"tritonserver (nvidia-pytriton) has no build for {host[0]} {host[1]}; needs Linux x86_64/aarch64")
    return ensure_tritonserver()


@pytest.fixture(scope="module")
def install() -> ServerInstall:
    return require_tritonserver()
