"""Whole hosts: ``offload jobs work`` processes killed with SIGKILL, stopped with SIGTERM,
and left idle. Nothing is lost, no job runs on two hosts at once, an idle host uses no CPU.

These run the real command line in subprocesses, so they do not depend on the test's event
loop: they are plain tests over both stores.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from offload.jobs import JobQueue

from .conftest import fresh_schema

TESTS = Path(__file__).parent.parent
JOBS = 1000


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/jobs.db"
    return fresh_schema(request.getfixturevalue("postgres"))


class Host:
    """One ``offload jobs work`` process (its own session, so signals reach only it)."""

    def __init__(self, name: str, url: str, *args: str, log: Path) -> None:
        self.name = name
        self.stderr = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "offload",
                "jobs",
                "work",
                "--store",
                url,
                "--import",
                "jobs.jobtasks",
                "--workers",
                "2",
                *args,
            ],
            env={**os.environ, "PYTHONPATH": str(TESTS), "OFFLOAD_TEST_HOST": name},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            start_new_session=True,
        )
        self.log = log

    def family(self) -> list[psutil.Process]:
        me = psutil.Process(self.proc.pid)
        return [me, *me.children(recursive=True)]

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the host says it is working (its manager's workers are up)."""
        deadline = time.monotonic() + timeout
        while b"working on" not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the host did not start"
            time.sleep(0.05)

    def kill(self) -> float:
        """SIGKILL the host; returns when its worker processes are gone too."""
        family = self.family()
        self.proc.kill()
        self.proc.wait()
        _gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"workers outlived their host: {alive}"
        return time.time()

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    started: list[Host] = []
    yield started
    for host in started:
        host.close()


def run(coro: Any, *args: Any) -> Any:
    return anyio.run(coro, *args)


async def enqueue_records(url: str, log: Path, n: int) -> list[str]:
    async with JobQueue(url) as jobs:
        return [
            await jobs.enqueue(
                "jobs-test:record",
                {"log": str(log), "n": i, "seconds": 0.005},
                queue="kill",
                retries=3,
                job_id=f"job-{i:04d}",
            )
            for i in range(n)
        ]


async def snapshot(url: str, ids: list[str]) -> dict[str, Any]:
    async with JobQueue(url) as jobs:
        return {job_id: await jobs.get(job_id) for job_id in ids}


async def finished(url: str) -> int:
    async with JobQueue(url) as jobs:
        stats = await jobs.stats()
    return stats.total("done") + stats.total("failed")


def wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def runs_by_job(log: Path) -> dict[int, list[tuple[str, str, float]]]:
    runs: dict[int, list[tuple[str, str, float]]] = collections.defaultdict(list)
    for line in log.read_text().splitlines():
        kind, host, n, at = line.split()
        runs[int(n)].append((kind, host, float(at)))
    return runs


@pytest.mark.parametrize("together", [False, True], ids=["one-after-another", "two-at-once"])
def test_a_host_killed_mid_run_loses_nothing_and_no_job_runs_twice_at_once(
    url: str, tmp_path: Path, hosts: list[Host], together: bool
) -> None:
    log = tmp_path / "runs.log"
    ids = run(enqueue_records, url, log, JOBS)
    args = ("--queue", "kill", "--concurrency", "8", "--lease", "2", "--poll-interval", "1")
    a = Host("A", url, *args, log=tmp_path / "A.err")
    hosts.append(a)
    if together:
        b = Host("B", url, *args, log=tmp_path / "B.err")
        hosts.append(b)

    def a_finished() -> int:
        return sum(1 for line in log.read_text().splitlines() if line.startswith("E A "))

    wait_for("host A to finish 300 jobs", lambda: log.exists() and a_finished() >= 300, 120)
    a_dead_at = a.kill()
    if not together:
        b = Host("B", url, *args, log=tmp_path / "B.err")
        hosts.append(b)
    wait_for("every job to finish", lambda: run(finished, url) == JOBS, 180)
    assert b.terminate() == 0, (tmp_path / "B.err").read_text()

    infos = run(snapshot, url, ids)
    runs = runs_by_job(log)
    assert set(runs) == set(range(JOBS))
    took_back = 0
    for i, job_id in enumerate(ids):
        info = infos[job_id]
        assert info is not None, f"{job_id} was lost"
        assert info.state in ("done", "failed"), f"{job_id} is {info.state}"
        starts = [r for r in runs[i] if r[0] == "S"]
        assert info.attempts >= len(starts) >= 1, (job_id, info.attempts, runs[i])
        if info.attempts > 1:
            took_back += 1
        # Each run as an interval; a run A never finished lasted until A's workers were gone.
        intervals = []
        for kind, host, at in runs[i]:
            if kind == "S":
                ends = [t for k, h, t in runs[i] if k == "E" and h == host and t >= at]
                intervals.append((at, min(ends) if ends else a_dead_at, host))
        intervals.sort()
        for (_s1, e1, h1), (s2, _e2, h2) in itertools.pairwise(intervals):
            assert e1 <= s2, f"{job_id} ran on {h1} and {h2} at once: {intervals}"
        if info.state == "done":
            assert any(h == info.result["host"] for _, _, h in intervals)
    assert took_back >= 1, "the kill did not land while host A held jobs"
    hosts_that_worked = {h for r in runs.values() for _, h, _ in r}
    assert hosts_that_worked == {"A", "B"}


def test_sigterm_lets_the_running_job_finish_then_exits_0(
    url: str, tmp_path: Path, hosts: list[Host]
) -> None:
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    os.mkfifo(gate)

    async def enqueue() -> str:
        async with JobQueue(url) as jobs:
            return await jobs.enqueue(
                "jobs-test:gate", {"gate": str(gate), "started": str(started)}
            )

    job_id = run(enqueue)
    host = Host("A", url, "--grace", "60", log=tmp_path / "A.err")
    hosts.append(host)
    wait_for("the job to start", started.exists, 60)
    host.proc.send_signal(signal.SIGTERM)
    with open(gate, "w") as g:  # waits for the task to be reading: it is still running
        g.write("done\n")
    assert host.proc.wait(60) == 0, (tmp_path / "A.err").read_text()
    info = run(snapshot, url, [job_id])[job_id]
    assert (info.state, info.result) == ("done", "done")


def test_sigterm_hands_back_what_outlives_the_grace_period(
    url: str, tmp_path: Path, hosts: list[Host]
) -> None:
    gate = tmp_path / "gate"
    started = tmp_path / "started"
    os.mkfifo(gate)

    async def enqueue() -> str:
        async with JobQueue(url) as jobs:
            return await jobs.enqueue(
                "jobs-test:gate", {"gate": str(gate), "started": str(started)}
            )

    job_id = run(enqueue)
    host = Host("A", url, "--grace", "0.5", log=tmp_path / "A.err")
    hosts.append(host)
    wait_for("the job to start", started.exists, 60)
    assert host.terminate() == 0, (tmp_path / "A.err").read_text()
    info = run(snapshot, url, [job_id])[job_id]
    assert (info.state, info.attempts) == ("queued", 0)


def test_an_idle_host_uses_under_one_percent_of_a_core(
    url: str, tmp_path: Path, hosts: list[Host]
) -> None:
    """No busy loop: the host and its workers sleep until a notification or a due time."""
    host = Host("A", url, log=tmp_path / "A.err")  # the defaults
    hosts.append(host)
    host.wait_ready()
    time.sleep(2.0)  # start-up work settles (the spare worker starts after the others)
    family = host.family()

    def cpu() -> dict[int, float]:
        return {p.pid: p.cpu_times().user + p.cpu_times().system for p in family}

    before, t0 = cpu(), time.monotonic()
    time.sleep(10.0)  # the measurement window: two of the manager's health checks
    after, wall = cpu(), time.monotonic() - t0
    each = {pid: round(after[pid] - before[pid], 3) for pid in after}
    used = sum(each.values())
    assert used / wall < 0.01, (
        f"an idle host used {100 * used / wall:.2f} % of a core: {each} (host {host.proc.pid})"
    )
    assert host.terminate() == 0
