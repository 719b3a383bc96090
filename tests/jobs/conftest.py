"""Fixtures for the job tests: both stores, both event loops, a real PostgreSQL server."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import offload
from offload.jobs import JobQueue

from . import jobtasks  # noqa: F401  (registers the jobs-test:* task types)
from .pgserver import PostgresMissing, TemporaryPostgres

STORES = ["sqlite", "postgres"]
_schemas = itertools.count(1)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server for the whole session: its base URL (a UNIX socket)."""
    try:
        server = TemporaryPostgres()
    except PostgresMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL for the job-store tests: {exc}")
        pytest.skip(f"PostgreSQL tests SKIPPED: {exc}")
    with server:
        yield server.url


def fresh_schema(base_url: str) -> str:
    """A URL whose tables live in a new, empty schema (tests stay apart)."""
    import psycopg

    schema = f"t{os.getpid()}_{next(_schemas)}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{base_url}&options=-csearch_path%3D{schema}"


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for an empty store of each kind."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/jobs.db"
    return fresh_schema(request.getfixturevalue("postgres"))


@pytest.fixture
async def jobs(store_url: str) -> AsyncIterator[JobQueue]:
    async with JobQueue(store_url) as queue:
        yield queue


@pytest.fixture
async def manager(anyio_backend: str) -> AsyncIterator[offload.WorkerManager]:
    """``WorkerManager(workers=2)`` on the test's backend (asyncio or trio)."""
    async with offload.WorkerManager(workers=2) as wm:
        yield wm
