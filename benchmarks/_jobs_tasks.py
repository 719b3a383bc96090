"""Task types for the jobs benchmark (``benchmarks/jobs.py``), for offload, huey and
procrastinate alike: the same two trivial bodies."""

from __future__ import annotations

import os
import time
from typing import Any

import offload


def noop_body() -> int:
    return 1


def ping_body(fifo: str) -> float:
    """Write the time this task started to the FIFO ``fifo`` (one line); return it."""
    now = time.time()
    fd = os.open(fifo, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{now:.6f}\n".encode())
    finally:
        os.close(fd)
    return now


@offload.task("bench-jobs:noop")
def noop(data: Any) -> int:
    return noop_body()


@offload.task("bench-jobs:ping")
def ping(data: dict[str, str]) -> float:
    return ping_body(data["fifo"])


def huey_app(filename: str) -> Any:
    """The huey app (SQLite storage in ``filename``) with the same two tasks."""
    from huey import SqliteHuey

    app = SqliteHuey("bench", filename=filename)
    app.huey_noop = app.task(name="noop")(noop_body)  # type: ignore[attr-defined]
    app.huey_ping = app.task(name="ping")(ping_body)  # type: ignore[attr-defined]
    return app


if os.environ.get("BENCH_HUEY_DB"):  # in huey's consumer process
    huey = huey_app(os.environ["BENCH_HUEY_DB"])
