"""Helpers shared by the fault and chaos suites (test-side only; workers never import this)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

import fault_tasks
from offload import OffloadError, TaskRecord, WorkerManager

_meetings = itertools.count(1)


def new_manager(**options: Any) -> WorkerManager:
    options.setdefault("workers", 2)
    options.setdefault("shutdown_grace", 5.0)
    return WorkerManager(**options)


class Records:
    """``on_task_done`` sink: every record, by task id."""

    def __init__(self) -> None:
        self.all: list[TaskRecord] = []

    def __call__(self, record: TaskRecord) -> None:
        self.all.append(record)

    def by_id(self) -> dict[str | None, list[str]]:
        found: dict[str | None, list[str]] = {}
        for record in self.all:
            found.setdefault(record.task_id, []).append(record.outcome)
        return found

    def outcomes(self) -> Counter[str]:
        return Counter(record.outcome for record in self.all)


async def wait_for_workers(wm: WorkerManager, count: int, within: float = 5.0) -> None:
    """Until ``count`` workers are ready (a replacement may still be starting); bounded."""
    async with asyncio.timeout(within):
        while wm.stats().workers != count:
            await asyncio.sleep(0.005)


async def wait_until_settled(wm: WorkerManager, within: float = 5.0) -> None:
    """Until every accepted task has its outcome (a killed worker is reaped after the caller
    heard CancelledError, so its record may come a little later); bounded."""
    async with asyncio.timeout(within):
        while (stats := wm.stats()).finished != stats.submitted:
            await asyncio.sleep(0.005)


async def at_full_strength(wm: WorkerManager, count: int, tmp: Path) -> set[tuple[int, int]]:
    """Prove ``count`` distinct workers run at once: wait for them, then meet on all of them.

    Returns the (pid, thread) of each; for process workers, the pids are ``worker_pids()``.
    """
    await wait_for_workers(wm, count)
    folder = tmp / f"meet-{next(_meetings)}"
    folder.mkdir()
    met = await asyncio.gather(
        # Generous bounds: after chaos, a replacement interpreter may still be starting, and a
        # meeting task handed off behind a busy worker waits until it is taken back.
        *(
            wm.run(fault_tasks.rendezvous, str(folder), count, 15.0, timeout=20)
            for _ in range(count)
        )
    )
    assert len(set(met)) == count, met
    if wm.kind == "process":
        assert {pid for pid, _ in met} == set(wm.worker_pids())
    return set(met)


def outcome_of(exc: BaseException) -> str:
    """A caller-side exception as an outcome name: an offload code, or the type name."""
    if isinstance(exc, OffloadError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return type(exc).__name__


def live_children_of_us(pids: set[int]) -> list[int]:
    """Which of ``pids`` are still running children of this process (zombies do not count)."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive
