"""``offload demo``: a small web app under a steady load, three ways, side by side.

The demo starts a Starlette app with uvicorn on 127.0.0.1 (a child process) and sends it, for
a few seconds per mode, a fixed schedule of requests, evenly spaced: cheap requests (a signed
session-token check, microseconds, done on the event loop) and logins that hash a password
(scrypt, tens of milliseconds of CPU). Logins come at 1.5 times the rate one CPU core can hash
them, so the server is overloaded on purpose. Each login should be answered within a deadline
(1 s). The three modes:

* ``inline``: the login handler hashes on the event loop, as naive code does;
* ``offloaded (FIFO)``: logins go to an offload ``WorkerManager`` whose queue is bounded by a
  count, in arrival order (offload's behaviour before deadline-aware admission);
* ``offloaded (admission)``: the same manager with fair share and ``max_wait``: a login that
  could not start within ``max_wait`` is refused at once with 503 and ``Retry-After``.

The table shows the cheap requests' latency, the server's event-loop lag, and what became of
the logins: answered, hashes per second, answered within the deadline, refused, how fast a
refusal came::

    $ offload demo                  # about 25 s; --seconds N per mode, --json PATH

Nothing leaves the machine: the server listens on 127.0.0.1 and the load comes from this
process. Needs the ``web`` extra (from a checkout: ``pip install '.[web]'``); rich, if
installed, draws the progress bars and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import anyio

from .._cli import OneLineParser, count, seconds, share
from ._child import Server, demo_server
from ._http import HttpClient, Outcome, Request, drive, evenly, percentile

__all__ = (
    "DemoResult",
    "Settings",
    "add_arguments",
    "main",
    "run_demo",
    "run_from_args",
)

WEB_HINT: Final = (
    "offload demo needs the web extra; from the offload checkout: pip install '.[web]'"
)
MODES: Final = ("inline", "fifo", "admission")
TITLES: Final = {
    "inline": "inline",
    "fifo": "offloaded (FIFO)",
    "admission": "offloaded (admission)",
}
SCRYPT: Final = {"n": 2**14, "r": 8, "p": 2}  # 16 MiB, tens of ms: a light but real hash
PASSWORD_BODY: Final = b'{"password": "correct horse battery staple"}'
CLIENT_TIMEOUT: Final = 15.0  # seconds a request may take before the client gives up
DESCRIPTION: Final = (
    "A small web app on 127.0.0.1 under a steady load of cheap requests and password-hashing "
    "logins (1.5x what one CPU core can hash), three ways: hashes inline on the event loop; "
    "offloaded to a WorkerManager with a FIFO queue bounded by a count; offloaded with fair "
    "share and deadline-aware admission (max_wait), which refuses what could not start in "
    "time with a fast 503. Prints one table side by side; takes about 25 s. --local runs a "
    "narrated mixed workload on local process workers instead. Nothing leaves the machine."
)


@dataclass(frozen=True)
class Settings:
    """The demo's knobs (see ``offload demo --help``)."""

    seconds: float = 5.0
    cheap_rate: float = 100.0
    load: float = 1.5
    workers: int | None = None
    max_queue: int = 64
    max_wait: float = 0.5
    deadline: float = 1.0
    #: The same CPU priority as the server's: on a machine shared with other busy processes,
    #: the library's default (10) gives the workers less CPU than the inline event loop gets,
    #: and the comparison would measure that rather than offloading (see the README).
    worker_nice: int = 0


@dataclass(frozen=True)
class PhaseResult:
    """One mode's figures; times in milliseconds, as the client saw them."""

    mode: str
    cheap_sent: int
    cheap_p50_ms: float
    cheap_p99_ms: float
    cheap_refused: int
    loop_lag_p99_ms: float
    logins_sent: int
    logins_ok: int
    hashes_per_s: float
    logins_in_time: int
    login_p50_ms: float
    login_p99_ms: float
    logins_refused: int
    logins_dropped: int
    refusal_p99_ms: float | None  #: None: nothing was refused
    retry_after: str
    failed: int


@dataclass(frozen=True)
class DemoResult:
    """The whole run: its settings, the machine, and one ``PhaseResult`` per mode."""

    seconds: float
    cheap_rate: float
    login_rate: float
    load: float
    hash_ms: float
    workers: int
    max_queue: int
    max_wait: float
    deadline: float
    worker_nice: int
    cpu_count: int
    python: str
    phases: tuple[PhaseResult, ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["phases"] = {phase.mode: asdict(phase) for phase in self.phases}
        return data


def spec_for(settings: Settings) -> dict[str, Any]:
    """The server's spec: one route pair per mode (see ``offload.demo._server``)."""
    base: dict[str, Any] = {
        "max_queue": settings.max_queue,
        "shutdown_grace": 2,
        "worker_nice": settings.worker_nice,
    }
    if settings.workers is not None:
        base["workers"] = settings.workers
    return {
        "token": "hmac",
        "scrypt": SCRYPT,
        "modes": {
            "inline": None,
            "fifo": {"manager": {**base, "scheduling": "fifo"}, "cheap": "inline"},
            "admission": {
                "manager": {**base, "scheduling": "fair", "max_wait": settings.max_wait},
                "cheap": "inline",
            },
        },
    }


def schedule_for(
    mode: str, token: str, seconds: float, cheap_rate: float, login_rate: float
) -> list[Request]:
    """Cheap requests and logins, each kind evenly spaced, merged by due time."""
    auth = (("authorization", f"Bearer {token}"),)
    cheap = [
        Request(at, "cheap", "GET", f"/cheap/{mode}", None, auth)
        for at in evenly(cheap_rate, seconds)
    ]
    heavy = [
        Request(at, "login", "POST", f"/heavy/{mode}", PASSWORD_BODY)
        for at in evenly(login_rate, seconds, offset=0.5)
    ]
    return sorted(cheap + heavy, key=lambda request: request.at)


# -- progress -------------------------------------------------------------------------------


class Progress(Protocol):
    def phase(self, mode: str, total: int) -> None: ...
    def update(self, mode: str, answered: int, refused: int) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """A line per mode on stderr."""

    def phase(self, mode: str, total: int) -> None:
        print(f"{TITLES[mode]}: {total} requests...", file=sys.stderr, flush=True)

    def update(self, mode: str, answered: int, refused: int) -> None:
        pass

    def close(self) -> None:
        pass


class RichProgress:
    """rich progress bars on stderr, one per mode."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            TextColumn(
                "{task.completed:>5}/{task.total} answered  {task.fields[refused]:>4} x 503"
            ),
            console=Console(stderr=True),
        )
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def phase(self, mode: str, total: int) -> None:
        self._tasks[mode] = self._progress.add_task(TITLES[mode], total=total, refused=0)

    def update(self, mode: str, answered: int, refused: int) -> None:
        self._progress.update(self._tasks[mode], completed=answered, refused=refused)

    def close(self) -> None:
        self._progress.stop()


class NoProgress:
    def phase(self, mode: str, total: int) -> None:
        pass

    def update(self, mode: str, answered: int, refused: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(enabled: bool) -> Progress:
    if not enabled:
        return NoProgress()
    try:
        return RichProgress()
    except ImportError:
        return PlainProgress()


# -- running ----------------------------------------------------------------------------------


def summarise(
    mode: str, outcomes: Sequence[Outcome], lag_p99_ms: float, deadline: float
) -> PhaseResult:
    """One mode's figures from its outcomes."""
    cheap = [o for o in outcomes if o.kind == "cheap"]
    logins = [o for o in outcomes if o.kind == "login"]
    cheap_ok = [o.latency for o in cheap if o.status == 200]
    ok = [o for o in logins if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    login_refused = [o for o in logins if o.status == 503]
    # Heavy work per second: answered logins over the time until the last one was answered
    # (a backlog that drains after the load stops counts, and so does its time).
    span = max((o.at + o.latency for o in ok), default=0.0)
    return PhaseResult(
        mode=mode,
        cheap_sent=len(cheap),
        cheap_p50_ms=round(percentile(cheap_ok, 0.50) * 1000, 1),
        cheap_p99_ms=round(percentile(cheap_ok, 0.99) * 1000, 1),
        cheap_refused=sum(o.status == 503 for o in cheap),
        loop_lag_p99_ms=round(lag_p99_ms, 1),
        logins_sent=len(logins),
        logins_ok=len(ok),
        hashes_per_s=round(len(ok) / span, 1) if span else 0.0,
        logins_in_time=sum(o.latency <= deadline for o in ok),
        login_p50_ms=round(percentile([o.latency for o in ok], 0.50) * 1000, 1),
        login_p99_ms=round(percentile([o.latency for o in ok], 0.99) * 1000, 1),
        logins_refused=len(login_refused),
        logins_dropped=sum(o.status == 504 for o in logins),
        refusal_p99_ms=(
            round(percentile([o.latency for o in refused], 0.99) * 1000, 1) if refused else None
        ),
        retry_after=",".join(sorted({o.retry_after or "-" for o in login_refused})),
        failed=sum(o.status not in (200, 503, 504) for o in outcomes),
    )


async def run_phase(
    server: Server, mode: str, settings: Settings, login_rate: float, shown: Progress
) -> PhaseResult:
    schedule = schedule_for(mode, server.token, settings.seconds, settings.cheap_rate, login_rate)
    shown.phase(mode, len(schedule))
    counts = {"answered": 0, "refused": 0}

    def note(outcome: Outcome) -> None:
        counts["answered"] += 1
        counts["refused"] += outcome.status == 503
        shown.update(mode, counts["answered"], counts["refused"])

    await HttpClient.get_json(server.url, "/_demo/stats")  # resets the lag samples
    outcomes = await drive(server.url, schedule, timeout=CLIENT_TIMEOUT, on_outcome=note)
    stats = await HttpClient.get_json(server.url, "/_demo/stats")
    return summarise(mode, outcomes, float(stats["lag_p99_ms"]), settings.deadline)


async def run_demo(settings: Settings = Settings(), *, progress: bool = True) -> DemoResult:
    """Start the demo server, run the three modes one after another, return the figures.

    Raises ``RuntimeError`` if the server does not start.
    """
    from .._config import default_workers

    shown = make_progress(progress)
    phases = []
    try:
        async with demo_server(spec_for(settings)) as server:
            login_rate = settings.load / server.hash_seconds
            warm_up = HttpClient(server.url)  # connections, imports in the workers
            try:
                for mode in MODES:
                    await warm_up.request("POST", f"/heavy/{mode}", PASSWORD_BODY)
            finally:
                await warm_up.close()
            for mode in MODES:
                phases.append(await run_phase(server, mode, settings, login_rate, shown))
                await anyio.sleep(0.2)  # let the workers' last answers settle
    finally:
        shown.close()
    return DemoResult(
        seconds=settings.seconds,
        cheap_rate=settings.cheap_rate,
        login_rate=round(login_rate, 1),
        load=settings.load,
        hash_ms=round(server.hash_seconds * 1000, 1),
        workers=settings.workers if settings.workers is not None else default_workers(),
        max_queue=settings.max_queue,
        max_wait=settings.max_wait,
        deadline=settings.deadline,
        worker_nice=settings.worker_nice,
        cpu_count=os.cpu_count() or 1,
        python=platform.python_version(),
        phases=tuple(phases),
    )


# -- output -----------------------------------------------------------------------------------

#: (label, field, format, what it means): every line of the table, explained in one phrase.
ROWS: Final = (
    (
        "cheap requests p50 (ms)",
        "cheap_p50_ms",
        "{:,.1f}",
        "half of the token checks took less than this",
    ),
    (
        "cheap requests p99 (ms)",
        "cheap_p99_ms",
        "{:,.1f}",
        "99 in 100 token checks took less than this",
    ),
    (
        "event-loop lag p99 (ms)",
        "loop_lag_p99_ms",
        "{:,.1f}",
        "how late a 5 ms timer fired: the server served no one",
    ),
    (
        "logins answered",
        "logins_ok",
        "{:,d}",
        "logins that got their hash (200), late or not, of {logins} sent",
    ),
    (
        "password hashes/s",
        "hashes_per_s",
        "{:,.1f}",
        "answered logins per second, until the last answer",
    ),
    (
        "logins within {deadline:g} s",
        "logins_in_time",
        "{:,d}",
        "answered while the user was still waiting: the useful work",
    ),
    (
        "login p50 (ms)",
        "login_p50_ms",
        "{:,.0f}",
        "time to a login's answer (200), from when it was due",
    ),
    (
        "login p99 (ms)",
        "login_p99_ms",
        "{:,.0f}",
        "the slowest: waiting behind others, on the loop or in the queue",
    ),
    (
        "logins refused (503)",
        "logins_refused",
        "{:,d}",
        "turned away at once, with Retry-After: over capacity",
    ),
    (
        "503 answer p99 (ms)",
        "refusal_p99_ms",
        "{:,.1f}",
        "how fast a refusal came, so the client can retry elsewhere",
    ),
    (
        "logins dropped (504)",
        "logins_dropped",
        "{:,d}",
        "accepted, then dropped: could no longer start in time",
    ),
    ("no answer or error", "failed", "{:,d}", f"failed, or no answer within {CLIENT_TIMEOUT:g} s"),
)


def describe(result: DemoResult) -> str:
    return (
        f"{result.seconds:g} s per mode: {result.cheap_rate:g} cheap requests/s and "
        f"{result.login_rate:g} logins/s ({result.load:g}x one core: a scrypt "
        f"n=2^{SCRYPT['n'].bit_length() - 1} hash takes {result.hash_ms:g} ms here), evenly "
        f"spaced; {result.workers} worker(s) at nice {result.worker_nice}, "
        f"max_queue={result.max_queue}, admission with max_wait={result.max_wait:g} s; "
        f"Python {result.python}, {result.cpu_count} CPU(s)"
    )


def _label(label: str, result: DemoResult) -> str:
    return label.format(deadline=result.deadline)


def _cell(fmt: str, value: object) -> str:
    return "-" if value is None else fmt.format(value)


def table_rows(result: DemoResult) -> list[tuple[str, ...]]:
    by_mode = {phase.mode: asdict(phase) for phase in result.phases}
    return [
        (_label(label, result), *(_cell(fmt, by_mode[mode][key]) for mode in MODES))
        for label, key, fmt, _ in ROWS
    ]


def legend(result: DemoResult) -> list[str]:
    """One line per table row: what it means."""
    logins = result.phases[0].logins_sent if result.phases else 0
    return [
        f"{_label(label, result)}: {meaning.format(logins=logins)}" for label, _, _, meaning in ROWS
    ]


def render_plain(result: DemoResult) -> str:
    """The table as plain text."""
    header = ("", *(TITLES[mode] for mode in MODES))
    rows = [header, *table_rows(result)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def summary(result: DemoResult) -> str:
    """What the table says, in two sentences drawn from its figures."""
    inline, fifo, admission = (
        next(phase for phase in result.phases if phase.mode == mode) for mode in MODES
    )
    rates = f"{fifo.hashes_per_s:g} vs {inline.hashes_per_s:g} hashes/s"
    if fifo.hashes_per_s >= 1.05 * inline.hashes_per_s:
        work = f"and more heavy work done ({rates})"
    elif fifo.hashes_per_s >= 0.95 * inline.hashes_per_s:
        work = f"and as much heavy work done ({rates})"
    else:
        work = f"but less heavy work done here ({rates}: the workers got less CPU)"
    if admission.logins_refused:
        refused = (
            f"{admission.logins_refused} refused in {admission.refusal_p99_ms:,.0f} ms (p99) "
            "with Retry-After"
        )
    else:
        refused = "none refused"
    return (
        f"Offloaded, the event loop stays free: cheap-request p99 {inline.cheap_p99_ms:,.0f} ms "
        f"inline -> {fifo.cheap_p99_ms:,.0f} ms, {work}. With admission, "
        f"{admission.logins_in_time} of {admission.logins_ok} answered logins came within "
        f"{result.deadline:g} s (FIFO: {fifo.logins_in_time} of {fifo.logins_ok}); {refused}, "
        f"{admission.logins_dropped} dropped unstarted."
    )


def print_result(result: DemoResult) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(describe(result))
        print(render_plain(result))
        print("\n".join(legend(result)))
        print(summary(result))
        return
    table = Table(title="offload demo: the same load, three ways")
    table.add_column("")
    for mode in MODES:
        table.add_column(TITLES[mode], justify="right")
    for row in table_rows(result):
        table.add_row(*row)
    console = Console()
    console.print(describe(result), highlight=False)
    console.print(table)
    console.print("\n".join(legend(result)), highlight=False)
    console.print(summary(result), highlight=False)


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The web demo's options, for ``offload demo``'s parser."""
    defaults = Settings()
    parser.add_argument(
        "--seconds",
        type=seconds(high=600),
        default=defaults.seconds,
        help=f"seconds of load per mode (default {defaults.seconds:g})",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, default=None, help="also write the figures as JSON"
    )
    parser.add_argument(
        "--rate",
        type=share(0, 2000, "requests per second"),
        default=defaults.cheap_rate,
        help=f"cheap requests per second (default {defaults.cheap_rate:g})",
    )
    parser.add_argument(
        "--load",
        type=share(0, 20, "a multiple"),
        default=defaults.load,
        help="logins per second, as a multiple of what one CPU core can hash "
        f"(default {defaults.load:g}: overloaded)",
    )
    parser.add_argument(
        "--workers",
        type=count(1, 1024),
        default=None,
        help="offload workers (default: the library's, one per spare CPU core)",
    )
    parser.add_argument(
        "--max-queue",
        type=count(0),
        default=defaults.max_queue,
        help=f"tasks that may wait for a worker in both offloaded modes "
        f"(default {defaults.max_queue})",
    )
    parser.add_argument(
        "--max-wait",
        type=seconds(),
        default=defaults.max_wait,
        help=f"admission: the longest a login may wait to start (default {defaults.max_wait:g})",
    )
    parser.add_argument(
        "--deadline",
        type=seconds(),
        default=defaults.deadline,
        help=f"a login answered later than this counts as late (default {defaults.deadline:g})",
    )
    parser.add_argument(
        "--worker-nice",
        type=count(0, 19),
        default=defaults.worker_nice,
        help="how much lower the workers' CPU priority is than the server's (default "
        f"{defaults.worker_nice}; the library's default is 10)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def missing_web_extra() -> str | None:
    """The first missing module of the ``web`` extra, if any (the demo itself needs only
    Starlette and uvicorn, but the extra is what the hint tells to install)."""
    for module in ("starlette", "uvicorn", "httpx"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


def busy_note() -> str | None:
    """A warning when other processes keep the CPUs busy (the figures will be noisy)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    if load < 0.5 * cpus:
        return None
    return (
        f"offload demo: note: the machine is busy already (load average {load:.1f} on {cpus} "
        "CPU(s)); other processes take CPU from the demo, and its figures will be noisy"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``add_arguments`` options; the process exit status."""
    missing = missing_web_extra()
    if missing is not None:
        print(f"{WEB_HINT} ({missing} is missing)", file=sys.stderr)
        return 2
    settings = Settings(
        seconds=args.seconds,
        cheap_rate=args.rate,
        load=args.load,
        workers=args.workers,
        max_queue=args.max_queue,
        max_wait=args.max_wait,
        deadline=args.deadline,
        worker_nice=args.worker_nice,
    )
    busy = busy_note()
    if busy:
        print(busy, file=sys.stderr)
    started = time.perf_counter()
    try:
        result = anyio.run(lambda: run_demo(settings, progress=not args.no_progress))
    except KeyboardInterrupt:
        print("offload demo: interrupted; the server and its workers are stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"offload demo: {exc}", file=sys.stderr)
        return 1
    print_result(result)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``offload demo [--seconds N] [--json PATH] ...``; returns the exit status."""
    parser = OneLineParser(prog="offload demo", description=DESCRIPTION)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
