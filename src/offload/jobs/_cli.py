"""``offload jobs ...``: run a worker, and look after the store from the command line.

::

    offload jobs work --store URL --queue emails --queue default --concurrency 8 \\
        [--once] [--import myapp.tasks] [--workers 4] [--lease 30] [--grace 30]
    offload jobs stats --store URL [--json]
    offload jobs failed --store URL [--queue Q] [--limit N] [--json]
    offload jobs retry ID --store URL
    offload jobs retry-all --store URL [--queue Q]
    offload jobs forget ID --store URL
    offload jobs purge --store URL [--queue Q] [--state done|failed|queued] [--older-than S]

``--store`` defaults to ``$OFFLOAD_JOBS_STORE``. ``work`` stops on SIGTERM or SIGINT: it
takes no new job, lets running ones finish within ``--grace`` seconds, hands the rest back
(queued again, the attempt not counted) and exits 0. Exit status 1: a store error, or an
unknown job id for ``retry``/``forget``; 2: bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from .._cli import OneLineParser, count, seconds
from ..errors import OffloadError
from ._model import FailedJob, JobStats
from ._queue import JobQueue

__all__ = ("add_parser", "main", "run")

log = logging.getLogger("offload.jobs")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``jobs`` (and its commands) to an ``argparse`` sub-parser set."""
    jobs = subparsers.add_parser(
        "jobs",
        help="durable background jobs: run a worker, list failed jobs, retry, stats",
        description=__doc__.split("::")[0].strip() if __doc__ else None,
    )
    configure(jobs)
    return jobs  # type: ignore[no-any-return]


def configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--store",
            default=os.environ.get("OFFLOAD_JOBS_STORE"),
            required="OFFLOAD_JOBS_STORE" not in os.environ,
            metavar="URL",
            help="sqlite:///path/jobs.db or postgresql://... (default: $OFFLOAD_JOBS_STORE)",
        )
        return sub

    work = command("work", "run jobs on a WorkerManager until SIGTERM (or drained, --once)")
    work.add_argument(
        "--queue",
        action="append",
        dest="queues",
        metavar="NAME",
        help="a queue to take jobs from, in order of preference (repeat; default: default)",
    )
    work.add_argument("--concurrency", type=count(1), default=8, help="jobs held at once (8)")
    work.add_argument("--once", action="store_true", help="run what is due, then exit")
    work.add_argument(
        "--import",
        action="append",
        dest="imports",
        default=[],
        metavar="MODULE",
        help="a module that registers task types with @offload.task (repeat)",
    )
    work.add_argument(
        "--workers", type=count(1), default=None, help="worker processes (default: by cores)"
    )
    work.add_argument(
        "--kind", default="process", choices=["process", "interpreter"], help="worker kind"
    )
    work.add_argument("--lease", type=seconds(), default=30.0, help="lease seconds (30)")
    work.add_argument(
        "--grace",
        type=seconds(strict=False),
        default=30.0,
        help="seconds to finish running jobs on SIGTERM (30)",
    )
    work.add_argument(
        "--health-interval",
        type=seconds(),
        default=30.0,
        help="ping idle worker processes this often (30 s: a host that waits for jobs most of "
        "the time stays under 1 %% of a core)",
    )
    work.add_argument(
        "--poll-interval",
        type=seconds(),
        default=30.0,
        help="look at the store at least this often (30 s)",
    )

    command("stats", "counts per queue and state, the oldest due job's age").add_argument(
        "--json", action="store_true", help="print JSON"
    )
    failed = command("failed", "list failed-job records, newest first")
    failed.add_argument("--queue", default=None)
    failed.add_argument("--limit", type=count(1), default=100)
    failed.add_argument("--json", action="store_true", help="print JSON (with tracebacks)")
    command("retry", "queue a failed job again").add_argument("id")
    command("retry-all", "queue every failed job again").add_argument("--queue", default=None)
    command("forget", "delete a job record (not a running one)").add_argument("id")
    purge = command("purge", "delete finished job records")
    purge.add_argument("--queue", default=None)
    purge.add_argument(
        "--state",
        action="append",
        choices=["done", "failed", "queued"],
        help="which records (repeat; default: done)",
    )
    purge.add_argument("--older-than", type=seconds(strict=False), default=None, metavar="SECONDS")


def main(argv: list[str] | None = None) -> int:
    """``python -m offload.jobs._cli ...`` (the same as ``offload jobs ...``)."""
    parser = OneLineParser(prog="offload jobs")
    configure(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Carry out the parsed ``offload jobs`` command; the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    handlers: dict[str, Callable[[JobQueue, argparse.Namespace], Awaitable[int]]] = {
        "work": _work,
        "stats": _stats,
        "failed": _failed,
        "retry": _retry,
        "retry-all": _retry_all,
        "forget": _forget,
        "purge": _purge,
    }
    handler = handlers[args.jobs_command]

    async def go() -> int:
        async with JobQueue(args.store, check_types=False) as jobs:
            return await handler(jobs, args)

    try:
        return anyio.run(go)
    except BaseException as raised:
        exc = raised
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # (raised inside a task group)
        if isinstance(exc, OffloadError | ValueError):
            print(f"offload jobs: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, OffloadError) else 2
        raise


async def _work(jobs: JobQueue, args: argparse.Namespace) -> int:
    from .._manager import WorkerManager

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # --import myapp.tasks from where the command runs
    for module in args.imports:
        importlib.import_module(module)
    queues = args.queues or ["default"]
    stop = anyio.Event()
    async with (
        WorkerManager(
            workers=args.workers, kind=args.kind, health_interval=args.health_interval
        ) as wm,
        anyio.create_task_group() as tg,
    ):
        work_scope = anyio.CancelScope()

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stop.is_set():  # the second one: hand running jobs back now
                        log.info("offload jobs: %s again: releasing running jobs now", name)
                        work_scope.cancel()
                    else:
                        log.info("offload jobs: %s: finishing (grace %.0f s)", name, args.grace)
                        stop.set()

        tg.start_soon(on_signal)
        log.info("offload jobs: working on %s from %s", ", ".join(queues), jobs.url)
        done = 0
        with work_scope:
            done = await jobs.work(
                wm,
                queues,
                concurrency=args.concurrency,
                once=args.once,
                lease=args.lease,
                grace=args.grace,
                poll_interval=args.poll_interval,
                stop=stop,
            )
        log.info("offload jobs: %d jobs done; exiting", done)
        tg.cancel_scope.cancel()
    return 0


async def _stats(jobs: JobQueue, args: argparse.Namespace) -> int:
    stats = await jobs.stats()
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        print(_stats_table(stats))
    return 0


def _stats_table(stats: JobStats) -> str:
    head = ("queue", "due", "delayed", "running", "done", "failed", "oldest due (s)")
    rows = [
        (
            name,
            str(q.due),
            str(q.delayed),
            str(q.running),
            str(q.done),
            str(q.failed),
            "" if q.oldest_due_age is None else f"{q.oldest_due_age:.1f}",
        )
        for name, q in stats.queues.items()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    for item in stats.unrunnable:
        lines.append(f"UNRUNNABLE {item.queue}/{item.type}: {item.count} jobs: {item.error}")
    return "\n".join(line.rstrip() for line in lines)


async def _failed(jobs: JobQueue, args: argparse.Namespace) -> int:
    records = await jobs.failed(args.queue, limit=args.limit)
    if args.json:
        print(json.dumps([_failed_dict(r) for r in records], indent=2))
        return 0
    for r in records:
        print(
            f"{r.failed_at:%Y-%m-%d %H:%M:%S}Z  {r.id}  {r.queue}  {r.type}  "
            f"attempts={r.attempts}  {r.error}"
        )
    if not records:
        print("no failed jobs")
    return 0


def _failed_dict(r: FailedJob) -> dict[str, Any]:
    return {
        "id": r.id,
        "queue": r.queue,
        "type": r.type,
        "data": r.data,
        "attempts": r.attempts,
        "retries": r.retries,
        "error_type": r.error_type,
        "error_code": r.error_code,
        "message": r.message,
        "traceback": r.traceback,
        "failed_at": r.failed_at.isoformat(),
    }


async def _retry(jobs: JobQueue, args: argparse.Namespace) -> int:
    if await jobs.retry(args.id):
        print(f"queued {args.id} again")
        return 0
    print(f"offload jobs: no failed job has the id {args.id!r}", file=sys.stderr)
    return 1


async def _retry_all(jobs: JobQueue, args: argparse.Namespace) -> int:
    print(f"queued {await jobs.retry_all(args.queue)} failed jobs again")
    return 0


async def _forget(jobs: JobQueue, args: argparse.Namespace) -> int:
    if await jobs.forget(args.id):
        print(f"forgot {args.id}")
        return 0
    print(f"offload jobs: no job (not running) has the id {args.id!r}", file=sys.stderr)
    return 1


async def _purge(jobs: JobQueue, args: argparse.Namespace) -> int:
    count = await jobs.purge(args.queue, state=args.state or ["done"], older_than=args.older_than)
    print(f"purged {count} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
