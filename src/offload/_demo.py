"""``offload demo``: a web app under mixed load, heavy work inline vs offloaded, side by side.

The demo starts a small Starlette app with uvicorn on 127.0.0.1 (a child process), then
drives it from this process for a few seconds per mode with many concurrent clients. One
request in ten is a login that hashes a password (scrypt, tens of milliseconds of CPU); the
others are a cheap ``/ping``. First the hash runs *inline*, in the request handler on the
event loop, as naive code does; then it is *offloaded* to an offload ``WorkerManager``.
The table compares requests/s, the latency of the cheap requests (p50, p99), the server's
event-loop lag (p99) and the queue's 503 rejections::

    $ offload demo                 # ~15 s; --seconds N per mode, --json PATH for the numbers

Nothing leaves the machine: the server listens on 127.0.0.1 and the client ignores proxy
settings. Needs the ``web`` extra (``pip install 'offload[web]'``); rich, if installed,
draws the progress bars and the table.

>>> from offload._demo import main
>>> main(["--seconds", "2", "--json", "demo.json"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ("DemoResult", "add_arguments", "main", "run_demo", "run_from_args")

WEB_HINT: Final = "offload demo needs the web extra: pip install 'offload[web]'"
MODES: Final = ("inline", "offloaded")
PASSWORD: Final = "correct horse battery staple"
SCRYPT_N: Final = 2**14  # 16 MiB, tens of milliseconds: a light but real password hash
LAG_INTERVAL: Final = 0.005  # the server's event-loop lag probe period (seconds)
START_TIMEOUT: Final = 60.0  # for the server to come up (workers included)
STOP_TIMEOUT: Final = 15.0


@dataclass(frozen=True)
class PhaseResult:
    """One mode's numbers. Latencies in milliseconds, measured by the client."""

    mode: str
    seconds: float
    requests: int
    requests_per_s: float
    cheap_p50_ms: float
    cheap_p99_ms: float
    heavy_done: int
    heavy_p50_ms: float
    loop_lag_p99_ms: float
    rejected_503: int
    errors: int


@dataclass(frozen=True)
class DemoResult:
    """The whole run: its settings and one ``PhaseResult`` per mode."""

    seconds: float
    concurrency: int
    heavy_share: float
    workers: int
    max_queue: int
    cpu_count: int
    python: str
    phases: tuple[PhaseResult, ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["phases"] = {phase.mode: asdict(phase) for phase in self.phases}
        return data


# -- the server (a child process) -----------------------------------------------------------


class LagProbe:
    """Measures event-loop lag: how late a ``sleep(LAG_INTERVAL)`` wakes up."""

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=100_000)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            self.samples.append(max(0.0, loop.time() - started - LAG_INTERVAL))

    def take(self) -> list[float]:
        samples = list(self.samples)
        self.samples.clear()
        return samples


def build_app(*, workers: int | None, max_queue: int, announce_port: int | None) -> Starlette:
    """The demo app: ``/ping``, ``/login/inline``, ``/login/offloaded``, ``/_demo/stats``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from . import builtins
    from .asgi import handle_offload_error, lifespan
    from .errors import OffloadError
    from .tasks import hash_password

    probe = LagProbe()

    @asynccontextmanager
    async def demo_lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(probe.run())
        if announce_port is not None:  # the workers are ready: tell the parent
            print(f"READY {announce_port}", flush=True)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def ping(request: Request) -> Response:
        return JSONResponse({"pong": True})

    async def login_inline(request: Request) -> Response:
        body = await request.json()
        stored = hash_password(body["password"], n=SCRYPT_N)  # blocks the event loop
        return JSONResponse({"ok": stored.startswith("$scrypt$")})

    async def login_offloaded(request: Request) -> Response:
        body = await request.json()
        stored = await builtins.hash_password(request.state.workers, body["password"], n=SCRYPT_N)
        return JSONResponse({"ok": stored.startswith("$scrypt$")})

    async def stats(request: Request) -> Response:
        lag = probe.take()
        manager = request.state.workers.stats()
        return JSONResponse(
            {
                "lag_p99_ms": percentile(lag, 0.99) * 1000,
                "lag_samples": len(lag),
                "rejected": manager.rejected,
                "workers": manager.workers,
            }
        )

    return Starlette(
        routes=[
            Route("/ping", ping),
            Route("/login/inline", login_inline, methods=["POST"]),
            Route("/login/offloaded", login_offloaded, methods=["POST"]),
            Route("/_demo/stats", stats),
        ],
        lifespan=lifespan(demo_lifespan, workers=workers, max_queue=max_queue, shutdown_grace=2),
        exception_handlers={OffloadError: handle_offload_error},
    )


def serve(*, workers: int | None, max_queue: int, watch_stdin: bool = False) -> None:
    """Run the demo app on a free 127.0.0.1 port; print ``READY <port>`` once it is up.

    With ``watch_stdin``, the end of stdin (the parent is gone, even killed) stops the
    server as SIGTERM would: no orphan server, no orphan workers.
    """
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    app = build_app(workers=workers, max_queue=max_queue, announce_port=sock.getsockname()[1])
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, ws="none")
    server = uvicorn.Server(config)

    async def run() -> None:
        if watch_stdin:
            loop = asyncio.get_running_loop()
            stdin = sys.stdin.fileno()

            def on_stdin() -> None:
                if not os.read(stdin, 4096):  # EOF: the parent closed it or died
                    loop.remove_reader(stdin)
                    server.should_exit = True

            loop.add_reader(stdin, on_stdin)
        await server.serve(sockets=[sock])

    asyncio.run(run())


def _server_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload._demo --serve")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--watch-stdin", action="store_true")
    args = parser.parse_args(argv)
    serve(workers=args.workers, max_queue=args.max_queue, watch_stdin=args.watch_stdin)
    return 0


# -- the load generator (this process) ------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``0.0`` for no samples)."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Progress(Protocol):
    def phase(self, mode: str, seconds: float) -> None: ...
    def update(self, mode: str, elapsed: float, requests: int, rejected: int) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """One line per second on stderr."""

    def __init__(self) -> None:
        self._last = -1

    def phase(self, mode: str, seconds: float) -> None:
        self._last = -1
        print(f"{mode}: {seconds:g} s of mixed load...", file=sys.stderr, flush=True)

    def update(self, mode: str, elapsed: float, requests: int, rejected: int) -> None:
        if int(elapsed) > self._last:
            self._last = int(elapsed)
            line = f"  {mode:<9} {elapsed:4.1f} s  {requests:6d} requests  {rejected:5d} x 503"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """rich progress bars on stderr, one per mode."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.fields[requests]:>6} requests  {task.fields[rejected]:>5} x 503"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def phase(self, mode: str, seconds: float) -> None:
        self._tasks[mode] = self._progress.add_task(mode, total=seconds, requests=0, rejected=0)

    def update(self, mode: str, elapsed: float, requests: int, rejected: int) -> None:
        self._progress.update(
            self._tasks[mode], completed=elapsed, requests=requests, rejected=rejected
        )

    def close(self) -> None:
        self._progress.stop()


class NoProgress:
    def phase(self, mode: str, seconds: float) -> None:
        pass

    def update(self, mode: str, elapsed: float, requests: int, rejected: int) -> None:
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


class HttpClient:
    """A minimal HTTP/1.1 keep-alive client for the load generator.

    Why not httpx: it spends about 2 ms of CPU per request here against 0.1 ms for this, and
    on a small machine the load generator shares the CPUs with the server it measures. It
    speaks just enough HTTP for the demo's own server (responses with a Content-Length).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request; its status and body. Raises ``OSError`` or ``EOFError``."""
        try:
            return await self._exchange(method, path, body)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await self.close()
            raise EOFError(f"{method} {path}: the connection failed") from None

    async def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        content = await self._reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    @classmethod
    async def get_json(cls, url: str, path: str) -> Any:
        """``GET path`` on a connection of its own (an idle one may have been closed)."""
        client = cls(url)
        try:
            status, content = await client.request("GET", path)
        finally:
            await client.close()
        if status != 200:
            raise EOFError(f"GET {path}: HTTP {status}")
        return json.loads(content)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def drive(
    url: str,
    mode: str,
    *,
    seconds: float,
    concurrency: int,
    heavy_every: int,
    progress: Progress,
) -> PhaseResult:
    """``concurrency`` clients in a closed loop for ``seconds``; every ``heavy_every``-th
    request (counted over all clients) is a login, the others are pings."""
    await HttpClient.get_json(url, "/_demo/stats")  # resets the lag samples
    before = (await HttpClient.get_json(url, "/_demo/stats"))["rejected"]
    counter = itertools.count()
    cheap: list[float] = []
    heavy: list[float] = []
    counts = {"requests": 0, "rejected": 0, "errors": 0}
    login = json.dumps({"password": PASSWORD}).encode()
    progress.phase(mode, seconds)
    started = time.perf_counter()
    deadline = started + seconds

    async def client_loop() -> None:
        client = HttpClient(url)
        try:
            while time.perf_counter() < deadline:
                is_heavy = next(counter) % heavy_every == heavy_every - 1
                sent = time.perf_counter()
                try:
                    async with asyncio.timeout(60):
                        if is_heavy:
                            status, _ = await client.request("POST", f"/login/{mode}", login)
                        else:
                            status, _ = await client.request("GET", "/ping")
                except (EOFError, TimeoutError):
                    counts["errors"] += 1
                    continue
                took = time.perf_counter() - sent
                counts["requests"] += 1
                if status == 503:
                    counts["rejected"] += 1
                elif status != 200:
                    counts["errors"] += 1
                else:
                    (heavy if is_heavy else cheap).append(took)
        finally:
            await client.close()

    async def report() -> None:
        while True:
            elapsed = min(seconds, time.perf_counter() - started)
            progress.update(mode, elapsed, counts["requests"], counts["rejected"])
            await asyncio.sleep(0.1)

    reporter = asyncio.create_task(report())
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(client_loop())
    finally:
        reporter.cancel()
    elapsed = time.perf_counter() - started
    progress.update(mode, seconds, counts["requests"], counts["rejected"])
    server = await HttpClient.get_json(url, "/_demo/stats")
    return PhaseResult(
        mode=mode,
        seconds=round(elapsed, 2),
        requests=counts["requests"],
        requests_per_s=round(counts["requests"] / elapsed, 1),
        cheap_p50_ms=round(percentile(cheap, 0.50) * 1000, 1),
        cheap_p99_ms=round(percentile(cheap, 0.99) * 1000, 1),
        heavy_done=len(heavy),
        heavy_p50_ms=round(percentile(heavy, 0.50) * 1000, 1),
        loop_lag_p99_ms=round(float(server["lag_p99_ms"]), 1),
        rejected_503=server["rejected"] - before,
        errors=counts["errors"],
    )


@asynccontextmanager
async def demo_server(*, workers: int | None, max_queue: int) -> AsyncIterator[str]:
    """Start the demo app in a child process; yield its base URL; always stop it."""
    with tempfile.TemporaryFile() as log:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "offload._demo", "--serve", "--watch-stdin"),
            *("--max-queue", str(max_queue)),
            *(("--workers", str(workers)) if workers is not None else ()),
            stdin=asyncio.subprocess.PIPE,  # never written: its end tells the server we are gone
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            # Its own session: a Ctrl-C in the terminal reaches only this process, which then
            # stops the server in order (the server drains and stops its workers).
            start_new_session=True,
        )
        assert process.stdout is not None
        drain: asyncio.Task[bytes] | None = None
        try:
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    line = await process.stdout.readline()
            except TimeoutError:
                line = b""
            if not line.startswith(b"READY "):
                log.seek(0)
                detail = log.read().decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError("the demo server did not start: " + " | ".join(detail))
            port = int(line.split()[1])
            drain = asyncio.create_task(process.stdout.read())  # never let its pipe fill up
            yield f"http://127.0.0.1:{port}"
        finally:
            await _stop(process)
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)  # uvicorn shuts down: lifespan, then workers
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # its workers exit by themselves when it is gone
            await process.wait()


async def run_demo(
    *,
    seconds: float = 4.0,
    concurrency: int = 32,
    heavy_share: float = 0.1,
    workers: int | None = None,
    max_queue: int = 8,
    progress: bool = True,
) -> DemoResult:
    """Run both modes against one demo server and return the numbers."""
    from ._manager import default_workers

    heavy_every = max(1, round(1 / heavy_share))
    shown = make_progress(progress)
    phases = []
    try:
        async with demo_server(workers=workers, max_queue=max_queue) as url:
            warm_up = HttpClient(url)  # connections, imports in the workers
            try:
                for mode in MODES:
                    await warm_up.request("POST", f"/login/{mode}", b'{"password": "x"}')
            finally:
                await warm_up.close()
            for mode in MODES:
                phases.append(
                    await drive(
                        url,
                        mode,
                        seconds=seconds,
                        concurrency=concurrency,
                        heavy_every=heavy_every,
                        progress=shown,
                    )
                )
    finally:
        shown.close()
    return DemoResult(
        seconds=seconds,
        concurrency=concurrency,
        heavy_share=1 / heavy_every,
        workers=workers if workers is not None else default_workers(),
        max_queue=max_queue,
        cpu_count=os.cpu_count() or 1,
        python=platform.python_version(),
        phases=tuple(phases),
    )


# -- output ---------------------------------------------------------------------------------

ROWS: Final = (
    ("requests/s", "requests_per_s", "{:,.0f}"),
    ("cheap requests p50 (ms)", "cheap_p50_ms", "{:,.1f}"),
    ("cheap requests p99 (ms)", "cheap_p99_ms", "{:,.1f}"),
    ("event-loop lag p99 (ms)", "loop_lag_p99_ms", "{:,.1f}"),
    ("queue rejections (503)", "rejected_503", "{:,d}"),
    ("password hashes done", "heavy_done", "{:,d}"),
    ("password hash p50 (ms)", "heavy_p50_ms", "{:,.1f}"),
    ("errors", "errors", "{:,d}"),
)


def describe(result: DemoResult) -> str:
    return (
        f"{result.seconds:g} s per mode, {result.concurrency} concurrent clients, "
        f"{result.heavy_share:.0%} password hashes (scrypt n=2^{SCRYPT_N.bit_length() - 1}), "
        f"{result.workers} worker(s), max_queue={result.max_queue}, "
        f"Python {result.python}, {result.cpu_count} CPU(s)"
    )


def table_rows(result: DemoResult) -> list[tuple[str, ...]]:
    by_mode = {phase.mode: asdict(phase) for phase in result.phases}
    return [
        (label, *(fmt.format(by_mode[mode][key]) for mode in MODES)) for label, key, fmt in ROWS
    ]


def render_plain(result: DemoResult) -> str:
    """The table as plain text."""
    header = ("", *MODES)
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
    inline, offloaded = result.phases
    rejected = (
        f"{offloaded.rejected_503:,d} logins turned away with 503 + Retry-After when the "
        "queue was full"
        if offloaded.rejected_503
        else "the queue never filled up"
    )
    return (
        f"Offloading the password hash: cheap-request p99 {inline.cheap_p99_ms:,.0f} ms -> "
        f"{offloaded.cheap_p99_ms:,.0f} ms, event-loop lag p99 {inline.loop_lag_p99_ms:,.0f} ms "
        f"-> {offloaded.loop_lag_p99_ms:,.0f} ms; {rejected}."
    )


def print_result(result: DemoResult) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(describe(result))
        print(render_plain(result))
        print(summary(result))
        return
    table = Table(title="offload demo: heavy work inline vs offloaded")
    table.add_column("")
    for mode in MODES:
        table.add_column(mode, justify="right")
    for row in table_rows(result):
        table.add_row(*row)
    console = Console()
    console.print(describe(result), highlight=False)
    console.print(table)
    console.print(summary(result))


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, for ``offload demo``'s parser."""
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="seconds of load per mode (default 4)"
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, default=None, help="also write the table as JSON"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent clients (default 32)"
    )
    parser.add_argument(
        "--heavy-share",
        type=float,
        default=0.1,
        help="share of requests that hash a password (default 0.1)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="offload workers (default: CPUs - 1)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=8, help="tasks that may wait for a worker (default 8)"
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


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``add_arguments`` options; the process exit status."""
    missing = missing_web_extra()
    if missing is not None:
        print(f"{WEB_HINT} ({missing} is missing)", file=sys.stderr)
        return 2
    if args.seconds <= 0 or args.concurrency < 1 or not 0 < args.heavy_share <= 1:
        print("--seconds and --concurrency must be > 0, --heavy-share in (0, 1]", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(
            run_demo(
                seconds=args.seconds,
                concurrency=args.concurrency,
                heavy_share=args.heavy_share,
                workers=args.workers,
                max_queue=args.max_queue,
                progress=not args.no_progress,
            )
        )
    except KeyboardInterrupt:
        print("offload demo: interrupted; the server and its workers are stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"offload demo: {exc}", file=sys.stderr)
        return 1
    print_result(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``offload demo [--seconds N] [--json PATH] ...``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="offload demo", description=(__doc__ or "").split("\n\n")[1].replace("\n", " ")
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(_server_main(sys.argv[1:]))
    sys.exit(main())
