"""``offload top URL``: a live view of a manager's workers, read from an app's ``/workers`` route.

The route (``offload.asgi.workers_endpoint``, see ``examples/web_app.py``) answers the
manager's ``stats()`` and ``worker_statistics()`` as JSON. This view polls it (stdlib
``urllib``) and draws a table with rich when it is installed, plain lines otherwise. Ctrl-C
ends it.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from typing import Any

__all__ = ("run_top",)

_COLUMNS = (
    "id",
    "state",
    "pid",
    "tasks_done",
    "failures",
    "current_task_name",
    "current_task_seconds",
    "rss",
)


def _fetch(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def _rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for worker in data.get("workers", []):
        rss = worker.get("rss")
        rows.append(
            [
                str(worker.get("id")),
                str(worker.get("state")),
                str(worker.get("pid") or "-"),
                str(worker.get("tasks_done")),
                str(worker.get("failures")),
                str(worker.get("current_task_name") or "-"),
                f"{worker.get('current_task_seconds', 0.0):.1f} s"
                if worker.get("current_task_name")
                else "-",
                f"{rss / 2**20:.0f} MiB" if rss else "-",
            ]
        )
    return rows


def _summary(data: dict[str, Any]) -> str:
    s = data.get("stats", {})
    return (
        f"{s.get('kind')}: {s.get('workers')} workers ({s.get('spares')} spare), "
        f"{s.get('running')} running, {s.get('queued')} queued; completed {s.get('completed')}, "
        f"failed {s.get('failed')}, timed out {s.get('timed_out')}, rejected {s.get('rejected')}"
        f"; wait p99 {1000 * s.get('wait_p99', 0.0):.1f} ms, run p99 "
        f"{1000 * s.get('run_p99', 0.0):.1f} ms"
    )


def run_top(url: str, interval: float = 1.0, once: bool = False) -> int:
    """Poll ``url`` every ``interval`` seconds and show the workers; 0 on Ctrl-C, 1 on error."""
    try:
        from rich.live import Live
        from rich.table import Table

        have_rich = True
    except ImportError:  # rich comes with the web extra; without it, plain lines
        have_rich = False

    def table(data: dict[str, Any]) -> Any:
        view = Table(*_COLUMNS, title=_summary(data))
        for row in _rows(data):
            view.add_row(*row)
        return view

    try:
        data = _fetch(url, timeout=max(1.0, interval))
        if once or not have_rich or not sys.stdout.isatty():
            print(_summary(data))
            for row in _rows(data):
                print("  ".join(row))
            if once or not have_rich:
                return 0
        with Live(table(data), refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(table(_fetch(url, timeout=max(1.0, interval))))
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as exc:
        print(f"offload top: cannot read {url}: {exc}", file=sys.stderr)
        return 1
