"""The parent side of the transport: frames over a worker's pipes, driven by the event loop.

One ``Connection`` per worker, whatever its kind: the loop wakes ``_on_readable`` when answers
arrive, which parses every complete frame in one go (so a burst costs one wake-up) and hands
each to ``on_frame``. Frames sent while answers are being handled (the next tasks for the
workers that just finished) are held and written together when the handling ends: a write
that wakes a sleeping worker costs tens of microseconds on a VM, so one write per worker per
wake-up, not one per frame. Writes never block the loop: what the pipe cannot take now waits
in a buffer drained by ``add_writer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable

from ._worker import HEADER, frame

__all__ = ("Connection", "FrameHandler")

log = logging.getLogger("offload")

FrameHandler = Callable[[int, int, memoryview, float], None]

_READ_CHUNK = 1 << 18
_BIG_FRAME = 1 << 18  # payloads above this are read straight into their own buffer
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Holding(threading.local):
    connections: list[Connection] | None = None


_holding = _Holding()  # per thread: each event loop runs in its own thread


def grow_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe buffer (default 64 KiB): big payloads cross in fewer wake-ups."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


class Connection:
    """Frames to and from one worker over two pipes, without blocking the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send_fd: int,
        receive_fd: int,
        on_frame: FrameHandler,
        on_closed: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._send_fd = send_fd
        self._receive_fd = receive_fd
        self._on_frame = on_frame
        self._on_closed = on_closed
        self._buffer = bytearray()
        self._big: bytearray | None = None  # a large payload being read in place
        self._big_header: tuple[int, int, float] = (0, 0, 0.0)
        self._big_filled = 0
        self._pending: list[memoryview] = []  # what the pipe could not take yet
        self._held: list[memoryview] = []  # frames held while answers are handled
        self.closed = False
        os.set_blocking(send_fd, False)
        os.set_blocking(receive_fd, False)
        loop.add_reader(receive_fd, self._on_readable)

    # -- sending ---------------------------------------------------------------------------

    def send(
        self,
        task_id: int,
        tag: int,
        payload: bytes | memoryview | list[memoryview] = b"",
        acked: float = 0.0,
    ) -> None:
        """Send a frame (``payload`` may come in parts); ``acked`` rides in its seconds field."""
        if self.closed:
            return
        parts = frame(task_id, tag, payload, acked)
        if self._pending:
            self._pending += parts
            return
        held = _holding.connections
        if held is not None:
            if not self._held:
                held.append(self)
            self._held += parts
            return
        self._write(parts)

    def _flush_held(self) -> None:
        parts, self._held = self._held, []
        if parts and not self.closed:
            if self._pending:
                self._pending += parts
            else:
                self._write(parts)

    def _write(self, parts: list[memoryview]) -> None:
        try:
            written = os.writev(self._send_fd, parts)
        except BlockingIOError:
            written = 0
        except OSError:  # the worker is gone; its reader sees EOF and reports it
            return
        self._pending = _unwritten(parts, written)
        if self._pending:
            self._loop.add_writer(self._send_fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = os.writev(self._send_fd, self._pending[:64])
        except BlockingIOError:
            return
        except OSError:
            written = -1
        self._pending = _unwritten(self._pending, written) if written >= 0 else []
        if not self._pending:
            self._loop.remove_writer(self._send_fd)

    # -- receiving -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            if self._big is not None:
                self._fill_big()
                return
            chunk = os.read(self._receive_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._lost()
            return
        self._buffer += chunk
        if _holding.connections is not None:  # nested (a handler read another pipe)
            self._parse()
            return
        held: list[Connection] = []
        _holding.connections = held
        try:
            self._parse()
        finally:
            _holding.connections = None
            for connection in held:
                connection._flush_held()

    def _parse(self) -> None:
        buf = self._buffer
        view = memoryview(buf)
        start = 0
        size = HEADER.size
        try:
            while len(buf) - start >= size:
                task_id, tag, length, seconds = HEADER.unpack_from(buf, start)
                end = start + size + length
                if len(buf) < end:
                    if length > _BIG_FRAME:
                        self._begin_big(task_id, tag, length, seconds, view[start + size :])
                        start = len(buf)
                    break
                # a copy, so no view pins the buffer while the handler runs
                self._deliver(task_id, tag, memoryview(bytes(view[start + size : end])), seconds)
                start = end
        finally:
            view.release()
        if start:
            del buf[:start]

    def _begin_big(
        self, task_id: int, tag: int, length: int, seconds: float, head: memoryview
    ) -> None:
        self._big = bytearray(length)
        self._big[: len(head)] = head
        self._big_filled = len(head)
        self._big_header = (task_id, tag, seconds)

    def _fill_big(self) -> None:
        big = self._big
        assert big is not None
        with memoryview(big) as view:
            got = os.readv(self._receive_fd, [view[self._big_filled :]])
        if not got:
            self._lost()
            return
        self._big_filled += got
        if self._big_filled == len(big):
            task_id, tag, seconds = self._big_header
            self._big = None
            self._deliver(task_id, tag, memoryview(big), seconds)

    def _deliver(self, task_id: int, tag: int, payload: memoryview, seconds: float) -> None:
        try:
            self._on_frame(task_id, tag, payload, seconds)
        except Exception:  # one bad answer must not cost the frames behind it
            log.exception("offload: handling an answer failed")

    # -- closing ---------------------------------------------------------------------------

    def _lost(self) -> None:
        self.close()
        self._on_closed()

    def close(self) -> None:
        """Stop watching and close both pipes (idempotent). The worker then sees EOF."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._receive_fd)
        if self._pending:
            self._loop.remove_writer(self._send_fd)
            self._pending.clear()
        for fd in (self._send_fd, self._receive_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _unwritten(parts: list[memoryview], written: int) -> list[memoryview]:
    """What is left of ``parts`` after ``written`` bytes went out."""
    if written == sum(map(len, parts)):
        return []
    rest = list(parts)
    while rest and written >= len(rest[0]):
        written -= len(rest.pop(0))
    if rest and written:
        rest[0] = rest[0][written:]
    return rest
