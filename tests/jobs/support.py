"""Helpers for the job tests: a FIFO the tasks write to and the test awaits without blocking."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio


class Inbox:
    """A FIFO opened read-write and non-blocking: tasks append lines, the test awaits them.

    Opened ``O_RDWR`` so it never reports end-of-file, and awaited with
    ``anyio.wait_readable``, so waiting costs nothing and a cancelled test leaves no thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    async def line(self, timeout: float = 30.0) -> str:
        """The next line (without its newline); fails the test after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while b"\n" not in self._buffer:
                await anyio.wait_readable(self.fd)
                with contextlib.suppress(BlockingIOError):
                    self._buffer += os.read(self.fd, 65536)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def lines(self, n: int, timeout: float = 30.0) -> list[str]:
        with anyio.fail_after(timeout):
            return [await self.line() for _ in range(n)]

    def close(self) -> None:
        os.close(self.fd)
