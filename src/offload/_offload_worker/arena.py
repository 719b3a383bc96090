"""Arenas: shared-memory files (memfds) that big buffers travel through.

A writer puts a payload's buffers in with ``pwritev`` and the reader takes each out with
``pread``/``preadv``: one copy each way, and neither side ever maps the arena, so a big
payload costs no address space (``RLIMIT_AS``) beyond the object it becomes. An arena that grew
past ``BIG`` for a big payload is shrunk back (``shrink``) once its reader is done with it, so
a single large argument does not hold its memory for later tasks.
"""

from __future__ import annotations

import contextlib
import os
from typing import Final

#: An arena holding more than this is shrunk back to nothing once its payload is read.
BIG: Final = 16 << 20
_ALIGN: Final = 64


def aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


class Arena:
    """A shared-memory file (a memfd), written by one side and read by the other."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @staticmethod
    def create(name: str = "offload-arena") -> int | None:
        """A new memfd, or ``None`` where there is none (not Linux)."""
        try:
            return os.memfd_create(name, os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None

    def write(self, buffers: list[memoryview]) -> None:
        """Put ``buffers`` in, each at the next 64-byte boundary.

        Raises ``OSError`` (e.g. ``ENOSPC``, ``ENOMEM``) when the memory is not there.
        """
        offset = 0
        for buffer in buffers:
            view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
            done = 0
            size = view.nbytes
            while done < size:
                done += os.pwrite(self.fd, view[done:], offset + done)
            offset = aligned(offset + size)

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset``, as a new ``bytes``."""
        data = os.pread(self.fd, size, offset)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = os.pread(self.fd, size - got, offset + got)
            if not more:
                raise ValueError("the arena is smaller than the frame says")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_into(self, offset: int, size: int) -> bytearray:
        """``size`` bytes from ``offset``, as a new ``bytearray`` (one copy)."""
        out = bytearray(size)
        with memoryview(out) as view:
            got = 0
            while got < size:
                n = os.preadv(self.fd, [view[got:]], offset + got)
                if not n:
                    raise ValueError("the arena is smaller than the frame says")
                got += n
        return out

    def shrink(self) -> None:
        """Give a big arena's memory back (its payload has been read)."""
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_size > BIG:
                os.ftruncate(self.fd, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
