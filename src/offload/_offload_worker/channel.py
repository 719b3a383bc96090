"""Blocking frame IO over a pair of pipe file descriptors (the worker's side)."""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Final

from .locks import locked
from .protocol import HEADER, frame

_READ_CHUNK: Final = 1 << 20


class Channel:
    """Frames in from the task pipe, frames out on the answer pipe (two threads may send)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.buffer = bytearray()
        self.frames: deque[tuple[int, int, memoryview, float]] = deque()
        self.eof = False
        # The watcher thread answers pings too. An RLock: the main thread takes it through
        # ``locked``, safe against an interrupt landing around the acquire.
        self.send_lock = threading.RLock()

    def _fill(self) -> None:
        chunk = os.read(self.rfd, _READ_CHUNK)
        if not chunk:
            self.eof = True
            return
        self.buffer += chunk
        self._parse()
        self._read_big_frame()

    def _read_big_frame(self) -> None:
        """A large frame that has begun to arrive is read straight into its own buffer."""
        buf = self.buffer
        if len(buf) < HEADER.size:
            return
        wire_id, tag, length, seconds = HEADER.unpack_from(buf, 0)
        if length < _READ_CHUNK:
            return
        payload = bytearray(length)
        have = len(buf) - HEADER.size
        payload[:have] = memoryview(buf)[HEADER.size :]
        del buf[:]
        with memoryview(payload) as view:
            while have < length:
                got = os.readv(self.rfd, [view[have:]])
                if not got:
                    self.eof = True
                    return
                have += got
        self.frames.append((wire_id, tag, memoryview(payload), seconds))

    def _parse(self) -> None:
        buf = self.buffer
        start = 0
        size = HEADER.size
        while len(buf) - start >= size:
            wire_id, tag, length, seconds = HEADER.unpack_from(buf, start)
            end = start + size + length
            if len(buf) < end:
                break
            self.frames.append((wire_id, tag, memoryview(bytes(buf[start + size : end])), seconds))
            start = end
        if start:
            del buf[:start]

    def receive(self) -> tuple[int, int, memoryview, float] | None:
        """The next frame, blocking; ``None`` when the parent closed the pipe."""
        while not self.frames:
            if self.eof:
                return None
            self._fill()
        return self.frames.popleft()

    def send(
        self, wire_id: int, tag: int, payload: bytes | list[memoryview] = b"", seconds: float = 0.0
    ) -> None:
        self.send_parts(frame(wire_id, tag, payload, seconds))

    def send_parts(self, parts: list[memoryview]) -> None:
        def write() -> None:
            while parts:
                written = os.writev(self.wfd, parts)
                while parts and written >= len(parts[0]):
                    written -= len(parts.pop(0))
                if parts and written:
                    parts[0] = parts[0][written:]

        locked(self.send_lock, write)
