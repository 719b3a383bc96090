"""``offload demo --local``: a short mixed workload on local process workers, narrated."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import Any

from ._manager import WorkerManager
from ._registry import task
from ._stats import TaskRecord
from ._task import Task
from .errors import OffloadError


@task("demo:add")
def add(data: dict[str, int]) -> int:
    """``{"a": 1, "b": 2}`` -> ``3``."""
    return data["a"] + data["b"]


@task("demo:primes")
def count_primes(data: dict[str, int]) -> int:
    """How many primes are below ``data["below"]`` (pure-Python CPU work)."""
    below = data["below"]
    sieve = bytearray([1]) * below
    sieve[:2] = b"\x00\x00"
    for i in range(2, int(below**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, below, i)))
    return sum(sieve)


@task("demo:stretch")
def stretch_hash(data: dict[str, Any]) -> str:
    """Iterated SHA-256, the shape of a password hash (CPU-bound, C code)."""
    digest = str(data["text"]).encode()
    for _ in range(int(data["rounds"])):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


def spin(seconds: float) -> float:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


_WORKLOAD: list[dict[str, Any]] = [
    {"id": "low-primes", "type": "demo:primes", "data": {"below": 2_000_000}, "priority": "low"},
    {"id": "n-stretch", "type": "demo:stretch", "data": {"text": "hi", "rounds": 300_000}},
    {"id": "high-add", "type": "demo:add", "data": {"a": 40, "b": 2}, "priority": "high"},
    {"id": "n-primes", "type": "demo:primes", "data": {"below": 500_000}},
    {
        "id": "high-stretch",
        "type": "demo:stretch",
        "data": {"text": "x", "rounds": 50_000},
        "priority": "high",
    },
    {"id": "low-add", "type": "demo:add", "data": {"a": 1, "b": 1}, "priority": "low"},
    {"id": "deadline", "type": "demo:primes", "data": {"below": 50_000_000}, "timeout": 0.3},
]


async def run_local_demo(workers: int = 2, out: Callable[[str], None] = print) -> None:
    """Run the mixed workload; print each task as it finishes, then the manager's stats."""
    out(f"offload demo: {len(_WORKLOAD)} tasks on {workers} local process workers")
    started = time.perf_counter()
    header = f"{'#':>3}  {'task':<14}{'priority':<10}{'wait ms':>9}{'run ms':>9}  outcome"

    def show(record: TaskRecord) -> None:
        name = record.task_id or record.name
        out(
            f"{record.seq:>3}  {name:<14}{record.priority:<10}{record.wait * 1000:>9.1f}"
            f"{record.run * 1000:>9.1f}  {record.outcome}"
        )

    async with WorkerManager(workers=workers, max_queue=100, on_task_done=show) as wm:
        out(
            f"workers ready in {(time.perf_counter() - started) * 1000:.0f} ms; "
            "two warm-up tasks per worker fill them first, so priorities decide the rest\n"
        )
        out(header)
        warmups = [
            Task(spin, args=(0.2,), id=f"warm-up-{i}", priority="normal")
            for i in range(workers * 2)
        ]
        calls: list[Task | dict[str, Any]] = [*warmups, *_WORKLOAD]

        async def one(spec: Task | dict[str, Any]) -> None:
            with contextlib.suppress(OffloadError):
                await wm.execute_task(spec)

        await asyncio.gather(*(one(spec) for spec in calls))
        stats = wm.stats()
    out(
        f"\nstats: submitted={stats.submitted} completed={stats.completed} "
        f"failed={stats.failed} timed_out={stats.timed_out} rejected={stats.rejected} "
        f"crashed={stats.crashed} worker_restarts={stats.worker_restarts}"
    )
    out(
        f"wait p50/p99 {stats.wait_p50 * 1000:.1f}/{stats.wait_p99 * 1000:.1f} ms, "
        f"run p50/p99 {stats.run_p50 * 1000:.1f}/{stats.run_p99 * 1000:.1f} ms, "
        f"total {time.perf_counter() - started:.2f} s"
    )
