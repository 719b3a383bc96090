"""Dask worker kind: run offload tasks on a Dask ``distributed`` cluster (``offload[dask]``).

Only the manager's construction changes; tasks, priorities, deadlines and error codes stay
the same::

    >>> from offload import WorkerManager
    >>> from offload.dask import DaskKind
    >>> async def main():  # doctest: +SKIP
    ...     # development: a LocalCluster of 4 worker processes, started and stopped here
    ...     async with WorkerManager(kind="dask", workers=4) as wm:
    ...         print(await wm.run(pow, 2, 10, priority="high", timeout=5))
    ...     # production: an existing cluster (its size is the cluster's business)
    ...     async with WorkerManager(kind=DaskKind(address="tcp://scheduler:8786")) as wm:
    ...         print(await wm.execute_task({"type": "crypto:hash", "data": {"data": "x"}}))

How tasks map onto Dask:

* **asyncio only.** Dask's client runs on asyncio, so a Dask manager does too; started on trio
  it raises ``UnsupportedKind`` (``UNSUPPORTED_KIND``) before connecting to anything.
* **Admission stays with the manager.** The manager's dispatcher keeps the queue (``max_queue``
  and ``QUEUE_FULL``, strict high-normal-low order, fair shares, ``max_wait``); the Dask
  backend takes a task only while fewer than ``in_flight`` are in Dask's hands (by default the
  cluster's total threads, followed as workers come and go). What is handed over also carries
  a Dask priority (high 10, normal 0, low -10).
* **Deadlines and cancellation.** The caller gets ``TIMEOUT`` (or its cancellation) on time and
  the Dask future is released. **Dask cannot interrupt a task that is already running**: by
  default the call goes on in its Dask worker thread until it returns, and its result is
  dropped. With ``DaskKind(isolate=True)`` each call runs in a child process of the Dask worker
  (offload's own worker, the same code process workers run), which is killed when the task is
  stopped, so a deadline does stop the work. Cost: one extra pipe hop and copy of the
  arguments and result per task, one idle child process per busy Dask worker thread (started
  on first use, ~20-50 ms, then reused), and imports happen in that child.
* **Worker loss** gives ``WORKER_CRASHED``. Without ``isolate``, a task that kills its Dask
  worker (``os._exit``, a segfault, the OOM killer) is reported by Dask as ``KilledWorker``;
  the development cluster is created with ``distributed.scheduler.allowed-failures: 0`` so
  the first death fails the task. A cluster you pass in keeps its own setting (Dask's default
  3 retries the task on up to 3 more workers, killing each). With ``isolate=True`` only the
  child dies: the task fails at once, on any cluster, and the Dask worker lives on.
* **No progress events, no streams.** ``on_progress`` callbacks get no events from a Dask
  task, and ``wm.stream(...)`` fails with ``UNSUPPORTED_KIND`` (the backend says so with
  ``supports_progress = False``).
* **Code and data.** Tasks travel as offload's pickled ``(fn, args, kwargs)``; the functions
  must be importable on the Dask workers (install your package and offload there). The
  development cluster's workers share this machine's ``sys.path``. Arguments over 1 MiB are
  scattered to the cluster first instead of riding in the task graph.
* ``WorkerManager(workers=N)`` sizes the development cluster only; ``wm.worker_pids()`` lists
  its worker processes (nothing for a cluster you pass in); ``stats().workers`` counts Dask
  workers; ``wm.worker_statistics()`` is empty (Dask's dashboard has per-worker figures).
* A ``client``/``address`` you pass in is never closed or shut down by offload; a client that
  offload created (from ``address``) is closed, and the development cluster is shut down, when
  the manager shuts down.

Modules: ``_kind`` (``DaskKind`` and its options), ``_backend`` (the manager's side: admission,
submission, outcomes), ``_runner`` (runs one call in a Dask worker's thread), ``_isolated``
(runs one call in a killable child of the Dask worker, through offload's worker package).
"""

from ._kind import DaskKind

__all__ = ("DaskKind",)
