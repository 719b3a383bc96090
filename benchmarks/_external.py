"""What some systems need from outside this checkout, made once and cached outside it.

- The previous release (``offload-previous``): ``git archive COMMIT`` of this repository,
  built into a wheel (pip, or uv where the environment has no pip) and installed with
  ``--target`` into its own directory, which only that system's runner puts on its
  ``PYTHONPATH``.
- piscina (``piscina``): ``npm install`` into a cache directory, never into the checkout (no
  ``node_modules``, no lockfile here).

The cache is ``$OFFLOAD_BENCH_CACHE``, else ``$XDG_CACHE_HOME/offload-bench``, else
``~/.cache/offload-bench``. Delete it to rebuild. Failures raise ``Unavailable`` with the
reason, and the orchestrator skips the system with that note.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from .systems import REPO_ROOT, Unavailable

#: The piscina release line the Node.js script is written for (needs Node.js >= 20).
PISCINA_SPEC = "piscina@5"


def cache_root() -> str:
    root = os.environ.get("OFFLOAD_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "offload-bench"
    )
    os.makedirs(root, exist_ok=True)
    return root


def _run(cmd: list[str], what: str, cwd: str | None = None, timeout: float = 300) -> bytes:
    try:
        proc = subprocess.run(cmd, capture_output=True, cwd=cwd, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{what}: {exc}") from None
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-3:]
        raise Unavailable(f"{what} failed ({proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


def _installer() -> tuple[list[str], list[str]]:
    """(wheel-building command prefix, install command prefix) for this interpreter."""
    if importlib.util.find_spec("pip") is not None:
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        return [*pip, "wheel", "--no-deps", "-q"], [*pip, "install", "--no-deps", "-q"]
    uv = shutil.which("uv")
    if uv:
        return [uv, "build", "--wheel", "-q"], [uv, "pip", "install", "--no-deps", "-q",
                                                "--python", sys.executable]  # fmt: skip
    raise Unavailable("neither pip nor uv is available to build the previous release's wheel")


def previous_release(commit: str) -> str:
    """The directory holding the previous release's ``offload`` package (built if needed)."""
    root = os.path.join(cache_root(), f"previous-{commit}")
    target = os.path.join(root, f"site-py{sys.version_info[0]}{sys.version_info[1]}")
    if os.path.exists(os.path.join(target, ".complete")):
        return target
    build, install = _installer()
    wheels = glob.glob(os.path.join(root, "wheel", "*.whl"))
    if not wheels:
        if not shutil.which("git"):
            raise Unavailable("git is not installed: cannot archive the previous release")
        archive = _run(
            ["git", "-C", REPO_ROOT, "archive", "--format=tar", commit],
            f"git archive {commit}",
        )
        with tempfile.TemporaryDirectory(prefix="offload-previous-") as src:
            tar_path = os.path.join(src, "src.tar")
            with open(tar_path, "wb") as f:
                f.write(archive)
            tree = os.path.join(src, "tree")
            with tarfile.open(tar_path) as tar:
                tar.extractall(tree, filter="data")
            out = os.path.join(root, "wheel")
            os.makedirs(out, exist_ok=True)
            if build[1] == "build":  # uv build SRC -o OUT
                _run([*build, tree, "-o", out], "building the previous release's wheel")
            else:  # pip wheel -w OUT SRC
                _run([*build, "-w", out, tree], "building the previous release's wheel")
        wheels = glob.glob(os.path.join(out, "*.whl"))
        if not wheels:
            raise Unavailable("the previous release's wheel build made no wheel")
    shutil.rmtree(target, ignore_errors=True)
    _run([*install, "--target", target, wheels[0]], "installing the previous release's wheel")
    open(os.path.join(target, ".complete"), "w").close()
    return target


def piscina() -> str:
    """The ``node_modules`` directory holding piscina (``npm install``\\ ed if needed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise Unavailable("node and npm are needed for piscina (not installed)")
    root = os.path.join(cache_root(), "node")
    modules = os.path.join(root, "node_modules")
    if os.path.exists(os.path.join(modules, "piscina", "package.json")):
        return modules
    os.makedirs(root, exist_ok=True)
    _run(
        [npm, "install", "--prefix", root, "--no-save", "--no-package-lock", "--no-audit",
         "--no-fund", "--loglevel=error", PISCINA_SPEC],
        f"npm install {PISCINA_SPEC}",
    )  # fmt: skip
    if not os.path.exists(os.path.join(modules, "piscina", "package.json")):
        raise Unavailable(f"npm install {PISCINA_SPEC} left no piscina in {modules}")
    return modules
