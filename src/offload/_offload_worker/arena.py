"""Arenas: growable shared-memory regions (memfds) that big buffers travel through.

An arena is mapped only while a payload is written or read. One that grew past ``BIG`` for a
big payload is unmapped as soon as the payload is copied, and shrunk back (``shrink``) once the
other side is done with it, so a single large argument does not hold its memory (or, under
``RLIMIT_AS``, its address space) for later tasks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Final

#: Above this size an arena is unmapped after each use and shrunk when freed.
BIG: Final = 16 << 20


class Arena:
    """A growable shared-memory region, mapped by the parent and one worker (a memfd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None

    @staticmethod
    def create(name: str = "offload-arena") -> int | None:
        """A new memfd, or ``None`` where there is none (not Linux)."""
        try:
            return os.memfd_create(name, os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None

    def view(self, size: int, grow: bool = False) -> memoryview:
        """A view of the first ``size`` bytes (the writer grows the region as needed).

        Raises ``OSError`` (e.g. ``ENOMEM``) or ``ValueError`` when it cannot be mapped.
        """
        if self._map is None or len(self._map) < size:
            have = os.fstat(self.fd).st_size
            if have < size:
                if not grow:
                    raise ValueError("the arena is smaller than the frame says")
                have = max(size, 2 * have) if size <= BIG else size
                os.ftruncate(self.fd, have)
            self._drop_map()
            self._map = mmap.mmap(self.fd, have)
        return memoryview(self._map)[:size]

    def unmap_if_big(self) -> None:
        """Unmap a big region now (its pages stay in the memfd until ``shrink``)."""
        if self._map is not None and len(self._map) > BIG:
            self._drop_map()

    def shrink(self) -> None:
        """Give a big region's memory back (the arena is free: no one reads it now)."""
        self.unmap_if_big()
        with contextlib.suppress(OSError):
            if self._map is None and os.fstat(self.fd).st_size > BIG:
                os.ftruncate(self.fd, 0)

    def _drop_map(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view is still out: it keeps the map
                self._map.close()
            self._map = None

    def close(self) -> None:
        self._drop_map()
        with contextlib.suppress(OSError):
            os.close(self.fd)
