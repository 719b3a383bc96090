"""Per-task overhead and throughput: process workers vs a local Dask cluster, in one run.

Run it with ``python examples/dask_bench.py`` (``--tasks 2000 --concurrency 64 --rounds 300``).
Every setup gets the same number of workers (``--workers``, default 2) and runs the same
trivial task (``operator.add``), so the figures are the executor's own cost:

* overhead: the median round trip of one task awaited on its own (``--rounds`` of them);
* throughput: ``--tasks`` tasks through the manager with ``--concurrency`` awaited at once.

Setups: ``process`` (offload's process workers); ``dask`` (``WorkerManager(kind="dask")``:
a LocalCluster, and Dask gets a task only when a thread is free); ``dask in_flight=N`` (as
many tasks handed to Dask as are awaited at once, Dask queues them); ``dask isolate`` (each
call in a child process of its Dask worker); ``distributed alone`` (``client.submit`` on the
same kind of LocalCluster, without offload): the floor under offload's Dask kind.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import statistics
import time
from collections.abc import Callable

import offload
from offload.dask import DaskKind


async def measure(
    make: Callable[[], offload.WorkerManager], rounds: int, tasks: int, concurrency: int
) -> tuple[float, float]:
    """(median round trip in ms, tasks per second) for one setup."""
    async with make() as wm:
        await asyncio.gather(*(wm.run(operator.add, i, 1) for i in range(50)))  # warm up
        trips = []
        for i in range(rounds):
            started = time.perf_counter()
            await wm.run(operator.add, i, 1)
            trips.append(time.perf_counter() - started)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with gate:
                return await wm.run(operator.add, i, 1)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(tasks)))
        elapsed = time.perf_counter() - started
        assert results == [i + 1 for i in range(tasks)]
    return statistics.median(trips) * 1000, tasks / elapsed


async def measure_distributed(
    workers: int, rounds: int, tasks: int, concurrency: int
) -> tuple[float, float]:
    """The same loops on ``distributed`` directly: ``await client.submit(operator.add, ...)``."""
    from distributed import Client, LocalCluster

    async with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            asynchronous=True,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster, asynchronous=True, set_as_default=False) as client,
    ):
        await asyncio.gather(*(client.submit(operator.add, i, 1, pure=False) for i in range(50)))
        trips = []
        for i in range(rounds):
            started = time.perf_counter()
            await client.submit(operator.add, i, 1, pure=False)
            trips.append(time.perf_counter() - started)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> int:
            async with gate:
                result: int = await client.submit(operator.add, i, 1, pure=False)
                return result

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(tasks)))
        elapsed = time.perf_counter() - started
        assert results == [i + 1 for i in range(tasks)]
    return statistics.median(trips) * 1000, tasks / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    n = args.workers
    queue = args.tasks + args.concurrency
    setups: dict[str, Callable[[], offload.WorkerManager]] = {
        "process": lambda: offload.WorkerManager(workers=n, max_queue=queue),
        "dask": lambda: offload.WorkerManager(kind="dask", workers=n, max_queue=queue),
        f"dask in_flight={args.concurrency}": lambda: offload.WorkerManager(
            kind=DaskKind(in_flight=args.concurrency), workers=n, max_queue=queue
        ),
        "dask isolate": lambda: offload.WorkerManager(
            kind=DaskKind(isolate=True), workers=n, max_queue=queue
        ),
    }
    print(f"{n} workers; {args.tasks} tasks, {args.concurrency} in flight; trivial task\n")
    print("| setup | overhead (median round trip) | throughput |")
    print("|---|---:|---:|")
    for name, make in setups.items():
        overhead, rate = await measure(make, args.rounds, args.tasks, args.concurrency)
        print(f"| {name} | {overhead:.2f} ms | {rate:,.0f} tasks/s |", flush=True)
    overhead, rate = await measure_distributed(n, args.rounds, args.tasks, args.concurrency)
    print(f"| distributed alone | {overhead:.2f} ms | {rate:,.0f} tasks/s |", flush=True)


if __name__ == "__main__":  # required: Dask starts its workers by re-importing this file
    asyncio.run(main())
