"""The answer ring: a shared-memory ring of answer frames, and the worker's control block.

One memfd per worker, mapped by both sides. Its first 64 bytes are the control block:

=======  ======  ======  ==============================================================
offset   type    writer  meaning
=======  ======  ======  ==============================================================
0        u64     worker  wire id being loaded or run (0: none): the one a crash fails
8        u64     worker  write mark: bytes of records written, ever
16       u64     parent  read mark: bytes of records consumed, ever
24       u64     parent  answers read from the outbound arena (the worker reuses it after)
32       u8      parent  stop: start nothing more (a quarantined interpreter)
33       u8      worker  waiting: blocked for ring space or an arena; the parent sends WAKE
64       u64[128] parent stopped wire ids, each in slot ``id % 128``: the worker checks its
                         slot before it loads a task and again before it calls it, so a STOP
                         holds even before the watcher thread has read the control pipe
=======  ======  ======  ==============================================================

Records follow: a ``u32`` length, then a whole frame (header and payload), 8-byte aligned. The
worker writes a record, then moves its write mark, then rings the parent (a ``RING`` frame on
the answer pipe) when it has nothing more to run right away. Answers in the ring survive the
worker's death: after a crash the parent reads them before it decides what the crash cost.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from typing import Final

from .protocol import HEADER

STOPS: Final = 64
STOP_SLOTS: Final = 128
HEAD: Final = STOPS + 8 * STOP_SLOTS
SIZE: Final = 1 << 20  # bytes of records
MAX_RECORD: Final = SIZE // 4  # larger frames go through an arena or the pipe

_U64: Final = struct.Struct("<Q")
_U32: Final = struct.Struct("<I")
CURRENT: Final = 0
WRITE: Final = 8
READ: Final = 16
ACKED: Final = 24
STOP: Final = 32
WAITING: Final = 33
_PAD: Final = 0xFFFFFFFF


def create() -> int | None:
    """A new memfd sized for a ring, or ``None`` where there is none (not Linux)."""
    try:
        fd = os.memfd_create("offload-ring", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return None
    try:
        os.ftruncate(fd, HEAD + SIZE)
    except OSError:
        os.close(fd)
        return None
    return fd


class Ring:
    """One side's handle on a worker's ring and control block."""

    __slots__ = ("fd", "map", "view")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map = mmap.mmap(fd, HEAD + SIZE)
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a record view is still out: it keeps the map
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # -- the control block -------------------------------------------------------------------

    def get(self, offset: int) -> int:
        value: int = _U64.unpack_from(self.map, offset)[0]
        return value

    def set(self, offset: int, value: int) -> None:
        _U64.pack_into(self.map, offset, value)

    def mark_stopped(self, wire_id: int) -> None:
        """The parent: ``wire_id`` must never start (written before the STOP word is sent)."""
        self.set(STOPS + 8 * (wire_id % STOP_SLOTS), wire_id)

    def stopped(self, wire_id: int) -> bool:
        """The worker: whether the parent stopped ``wire_id``."""
        return self.get(STOPS + 8 * (wire_id % STOP_SLOTS)) == wire_id

    def flag(self, offset: int) -> bool:
        return bool(self.map[offset])

    def set_flag(self, offset: int, value: bool) -> None:
        self.map[offset] = 1 if value else 0

    # -- the worker's side -------------------------------------------------------------------

    def put(self, parts: list[memoryview], size: int) -> bool:
        """Write one frame (``parts``, ``size`` bytes in all); ``False`` if it does not fit now."""
        need = _aligned(4 + size)
        write = self.get(WRITE)
        at = write % SIZE
        skip = SIZE - at if SIZE - at < need else 0  # a record never wraps
        if write + skip + need - self.get(READ) > SIZE:
            return False
        if skip:
            if skip >= 4:
                _U32.pack_into(self.map, HEAD + at, _PAD)
            write += skip
            at = 0
        start = HEAD + at
        _U32.pack_into(self.map, start, size)
        offset = start + 4
        view = self.view
        for part in parts:
            end = offset + part.nbytes
            view[offset:end] = part
            offset = end
        self.set(WRITE, write + need)  # after the record: the parent never sees half of one
        return True

    # -- the parent's side -------------------------------------------------------------------

    def take(self) -> list[tuple[int, int, memoryview, float]]:
        """Every record written since the last call, as frames (payloads copied out)."""
        read = self.get(READ)
        write = self.get(WRITE)
        frames: list[tuple[int, int, memoryview, float]] = []
        view = self.view
        while read < write:
            at = read % SIZE
            if SIZE - at < 4 or _U32.unpack_from(self.map, HEAD + at)[0] == _PAD:
                read += SIZE - at
                continue
            start = HEAD + at
            size = _U32.unpack_from(self.map, start)[0]
            head = start + 4
            wire_id, tag, length, seconds = HEADER.unpack_from(self.map, head)
            body = head + HEADER.size
            frames.append((wire_id, tag, memoryview(bytes(view[body : body + length])), seconds))
            read += _aligned(4 + size)
        self.set(READ, read)
        return frames


def _aligned(n: int) -> int:
    return (n + 7) & ~7
