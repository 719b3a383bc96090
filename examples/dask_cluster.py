"""Run offload tasks on a Dask cluster: the same calls as on local workers.

Run it with ``python examples/dask_cluster.py`` (needs ``pip install '.[dask]'`` from the
offload checkout). It starts a two-worker Dask ``LocalCluster`` to stand in for a real one,
then talks to it by address, as you would to ``tcp://scheduler:8786``. Only the manager's
construction names Dask; the tasks, priorities, deadlines and error codes are offload's.

On a real cluster, task functions must be importable on the Dask workers: put them in a
package installed there (with offload). This script's own ``stretch`` works here because
the local workers are started from this file.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from distributed import LocalCluster

import offload
from offload.dask import DaskKind


def stretch(text: str, rounds: int) -> str:
    """CPU-heavy and pure Python: module level, so workers import it by name."""
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


async def main() -> None:
    async with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, asynchronous=True, dashboard_address=":0"
    ) as cluster:
        address = cluster.scheduler_address
        print("dask scheduler:", address)

        # The one line that changes between local workers and a cluster:
        async with offload.WorkerManager(kind=DaskKind(address=address), max_queue=1000) as wm:
            digests = await asyncio.gather(
                *(wm.run(stretch, f"item {i}", 50_000, priority="low") for i in range(8)),
                wm.run(stretch, "urgent", 50_000, priority="high"),
            )
            print(f"{len(digests)} digests, the urgent one starts with {digests[-1][:12]}")

            token = await wm.execute_task(
                {"type": "jwt:sign", "data": {"claims": {"sub": "alice"}, "key": "k" * 32}}
            )
            print("jwt from a dask worker:", token.count(".") == 2)

            stats = wm.stats()
            print(
                f"dask workers: {stats.workers}, completed: {stats.completed}, "
                f"run p50: {stats.run_p50 * 1000:.1f} ms"
            )

        # Dask cannot interrupt a running call; isolate=True runs each call in a child
        # process of its Dask worker, killed when the deadline passes.
        isolated = DaskKind(address=address, isolate=True)
        async with offload.WorkerManager(kind=isolated) as wm:
            started = time.perf_counter()
            try:
                await wm.run(time.sleep, 30.0, timeout=0.5)
            except offload.TaskTimeout as exc:
                took = time.perf_counter() - started
                print(f"{exc.code} after {took:.2f} s, and the sleeping call was stopped")


if __name__ == "__main__":  # required: Dask starts its workers by re-importing this file
    asyncio.run(main())
