"""Developer tasks, one source of truth for CI: ``nox -s tests lint typecheck``.

``tests`` runs on 3.11 and 3.13 (3.13 exercises interpreter workers); ``bench`` runs the
benchmark suite (``nox -s bench -- --quick`` for a smoke run).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHONS = ["3.11", "3.13"]


def install_group(session: nox.Session, *groups: str) -> None:
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite, with every optional extra installed (Dask too)."""
    session.install("-e", ".[all,dask]")
    install_group(session, "test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    install_group(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[all,dask]")
    install_group(session, "typecheck")
    session.run("mypy")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers: ``nox -s bench`` (full) or ``nox -s bench -- --quick``."""
    session.install("-e", ".[all]")
    install_group(session, "bench")
    session.run("python", "-m", "benchmarks", *session.posargs)


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
