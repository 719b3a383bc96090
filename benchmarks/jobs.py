"""Durable jobs: offload.jobs against huey (SQLite) and procrastinate (PostgreSQL).

::

    python -m benchmarks.jobs                    # both stores, both peers, 3 repetitions
    python -m benchmarks.jobs --quick            # a smoke run
    python -m benchmarks.jobs --systems offload-sqlite,huey-sqlite --jobs 5000 --json out.json

Two figures per system, all systems interleaved in one run, each repetition in a fresh store:

- ``throughput``: trivial jobs per second from enqueue to done. 16 concurrent producers (as
  the requests of a web app) enqueue N jobs, each call awaited, while an idle worker consumes
  them; the clock stops when the store reports all N done (looked at every 20 ms).
  ``enqueues/s`` is the producers' own rate.
- ``latency``: enqueue to start with an idle worker. The task writes the time it started to a
  FIFO; latency = that time - the time just before the enqueue call. Samples are taken one
  at a time, 50 ms apart (the worker idle in between).

Every system runs 2 worker processes:

- ``offload-sqlite`` / ``offload-postgres``: ``JobQueue.work(WorkerManager(workers=2),
  concurrency=8)`` in this process; the producer is another ``JobQueue`` on the same store.
- ``huey-sqlite``: ``SqliteHuey``, its consumer in a subprocess with 2 process workers,
  polling every 0.1 s (huey's default first interval; ``-m 0.1`` keeps it there: its default
  backs off to 10 s when idle).
- ``procrastinate-postgres``: ``PsycopgConnector`` on the same PostgreSQL server, a worker
  with concurrency 2 in a subprocess (sync tasks run in its threads), LISTEN/NOTIFY on.

The PostgreSQL server is a fresh one from Debian's package (fsync on, default settings) in a
temporary directory, on a UNIX socket. Nothing is asserted: the suite reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "jobs"))  # pgserver.py: a throwaway PostgreSQL

PRODUCERS = 16  # concurrent enqueuers in the throughput run (requests of a web app)

SYSTEMS = ("offload-sqlite", "offload-postgres", "huey-sqlite", "procrastinate-postgres")


class Fifo:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "pings"
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        self.buffer = b""

    async def line(self, timeout: float = 30.0) -> float:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while b"\n" not in self.buffer:
                ready = loop.create_future()
                loop.add_reader(self.fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.fd)
                with contextlib.suppress(BlockingIOError):
                    self.buffer += os.read(self.fd, 65536)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return float(line)

    def close(self) -> None:
        os.close(self.fd)


def shares(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


async def wait_until(count: Callable[[], Any], n: int, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while (await count()) < n:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {await count()} of {n} jobs done after {timeout} s")
        await asyncio.sleep(0.02)
    return time.perf_counter()


async def latency_samples(enqueue: Callable[[str], Any], fifo: Fifo, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        await asyncio.sleep(0.05)
        before = time.time()
        await enqueue(str(fifo.path))
        started = await fifo.line()
        out.append(started - before)
    return out


# -- offload ---------------------------------------------------------------------------------


async def run_offload(url: str, n: int, samples: int, work_dir: Path) -> dict[str, Any]:
    import offload
    from benchmarks import _jobs_tasks  # noqa: F401  (registers bench-jobs:*)
    from offload.jobs import JobQueue

    fifo = Fifo(work_dir)
    async with (
        JobQueue(url) as worker_side,
        JobQueue(url) as producer,
        offload.WorkerManager(workers=2) as wm,
    ):
        task = asyncio.create_task(worker_side.work(wm, ["bench"], concurrency=8))
        # warm up: the first job imports the task module in the workers
        await producer.enqueue("bench-jobs:ping", {"fifo": str(fifo.path)}, queue="bench")
        await fifo.line()

        async def enqueue_ping(path: str) -> None:
            await producer.enqueue("bench-jobs:ping", {"fifo": path}, queue="bench")

        lat = await latency_samples(enqueue_ping, fifo, samples)

        async def done() -> int:  # finished: done, or failed (none should)
            q = (await producer.stats()).queues["bench"]
            return q.done + q.failed

        async def produce(count: int) -> None:
            # Distinct data, as real jobs have: identical calls that crash workers three times
            # are refused by the manager's poison-task guard.
            for i in range(count):
                await producer.enqueue("bench-jobs:noop", {"i": i}, queue="bench")

        base = await done()
        t0 = time.perf_counter()
        await asyncio.gather(*(produce(c) for c in shares(n, PRODUCERS)))
        enqueued = time.perf_counter()
        t1 = await wait_until(done, base + n, 300)
        failed = (await producer.stats()).queues["bench"].failed
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    fifo.close()
    return {
        "throughput": n / (t1 - t0),
        "enqueue_rate": n / (enqueued - t0),
        "latency": lat,
        "failed": failed,
    }


# -- huey ------------------------------------------------------------------------------------


async def run_huey(n: int, samples: int, work_dir: Path) -> dict[str, Any]:
    db = work_dir / "huey.db"
    env = {**os.environ, "BENCH_HUEY_DB": str(db), "PYTHONPATH": str(ROOT)}
    from benchmarks._jobs_tasks import huey_app

    huey = huey_app(str(db))
    noop, ping = huey.huey_noop, huey.huey_ping
    consumer = subprocess.Popen(
        [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks._jobs_tasks.huey",
         "-w", "2", "-k", "process", "-d", "0.1", "-m", "0.1", "-b", "1.0", "-q"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    fifo = Fifo(work_dir)
    try:
        ping(str(fifo.path))
        await fifo.line()

        async def enqueue_ping(path: str) -> None:
            ping(path)

        lat = await latency_samples(enqueue_ping, fifo, samples)

        async def done() -> int:
            return int(huey.result_count())

        def produce(count: int) -> None:
            for _ in range(count):
                noop()

        base = await done()  # the pings' results are kept too
        t0 = time.perf_counter()
        await asyncio.gather(*(asyncio.to_thread(produce, c) for c in shares(n, PRODUCERS)))
        enqueued = time.perf_counter()
        t1 = await wait_until(done, base + n, 300)
    finally:
        consumer.send_signal(signal.SIGINT)
        try:
            consumer.wait(30)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait()
        fifo.close()
    return {"throughput": n / (t1 - t0), "enqueue_rate": n / (enqueued - t0), "latency": lat}


# -- procrastinate ----------------------------------------------------------------------------

PROCRASTINATE_APP = """
import os, procrastinate
from benchmarks._jobs_tasks import noop_body, ping_body
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ["BENCH_PG"]))
@app.task(name="noop", queue="bench")
def noop():
    return noop_body()
@app.task(name="ping", queue="bench")
def ping(fifo):
    return ping_body(fifo)
"""


async def run_procrastinate(url: str, n: int, samples: int, work_dir: Path) -> dict[str, Any]:
    import psycopg

    (work_dir / "bench_procrastinate_app.py").write_text(PROCRASTINATE_APP)
    sys.path.insert(0, str(work_dir))
    os.environ["BENCH_PG"] = url
    import bench_procrastinate_app as mod

    app = mod.app
    env = {**os.environ, "PYTHONPATH": f"{work_dir}:{ROOT}"}
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    err = (work_dir / "worker.err").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "procrastinate", "--app", "bench_procrastinate_app.app",
         "worker", "--queues", "bench", "--concurrency", "2"],
        env=env, cwd=work_dir, stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    fifo = Fifo(work_dir)
    try:
        async with app.open_async(), await psycopg.AsyncConnection.connect(url) as conn:
            await mod.ping.defer_async(fifo=str(fifo.path))
            try:
                await fifo.line(60)
            except TimeoutError:
                print((work_dir / "worker.err").read_text()[-3000:])
                raise

            async def enqueue_ping(path: str) -> None:
                await mod.ping.defer_async(fifo=path)

            lat = await latency_samples(enqueue_ping, fifo, samples)

            async def done() -> int:
                cur = await conn.execute(
                    "SELECT count(*) FROM procrastinate_jobs "
                    "WHERE task_name = 'noop' AND status = 'succeeded'"
                )
                row = await cur.fetchone()
                return int(row[0]) if row else 0

            async def produce(count: int) -> None:
                for _ in range(count):
                    await mod.noop.defer_async()

            t0 = time.perf_counter()
            await asyncio.gather(*(produce(c) for c in shares(n, PRODUCERS)))
            enqueued = time.perf_counter()
            t1 = await wait_until(done, n, 300)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        err.close()
        fifo.close()
        sys.modules.pop("bench_procrastinate_app", None)
        sys.path.remove(str(work_dir))
    return {"throughput": n / (t1 - t0), "enqueue_rate": n / (enqueued - t0), "latency": lat}


# -- the run -----------------------------------------------------------------------------------


async def fresh_pg_database(base_url: str, name: str) -> str:
    import psycopg

    async with await psycopg.AsyncConnection.connect(base_url, autocommit=True) as conn:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name}")
    return base_url.replace("/postgres?", f"/{name}?")


async def one(system: str, n: int, samples: int, pg_url: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="offload-bench-jobs-") as tmp:
        work_dir = Path(tmp)
        if system == "offload-sqlite":
            return await run_offload(f"sqlite://{work_dir}/jobs.db", n, samples, work_dir)
        if system == "huey-sqlite":
            return await run_huey(n, samples, work_dir)
        assert pg_url is not None
        url = await fresh_pg_database(pg_url, system.replace("-", "_"))
        if system == "offload-postgres":
            return await run_offload(url, n, samples, work_dir)
        return await run_procrastinate(url, n, samples, work_dir)


def available(system: str) -> str | None:
    """Why ``system`` cannot run here, or None."""
    needs = {"huey-sqlite": "huey", "procrastinate-postgres": "procrastinate"}
    modules = [needs[system]] if system in needs else []
    if "postgres" in system:
        modules.append("psycopg")
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (the bench dependency group)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--jobs", type=int, default=3000, help="jobs in the throughput run")
    parser.add_argument("--samples", type=int, default=100, help="latency samples")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 jobs, 20 samples, once")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.samples, args.repeat = 300, 20, 1
    systems = [s for s in args.systems.split(",") if s]
    for system in systems:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")
    runnable = []
    for system in systems:
        why = available(system)
        if why:
            print(f"skipped {system}: {why}")
        else:
            runnable.append(system)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in runnable}
    pg = None
    if any("postgres" in s for s in runnable):
        from pgserver import TemporaryPostgres

        pg = TemporaryPostgres(durable=True)
        pg.start()
    try:
        for rep in range(args.repeat):
            for system in runnable:
                print(f"[{rep + 1}/{args.repeat}] {system} ...", flush=True)
                results[system].append(
                    asyncio.run(one(system, args.jobs, args.samples, pg.url if pg else None))
                )
    finally:
        if pg is not None:
            pg.stop()
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))  # fmt: skip
    return 0


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        f"jobs: {args.jobs} per throughput run, {args.samples} latency samples, "
        f"{args.repeat} repetition(s); median of repetitions (range)",
        "",
        "| system | jobs/s enqueue→done | enqueues/s | latency p50 | latency p95 |",
        "|---|---|---|---|---|",
    ]

    def cell(values: list[float], fmt: str) -> str:
        mid = statistics.median(values)
        if len(values) == 1:
            return format(mid, fmt)
        return f"{format(mid, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    failures = {s: sum(r.get("failed", 0) for r in runs) for s, runs in results.items()}
    for system, runs in results.items():
        if not runs:
            continue
        p50 = [1000 * statistics.median(r["latency"]) for r in runs]
        p95 = [1000 * statistics.quantiles(r["latency"], n=20)[18] for r in runs]
        lines.append(
            f"| {system} | {cell([r['throughput'] for r in runs], ',.0f')} | "
            f"{cell([r['enqueue_rate'] for r in runs], ',.0f')} | {cell(p50, '.1f')} ms | "
            f"{cell(p95, '.1f')} ms |"
        )
    for system, count in failures.items():
        if count:
            lines.append(f"\n{system}: {count} jobs failed (see the log above)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
