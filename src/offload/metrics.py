"""Prometheus metrics for a ``WorkerManager`` (``pip install '.[metrics]'``: prometheus_client).

>>> from prometheus_client import generate_latest
>>> from offload.metrics import OffloadCollector
>>> collector = OffloadCollector(wm)  # doctest: +SKIP
>>> REGISTRY.register(collector)  # doctest: +SKIP
>>> generate_latest()  # doctest: +SKIP

The collector reads ``wm.stats()`` and ``wm.worker_statistics()`` at each scrape (nothing is
counted twice, nothing runs between scrapes). Names follow Prometheus conventions: base units
(seconds, bytes), ``_total`` counters, histograms for wait and run time. Every series carries
the labels ``kind`` (process, interpreter, dask) and, if given, ``manager`` (a name of yours,
for several managers in one process).

==========================================  ==========  =====================================
metric                                      type        meaning
==========================================  ==========  =====================================
``offload_tasks_submitted_total``           counter     tasks accepted
``offload_tasks_rejected_total``            counter     refused at submit (QUEUE_FULL,
                                                        WOULD_TIME_OUT)
``offload_tasks_finished_total{outcome}``   counter     outcome: completed, failed, timed_out,
                                                        cancelled, crashed, shutdown
``offload_tasks_inline_total``              counter     ran on the event loop's thread
``offload_task_retries_total``              counter     retry attempts
``offload_tasks_queued{priority}``          gauge       waiting for a worker
``offload_tasks_running``                   gauge       held by workers
``offload_workers{state}``                  gauge       ready, spare
``offload_workers_min`` / ``_max``          gauge       the pool's bounds
``offload_worker_restarts_total``           counter     replaced after a crash, kill, quarantine
``offload_worker_recycles_total``           counter     replaced by policy
``offload_workers_started_total``           counter     started, ever
``offload_workers_retired_total``           counter     retired for being idle
``offload_task_wait_seconds``               histogram   submit to start
``offload_task_run_seconds``                histogram   run time in the worker
``offload_worker_tasks_done_total{worker}`` counter     per worker (also ``_failures_total``)
``offload_worker_busy{worker}``             gauge       1 while it runs a task
``offload_worker_current_task_seconds``     gauge       how long its current task has run
``offload_worker_resident_memory_bytes``    gauge       process workers
==========================================  ==========  =====================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        f"offload.metrics needs prometheus_client ({exc.name} is missing): pip install '.[metrics]'"
    ) from None

from ._stats import BUCKETS

if TYPE_CHECKING:
    from ._manager import WorkerManager

__all__ = ("OffloadCollector",)

_OUTCOMES = ("completed", "failed", "timed_out", "cancelled", "crashed", "shutdown")


class OffloadCollector(Collector):
    """A Prometheus collector for one manager (register it with a ``CollectorRegistry``)."""

    def __init__(self, manager: WorkerManager, *, name: str | None = None) -> None:
        self.manager = manager
        self.name = name

    def _labels(self) -> tuple[list[str], list[str]]:
        names, values = ["kind"], [self.manager.kind]
        if self.name is not None:
            names.append("manager")
            values.append(self.name)
        return names, values

    def collect(self) -> Iterator[Any]:
        stats = self.manager.stats()
        names, values = self._labels()

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, doc, labels=names)
            family.add_metric(values, value)
            return family

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield counter("offload_tasks_submitted", "Tasks accepted.", stats.submitted)
        yield counter("offload_tasks_rejected", "Tasks refused at submit.", stats.rejected)
        finished = CounterMetricFamily(
            "offload_tasks_finished", "Tasks that got their outcome.", labels=[*names, "outcome"]
        )
        for outcome in _OUTCOMES:
            finished.add_metric([*values, outcome], getattr(stats, outcome))
        yield finished
        yield counter("offload_tasks_inline", "Tasks run on the event loop's thread.", stats.inline)
        yield counter("offload_task_retries", "Retry attempts.", stats.retried)
        queued = GaugeMetricFamily(
            "offload_tasks_queued", "Tasks waiting for a worker.", labels=[*names, "priority"]
        )
        for priority in ("high", "normal", "low"):
            queued.add_metric([*values, priority], stats.queued_by_priority.get(priority, 0))
        yield queued
        yield gauge("offload_tasks_running", "Tasks held by workers.", stats.running)
        workers = GaugeMetricFamily("offload_workers", "Workers.", labels=[*names, "state"])
        workers.add_metric([*values, "ready"], stats.workers)
        workers.add_metric([*values, "spare"], stats.spares)
        yield workers
        yield gauge("offload_workers_min", "The pool's lower bound.", stats.min_workers)
        yield gauge("offload_workers_max", "The pool's upper bound.", stats.max_workers)
        yield counter(
            "offload_worker_restarts",
            "Workers replaced after a crash, a kill or a quarantine.",
            stats.worker_restarts,
        )
        yield counter(
            "offload_worker_recycles", "Workers replaced by policy.", stats.worker_recycles
        )
        yield counter("offload_workers_started", "Workers started.", stats.workers_started)
        yield counter(
            "offload_workers_retired", "Workers retired for being idle.", stats.workers_retired
        )
        yield _histogram(
            "offload_task_wait_seconds",
            "Seconds from submit to start.",
            names,
            values,
            stats.wait_buckets,
            stats.wait_sum,
        )
        yield _histogram(
            "offload_task_run_seconds",
            "Seconds a worker ran the task.",
            names,
            values,
            stats.run_buckets,
            stats.run_sum,
        )
        yield from self._per_worker(names, values)

    def _per_worker(self, names: list[str], values: list[str]) -> Iterator[Any]:
        labels = [*names, "worker"]
        done = CounterMetricFamily(
            "offload_worker_tasks_done", "Tasks a worker finished.", labels=labels
        )
        failures = CounterMetricFamily(
            "offload_worker_failures", "Tasks that failed on a worker.", labels=labels
        )
        busy = GaugeMetricFamily(
            "offload_worker_busy", "1 while the worker runs a task.", labels=labels
        )
        current = GaugeMetricFamily(
            "offload_worker_current_task_seconds",
            "How long the worker's current task has run.",
            labels=labels,
        )
        memory = GaugeMetricFamily(
            "offload_worker_resident_memory_bytes",
            "Resident memory of a process worker.",
            labels=labels,
        )
        for info in self.manager.worker_statistics():
            key = [*values, str(info.id)]
            done.add_metric(key, info.tasks_done)
            failures.add_metric(key, info.failures)
            busy.add_metric(key, 1.0 if info.state == "busy" else 0.0)
            current.add_metric(key, info.current_task_seconds)
            if info.rss is not None:
                memory.add_metric(key, info.rss)
        yield from (done, failures, busy, current, memory)


def _histogram(
    metric: str,
    doc: str,
    names: list[str],
    values: list[str],
    cumulative: tuple[int, ...],
    total: float,
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(metric, doc, labels=names)
    if not cumulative:
        cumulative = (0,) * len(BUCKETS)
    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in zip(BUCKETS, cumulative, strict=True)
    ]
    family.add_metric(values, buckets, total)
    return family
