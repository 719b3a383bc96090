"""Task functions run inside the workers of every system.

They live in an importable module (never ``__main__``) so that every pool can pickle them
by reference, and they use the standard library only so that subinterpreters can import
them. ``a_*`` are coroutine twins for pools that only run coroutines (aiomultiprocess).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def noop() -> None:
    """Nothing: the per-call cost is all round trip."""


def echo(x: Any) -> Any:
    """Return the argument unchanged: the trivial task for latency and throughput."""
    return x


def nbytes(x: Any) -> int:
    """Length of a bytes-like argument (payload scenario, one-way variant)."""
    return len(memoryview(x).cast("B"))


def who() -> tuple[int, int]:
    """(pid, thread id) of the worker: tells process workers and interpreter threads apart."""
    return os.getpid(), threading.get_ident()


def burn(iterations: int) -> dict[str, float]:
    """A fixed amount of pure-Python work; returns the CPU time it took inside the worker.

    ``thread_time`` rather than ``process_time``: a subinterpreter worker shares its process
    with the other worker and the event loop, so only the calling thread's clock is the
    task's own. For a single-threaded process worker the two agree.
    """
    t_cpu = time.thread_time()
    t_wall = time.perf_counter()
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) % 1_000_003
    return {
        "cpu": time.thread_time() - t_cpu,
        "wall": time.perf_counter() - t_wall,
        "acc": float(acc),
    }


def sleep_heartbeat(total: float, heartbeat_path: str, done_path: str, step: float = 0.01) -> str:
    """Sleep ``total`` seconds in ``step`` slices, appending one byte per slice to a file.

    The first line of the heartbeat file is ``pid thread-id``. ``done_path`` is created only
    if the whole sleep ran to completion. The timeout scenario reads both to tell whether
    a timed-out task was really stopped.
    """
    fd = os.open(heartbeat_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {threading.get_ident()}\n".encode())
        end = time.monotonic() + total
        while time.monotonic() < end:
            time.sleep(step)
            os.write(fd, b".")
    finally:
        os.close(fd)
    with open(done_path, "w") as f:
        f.write("done\n")
    return "completed"


def calibrate_burn() -> float:
    """Iterations of :func:`burn` per millisecond of CPU in this process (best of 3)."""
    n = 20_000
    while True:
        cpu = burn(n)["cpu"]
        if cpu >= 0.02:
            break
        n *= 2
    best = min(burn(n)["cpu"] for _ in range(3))
    return n / (best * 1000.0)


async def a_echo(x: Any) -> Any:
    return echo(x)


async def a_nbytes(x: Any) -> int:
    return nbytes(x)


async def a_who() -> tuple[int, int]:
    return who()


async def a_burn(iterations: int) -> dict[str, float]:
    return burn(iterations)


async def a_sleep_heartbeat(
    total: float, heartbeat_path: str, done_path: str, step: float = 0.01
) -> str:
    # Deliberately blocking, like the sync version: the worker is busy, not awaiting.
    return sleep_heartbeat(total, heartbeat_path, done_path, step)


def count_up(n: int) -> Any:
    """Yield ``0 .. n-1``: the generator of the stream scenario (one trivial item each)."""
    yield from range(n)
