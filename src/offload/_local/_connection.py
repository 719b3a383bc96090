"""The parent side of a worker's pipes: frames out and in, never blocking the event loop.

The loop calls ``_on_readable`` when answers arrive; it parses every complete frame in one go
(so a burst costs one wake-up) and hands each to ``on_frame``. Frames sent while answers are
being handled (the next tasks for the workers that just finished) are held by the pool's
``Batch`` and written together when the handling ends: one write per worker per wake-up, not
one per frame. What a pipe cannot take now waits in a buffer drained when it is writable.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from typing import Final

from .._offload_worker.protocol import HEADER, frame
from .._runtime import Runtime

__all__ = ("Batch", "Connection", "grow_pipe")

log = logging.getLogger("offload")

FrameHandler = Callable[[int, int, memoryview, float], None]

_READ_CHUNK: Final = 1 << 18
_BIG_FRAME: Final = 1 << 18  # payloads above this are read straight into their own buffer
_PIPE_SIZE: Final = 1 << 20
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def grow_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe buffer (default 64 KiB): big payloads cross in fewer wake-ups."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


class Batch:
    """Frames held while answers are handled, written when the handling ends (per pool).

    ``begin``/``end`` nest. The outermost ``end`` first calls ``after`` (the pool: room may
    have appeared, so the dispatcher sends more), while frames are still held, then writes.
    """

    __slots__ = ("after", "depth", "dirty", "held")

    def __init__(self, after: Callable[[], None] | None = None) -> None:
        self.depth = 0
        self.held: list[Connection] = []
        self.dirty = False  # something happened that ``after`` should hear of
        self.after = after

    def begin(self) -> None:
        self.depth += 1

    def end(self) -> None:
        if self.depth == 1 and self.dirty and self.after is not None:
            self.dirty = False
            try:
                self.after()
            except Exception:
                log.exception("offload: handling the end of a batch failed")
        self.depth -= 1
        if self.depth:
            return
        held, self.held = self.held, []
        for connection in held:
            connection.flush_held()


class Connection:
    """Frames to and from one worker over two pipes, without blocking the loop."""

    def __init__(
        self,
        runtime: Runtime,
        batch: Batch,
        send_fd: int,
        receive_fd: int,
        on_frame: FrameHandler,
        on_eof: Callable[[], None],
    ) -> None:
        self._runtime = runtime
        self._batch = batch
        self._send_fd = send_fd
        self._receive_fd = receive_fd
        self._on_frame = on_frame
        self._on_eof = on_eof
        self._buffer = bytearray()
        self._big: bytearray | None = None  # a large payload being read in place
        self._big_header: tuple[int, int, float] = (0, 0, 0.0)
        self._big_filled = 0
        self._pending: list[memoryview] = []  # what the pipe could not take yet
        self._held: list[memoryview] = []  # frames held while answers are handled
        self.closed = False
        self.reading = True
        os.set_blocking(send_fd, False)
        os.set_blocking(receive_fd, False)
        runtime.watch_readable(receive_fd, self._on_readable)

    # -- sending -------------------------------------------------------------------------------

    def send(
        self,
        wire_id: int,
        tag: int,
        payload: bytes | memoryview | list[memoryview] = b"",
        seconds: float = 0.0,
    ) -> None:
        """Send a frame (``payload`` may come in parts)."""
        if self.closed:
            return
        parts = frame(wire_id, tag, payload, seconds)
        if self._pending:
            self._pending += parts
            return
        if self._batch.depth:
            if not self._held:
                self._batch.held.append(self)
            self._held += parts
            return
        self._write(parts)

    def flush_held(self) -> None:
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
        except OSError:  # the worker is gone; its exit is seen on its own
            return
        self._pending = _unwritten(parts, written)
        if self._pending:
            self._runtime.watch_writable(self._send_fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = os.writev(self._send_fd, self._pending[:64])
        except BlockingIOError:
            return
        except OSError:
            written = -1
        self._pending = _unwritten(self._pending, written) if written >= 0 else []
        if not self._pending:
            self._runtime.unwatch_writable(self._send_fd)

    # -- receiving -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        self._batch.begin()
        try:
            self.read_available()
        finally:
            self._batch.end()

    def read_available(self) -> None:
        """Read and handle every frame that has arrived (also called after the worker exits)."""
        while self.reading:
            try:
                if self._big is not None:
                    if not self._fill_big():
                        return
                    continue
                chunk = os.read(self._receive_fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._stop_reading()
                self._on_eof()
                return
            self._buffer += chunk
            self._parse()
            if len(chunk) < _READ_CHUNK:
                return

    def _parse(self) -> None:
        buf = self._buffer
        view = memoryview(buf)
        start = 0
        size = HEADER.size
        try:
            while len(buf) - start >= size:
                wire_id, tag, length, seconds = HEADER.unpack_from(buf, start)
                end = start + size + length
                if len(buf) < end:
                    if length > _BIG_FRAME:
                        self._begin_big(wire_id, tag, length, seconds, view[start + size :])
                        start = len(buf)
                    break
                # a copy, so no view pins the buffer while the handler runs
                self._deliver(wire_id, tag, memoryview(bytes(view[start + size : end])), seconds)
                start = end
        finally:
            view.release()
        if start:
            del buf[:start]

    def _begin_big(
        self, wire_id: int, tag: int, length: int, seconds: float, head: memoryview
    ) -> None:
        self._big = bytearray(length)
        self._big[: len(head)] = head
        self._big_filled = len(head)
        self._big_header = (wire_id, tag, seconds)

    def _fill_big(self) -> bool:
        """Read more of a big frame; ``False`` when nothing more is there now."""
        big = self._big
        assert big is not None
        with memoryview(big) as view:
            got = os.readv(self._receive_fd, [view[self._big_filled :]])
        if not got:
            self._stop_reading()
            self._on_eof()
            return False
        self._big_filled += got
        if self._big_filled == len(big):
            wire_id, tag, seconds = self._big_header
            self._big = None
            self._deliver(wire_id, tag, memoryview(big), seconds)
        return True

    def _deliver(self, wire_id: int, tag: int, payload: memoryview, seconds: float) -> None:
        try:
            self._on_frame(wire_id, tag, payload, seconds)
        except Exception:  # one bad answer must not cost the frames behind it
            log.exception("offload: handling an answer failed")

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self._runtime.unwatch_readable(self._receive_fd)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching and close both pipes (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._stop_reading()
        if self._pending:
            self._runtime.unwatch_writable(self._send_fd)
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
