"""Shared fixtures: real specs copied to tmp folders, real builds through doit, built once per worker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from grc.build.progress import BuildRecords

REPO = Path(__file__).resolve().parents[1]
# Builds in tests start cold unless a test turns the build cache on with its own folder: a
# shared ~/.cache/grc would turn "built" into "restored" depending on which test ran first.
os.environ["GRC_CACHE"] = "off"
# One Inductor cache per pytest-xdist worker: two workers compiling the same small model at once wrote the
# shared cache's files under each other (a package then failed to load: "parse error ... empty input").
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor-{os.getuid()}-{worker}")
SPECS = REPO / "specs"
TEST_SPECS = Path(__file__).parent / "specs"


def write_spec(folder: Path, base: Path, overrides: dict[str, Any] | None = None, name: str | None = None) -> Path:
    """Copy ``base`` (resolving nothing: extends stays relative) with deep-merged overrides."""
    data = yaml.safe_load(base.read_text())
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (name or base.name)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@contextlib.contextmanager
def in_dir(folder: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def run_build(
    spec: Path,
    jobs: int = 1,
    only: list[str] | None = None,
    expect_ok: bool = True,
    records: BuildRecords | None = None,
) -> dict[str, str]:
    """Build in-process through doit, from the spec's folder (artifacts/ beside it, relative paths,
    as a user in a checkout would); return {task: status} of this run (all it recorded: pass ``records``)."""
    from grc.build.progress import BuildRecords
    from grc.build.runner import build

    records = records if records is not None else BuildRecords()
    from grc.spec.loader import load_spec

    with in_dir(spec.parent):
        loaded = load_spec(spec.name)
        code = build(loaded, Path("artifacts") / loaded.spec.name, jobs=jobs, only=only, records=records)
    statuses = {name: rec.get("status", "?") for name, rec in records.as_dict().items()}
    if expect_ok and code != 0:
        raise AssertionError(f"build failed ({code}): {records.as_dict()}")
    return statuses


@pytest.fixture(scope="session")
def built_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """hstu-tiny built once per worker: (spec path, artifacts folder). Copy before mutating."""
    folder = tmp_path_factory.mktemp("tiny")
    spec = write_spec(folder, SPECS / "hstu-tiny.yaml")
    run_build(spec)
    return spec, folder / "artifacts"


@pytest.fixture(scope="session")
def built_mtgr_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("mtgr_tiny")
    spec = write_spec(folder, TEST_SPECS / "mtgr-tiny.yaml")
    run_build(spec)
    return spec, folder / "artifacts"


@pytest.fixture
def tiny_copy(built_tiny: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the built hstu-tiny (spec + artifacts) that a test may edit and rebuild."""
    spec, _ = built_tiny
    # without the __pycache__ a server leaves in a served bundle: not grc's output (nor in its records)
    shutil.copytree(spec.parent, tmp_path / "w", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "w" / spec.name, tmp_path / "w" / "artifacts"


def require_plugin_library(root: Path) -> None:
    """The plugins stage of ``root`` built its library. A skip only where nvcc is missing (a documented
    prerequisite: the CUDA toolkit); a stage that recorded "skipped" for any other reason (the headers
    download, their sha256) is a grc regression and fails the test."""
    from grc.engine.plugin_build import Unavailable, find_nvcc

    manifest = json.loads((root / "plugins" / "manifest.json").read_text())
    if manifest["status"] == "built":
        return
    try:
        find_nvcc()
    except Unavailable as exc:
        pytest.skip(f"no plugin library without nvcc (install the CUDA toolkit): {exc}")
    pytest.fail(f"the plugins stage recorded a skip although nvcc is installed: {manifest['reason']}")
