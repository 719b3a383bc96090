"""Task types for the job tests: module-level, importable by workers as ``jobs.jobtasks``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import offload


@offload.task("jobs-test:add")
def add(data: dict[str, int]) -> int:
    return data["a"] + data["b"]


@offload.task("jobs-test:echo")
def echo(data: Any) -> Any:
    return data


@offload.task("jobs-test:started")
def started(data: Any) -> float:
    """When the task began, on the host's clock (seconds since the epoch)."""
    return time.time()


@offload.task("jobs-test:opaque")
def opaque(data: Any) -> Any:
    """Returns something that is not JSON."""
    return {1, 2, 3}


@offload.task("jobs-test:flaky")
def flaky(data: dict[str, Any]) -> str:
    """Appends a line per attempt to ``data["log"]``; raises until ``data["fail"]`` did."""
    log = Path(data["log"])
    with log.open("a") as f:
        f.write(f"{time.time()}\n")
    attempts = len(log.read_text().splitlines())
    if attempts <= data["fail"]:
        raise ValueError(f"attempt {attempts} fails")
    if data.get("fifo"):
        with open(data["fifo"], "a") as f:
            f.write("succeeded\n")
    return f"ok after {attempts}"


@offload.task("jobs-test:fail")
def fail(data: dict[str, Any]) -> None:
    raise KeyError(data.get("message", "missing"))


@offload.task("jobs-test:crash")
def crash(data: Any) -> None:
    os._exit(7)


@offload.task("jobs-test:sleep")
def sleep(data: dict[str, float]) -> float:
    time.sleep(data["seconds"])
    return data["seconds"]


@offload.task("jobs-test:gate")
def gate(data: dict[str, str]) -> str:
    """Notes that it started (``data["started"]``, a FIFO or file), then waits on
    ``data["gate"]`` (a FIFO) for a line, and returns it."""
    started_path = data.get("started")
    if started_path:
        with open(started_path, "a") as f:
            f.write(f"{data.get('name', '')}\n")
    with open(data["gate"]) as f:
        return f.readline().strip()


@offload.task("jobs-test:record")
def record(data: dict[str, Any]) -> dict[str, Any]:
    """For the kill tests: appends ``S``/``E`` lines with the host, job and time to
    ``data["log"]`` (one ``write`` each, O_APPEND: lines never interleave) around a short
    sleep."""
    host = os.environ.get("OFFLOAD_TEST_HOST", "?")
    fd = os.open(data["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"S {host} {data['n']} {time.time():.6f}\n".encode())
        time.sleep(data.get("seconds", 0.01))
        os.write(fd, f"E {host} {data['n']} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)
    return {"host": host, "n": data["n"]}


def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


@offload.task("jobs-test:ping")
def ping(data: dict[str, Any]) -> float:
    """Writes ``data["name"]`` and the time as a line to the FIFO ``data["fifo"]``."""
    now = time.time()
    with open(data["fifo"], "a") as f:
        f.write(f"{data.get('name', '')} {now:.6f}\n")
    return now
