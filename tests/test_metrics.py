"""Issue 15: ``offload.metrics`` exposes stats() and the per-worker statistics to Prometheus."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import tasks
from offload import WorkerManager
from offload.metrics import OffloadCollector

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_metrics_follow_the_managers_counters() -> None:
    registry = CollectorRegistry()
    async with WorkerManager(workers=2) as wm:
        registry.register(OffloadCollector(wm, name="api"))
        for i in range(5):
            await wm.run(tasks.add, i, 1)
        with pytest.raises(ValueError):
            await wm.run(tasks.boom)
        text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    base = (("kind", "process"), ("manager", "api"))
    assert samples[("offload_tasks_submitted_total", base)] == 6
    finished = dict(base + (("outcome", "completed"),))
    assert samples[("offload_tasks_finished_total", tuple(sorted(finished.items())))] == 5
    failed = dict(base + (("outcome", "failed"),))
    assert samples[("offload_tasks_finished_total", tuple(sorted(failed.items())))] == 1
    assert samples[("offload_task_run_seconds_count", base)] == 6
    assert families["offload_task_wait_seconds"].type == "histogram"
    done = [v for (name, _), v in samples.items() if name == "offload_worker_tasks_done_total"]
    assert sum(done) == 6
    memory = [
        v for (name, _), v in samples.items() if name == "offload_worker_resident_memory_bytes"
    ]
    assert memory and all(v > 0 for v in memory)
