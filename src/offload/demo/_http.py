"""An open-loop HTTP load generator for the demo and the ``overload`` benchmark.

Requests are sent on a fixed schedule (so many per second, evenly spaced), whatever the
server does: a slow server does not slow the load down, and each latency is counted from the
moment the request was *due*, not from when a free connection took it. That is how real
clients arrive, and it keeps a stalled server from hiding its stall (no coordinated
omission).

Why not httpx: it spends about 2 ms of CPU per request against 0.1 ms for this client, and
here the load generator shares two CPUs with the server it measures. This client speaks just
enough HTTP/1.1 for the demo's own server (keep-alive, responses with a Content-Length).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ("HttpClient", "Outcome", "Request", "drive", "evenly", "percentile")

#: The most response-head bytes accepted.
_MAX_HEAD: Final = 64 * 1024


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..1 (``0.0`` for no samples).

    >>> percentile([3.0, 1.0, 2.0], 0.5)
    2.0
    """
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class HttpClient:
    """One HTTP/1.1 keep-alive connection to ``url``'s host and port."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._stream: anyio.abc.SocketStream | None = None
        self._reader: BufferedByteReceiveStream | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; its status, headers (lower-case names) and body.

        Raises ``EOFError`` when the connection fails (the client is then closed).
        """
        try:
            return await self._exchange(method, path, body, headers or {})
        except (
            OSError,
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.IncompleteRead,
            anyio.DelimiterNotFound,
            ValueError,
            IndexError,
        ):
            await self.close()
            raise EOFError(f"{method} {path}: the connection failed") from None

    async def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if self._stream is None:
            self._stream = await anyio.connect_tcp(self.host, self.port)
            self._reader = BufferedByteReceiveStream(self._stream)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
        for name, value in headers.items():
            head += f"{name}: {value}\r\n"
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        await self._stream.send(head.encode() + b"\r\n" + (body or b""))
        raw = await self._reader.receive_until(b"\r\n\r\n", _MAX_HEAD)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        found = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        length = int(found.get("content-length", "0"))
        content = await self._reader.receive_exactly(length) if length else b""
        if found.get("connection", "").lower() == "close":
            await self.close()
        return status, found, content

    @classmethod
    async def get_json(cls, url: str, path: str) -> Any:
        """``GET path`` on a connection of its own; the decoded JSON body.

        Raises ``EOFError`` for a failed connection or a status other than 200.
        """
        client = cls(url)
        try:
            status, _, content = await client.request("GET", path)
        finally:
            await client.close()
        if status != 200:
            raise EOFError(f"GET {path}: HTTP {status}")
        return json.loads(content)

    async def close(self) -> None:
        stream, self._stream, self._reader = self._stream, None, None
        if stream is not None:
            await stream.aclose()


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a schedule: due ``at`` seconds after the start."""

    at: float
    kind: str  # the caller's label, e.g. "cheap" or "heavy"
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one request. ``status`` 0: no answer (connection failed, or no
    answer within the client's timeout). ``latency`` is seconds from when it was due."""

    kind: str
    at: float
    status: int
    latency: float
    retry_after: str | None = None


def default_connections() -> int:
    """A third of the open-file limit (the server on this machine needs its share), at most
    2000, at least 16."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 2000
    return max(16, min(2000, soft // 3))


def evenly(rate: float, seconds: float, offset: float = 0.0) -> list[float]:
    """Due times for ``rate`` requests per second over ``seconds``, evenly spaced.

    >>> evenly(4, 1)
    [0.0, 0.25, 0.5, 0.75]
    """
    if rate <= 0:
        return []
    step = 1.0 / rate
    count = math.floor(seconds * rate + 1e-9)
    return [round(offset * step + i * step, 9) for i in range(count)]


async def drive(
    url: str,
    schedule: Sequence[Request],
    *,
    timeout: float,
    on_outcome: Callable[[Outcome], None] | None = None,
    max_connections: int | None = None,
) -> list[Outcome]:
    """Send every request of ``schedule`` when it is due (open loop) and wait for the answers.

    Each request gets an idle keep-alive connection, or a new one (at most
    ``max_connections`` at once, by default a third of this process's open-file limit, at
    most 2000; past that a request waits, and its wait counts in its latency). A request not
    answered within ``timeout`` seconds of being due is given up (status 0). Returns one
    ``Outcome`` per request, in schedule order.
    """
    idle: list[HttpClient] = []
    limit = anyio.Semaphore(max_connections or default_connections())
    outcomes: list[Outcome | None] = [None] * len(schedule)
    start = time.perf_counter() + 0.01

    async def send(index: int, request: Request) -> None:
        due = start + request.at
        status = 0
        retry_after = None
        with anyio.move_on_after(max(0.0, due + timeout - time.perf_counter())):
            async with limit:
                client = idle.pop() if idle else HttpClient(url)
                try:
                    status, headers, _ = await client.request(
                        request.method, request.path, request.body, dict(request.headers)
                    )
                    retry_after = headers.get("retry-after")
                except EOFError:
                    status = 0
                else:
                    idle.append(client)
                    client = None  # type: ignore[assignment]
                finally:
                    if client is not None:
                        with anyio.CancelScope(shield=True):
                            await client.close()
        outcome = Outcome(request.kind, request.at, status, time.perf_counter() - due, retry_after)
        outcomes[index] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    try:
        async with anyio.create_task_group() as group:
            for index, request in enumerate(schedule):
                delay = start + request.at - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                group.start_soon(send, index, request)
    finally:
        with anyio.CancelScope(shield=True):
            for client in idle:
                await client.close()
    return [outcome for outcome in outcomes if outcome is not None]
