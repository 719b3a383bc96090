"""Developer tasks, one source of truth for CI: ``nox -s tests lint typecheck``.

``tests`` runs the test suite on every supported Python: ``tests-3.11``, ``tests-3.12`` and
``tests-3.13`` with this machine's interpreters (pyenv), ``tests-3.14`` and ``tests-3.15`` in a
Debian sid chroot made by ``.ci/py314.sh`` (needs root). Outside CI a Python that cannot run is
skipped and named in a banner at the very end of the nox run; in CI (``CI`` set) it is an error.
``bench`` runs the benchmark suite (``nox -s bench -- --quick`` for a smoke run).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import sys

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.download_python = "never"  # a missing Python is skipped (an error in CI), not fetched

PYPROJECT = nox.project.load_toml("pyproject.toml")
HOST_PYTHONS = ["3.11", "3.12", "3.13"]  # this machine's (pyenv)
SID_PYTHONS = ["3.14", "3.15"]  # Debian sid's, in the chroot of .ci/py314.sh
TEST_EXTRAS = "all,dask"
SID_SCRIPT = ".ci/py314.sh"
SID_CAP = "15m"  # the most one sid test session may take (timeout(1) duration)
IN_CI = bool(os.environ.get("CI"))


def install_group(session: nox.Session, *groups: str) -> None:
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


# ---- which Pythons did not run, said once at the end -----------------------------------------

NOT_RUN: dict[str, str] = {}  # session name -> why


class _SkipRecorder(logging.Handler):
    """Notes the test sessions nox skips (a missing interpreter) from its result line."""

    RESULT = re.compile(r"Session (tests-\S+) skipped: (.+?)(?: \(took [^)]*\))?\.?$")

    def emit(self, record: logging.LogRecord) -> None:
        match = self.RESULT.match(record.getMessage())
        if match:
            NOT_RUN.setdefault(match[1], match[2])


def _banner() -> None:
    if not NOT_RUN:
        return
    rule = "!" * 78
    lines = [
        "",
        rule,
        f"!! The test suite did NOT run on {len(NOT_RUN)} Python(s):",
        *(f"!!   {name}: {why}" for name, why in sorted(NOT_RUN.items())),
        "!! Host Pythons come from pyenv (PYENV_VERSION=3.11.7:3.12.1:3.13.0); 3.14 and 3.15",
        "!! from the Debian sid chroot of .ci/py314.sh, which needs root. In CI this fails.",
        rule,
        "",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


logging.getLogger("nox").addHandler(_SkipRecorder())
atexit.register(_banner)


# ---- sessions --------------------------------------------------------------------------------


def _tests_on_host(python: str) -> None:
    def tests_on_host(session: nox.Session) -> None:
        session.install("-e", f".[{TEST_EXTRAS}]")
        install_group(session, "test")
        session.run("python", "-m", "pytest", *session.posargs)

    tests_on_host.__doc__ = f"The test suite on Python {python}, every optional extra installed."
    nox.session(python=python, name=f"tests-{python}")(tests_on_host)


def _tests_in_sid(python: str) -> None:
    def tests_in_sid(session: nox.Session) -> None:
        check = subprocess.run(
            ["bash", SID_SCRIPT, "check"], capture_output=True, text=True, check=False
        )
        if check.returncode == 77:
            why = check.stdout.strip() or check.stderr.strip()
            if IN_CI:
                session.error(f"Python {python} cannot run here: {why}")
            NOT_RUN[session.name] = why
            session.skip(why)
        elif check.returncode:
            session.error(f"{SID_SCRIPT} check failed: {check.stderr.strip()}")
        script = ["bash", SID_SCRIPT, "test", "--python", python, "--extras", TEST_EXTRAS]
        # A cap far above the usual 2-5 minutes: a process that cannot exit (a thread stuck in
        # a subinterpreter) fails this session instead of holding up the whole run.
        cap = ["timeout", "--kill-after=30", SID_CAP] if shutil.which("timeout") else []
        session.run(*cap, *script, "--", *session.posargs, external=True)

    tests_in_sid.__doc__ = (
        f"The test suite on Python {python} from Debian sid, in the chroot of {SID_SCRIPT} (root)."
    )
    nox.session(python=False, name=f"tests-{python}")(tests_in_sid)


for _python in HOST_PYTHONS:
    _tests_on_host(_python)
for _python in SID_PYTHONS:
    _tests_in_sid(_python)


@nox.session(python=False, requires=[f"tests-{p}" for p in HOST_PYTHONS + SID_PYTHONS])
def tests(session: nox.Session) -> None:
    """The test suite on every Python, 3.11 to 3.15 (``tests-3.12`` and so on for one)."""
    ran = [p for p in HOST_PYTHONS + SID_PYTHONS if f"tests-{p}" not in NOT_RUN]
    session.log(f"the test suite ran on Python {', '.join(ran) or 'none'}")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff (lint and format check), and the layering contract (import-linter)."""
    install_group(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.install("-e", ".")  # import-linter reads the installed package's imports
    session.run("lint-imports")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", f".[{TEST_EXTRAS}]")
    install_group(session, "typecheck")
    session.run("mypy")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers: ``nox -s bench`` (full) or ``nox -s bench -- --quick``."""
    session.install("-e", ".[all]")
    install_group(session, "bench")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python="3.13", name="bench-3.13")
def bench_313(session: nox.Session) -> None:
    """The benchmarks on Python 3.13, with the subinterpreter systems: ``nox -s bench-3.13``."""
    session.install("-e", ".[all]")
    install_group(session, "bench")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=False, name="bench-3.14")
def bench_314(session: nox.Session) -> None:
    """The benchmarks on Python 3.14 from Debian sid (``InterpreterPoolExecutor``), in the
    chroot of ``.ci/py314.sh`` (root): ``nox -s bench-3.14 -- --json out.json``."""
    check = subprocess.run(["bash", SID_SCRIPT, "check"], capture_output=True, text=True)
    if check.returncode:
        session.skip(check.stdout.strip() or check.stderr.strip())
    session.run("bash", "benchmarks/sid.sh", *session.posargs, external=True)


@nox.session(python="3.11", name="bench-jobs")
def bench_jobs(session: nox.Session) -> None:
    """Durable jobs against huey and procrastinate: ``nox -s bench-jobs -- --quick``."""
    session.install("-e", ".[all]")
    install_group(session, "bench")
    session.run("python", "-m", "benchmarks.jobs", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """The README's main job."""
    session.install("-e", ".[web]")
    session.run("offload", "demo", *session.posargs, env={"CI": os.environ.get("CI", "")})
