"""The wire format between a parent and its workers: frame headers, tags and control words.

A frame is a fixed header ``<QBQd`` (wire id, tag, payload length, seconds) and its payload.
Wire ids count up per worker; every RUN frame gets the next one, and each answer names the id
it answers. The ``seconds`` field carries a run time in answers and the initial credit in
``RUN_STREAM``.

Control words go down their own pipe so that the worker hears them while a task runs:
``<BQQ`` (op, wire id, value), 17 bytes, written whole (a pipe write under ``PIPE_BUF`` bytes
is atomic).
"""

from __future__ import annotations

import struct
from typing import Final

HEADER: Final = struct.Struct("<QBQd")
CONTROL: Final = struct.Struct("<BQQ")

# -- parent -> worker (task pipe) ----------------------------------------------------------
INIT: Final = 1  # payload: pickled settings dict
RUN: Final = 2  # payload: pickled (fn, args, kwargs)
RUN_STREAM: Final = 3  # like RUN, for a generator function; seconds: the initial credit
QUIT: Final = 4  # finish what you hold, answer it, then exit

# -- worker -> parent (answer ring, or answer pipe) ------------------------------------------
READY: Final = 10  # payload: pickled {"pid": ..., "shared": bool}
OK: Final = 11  # payload: the pickled result
RAISED: Final = 12  # payload: pickled (exception pickle or None, type name, message, traceback)
RESULT_NOT_SERIALIZABLE: Final = 13  # payload: pickled (type name, message)
RESULT_TOO_LARGE: Final = 14  # payload: pickled size in bytes
LOAD_FAILED: Final = 15  # the call could not be loaded; payload as RAISED
REVOKED: Final = 16  # the task never started and never will (STOP or TAKE_BACK came first)
INTERRUPTED: Final = 17  # the running task was stopped by an interrupt (interpreter workers)
PONG: Final = 18  # wire id field: the ping's number
RECYCLE: Final = 19  # payload: pickled resident memory in bytes, over the ceiling
RUNNING: Final = 20  # a STOP came while the task ran: stop it the way the kind allows
PROGRESS: Final = 21  # payload: pickled (done, total, message, elapsed seconds)
ITEM: Final = 22  # payload: one pickled item of a stream
MAP_FAILED: Final = 23  # the task's shared buffers could not be mapped here; it never started
RING: Final = 24  # doorbell: answers wait in the ring (the parent reads up to its write mark)

#: Tags that end a task: after one of them the wire id is never heard of again.
FINAL: Final = frozenset(
    {
        OK,
        RAISED,
        RESULT_NOT_SERIALIZABLE,
        RESULT_TOO_LARGE,
        LOAD_FAILED,
        REVOKED,
        INTERRUPTED,
        MAP_FAILED,
    }
)

OOB: Final = 0x80  # tag bit: the payload is a body with out-of-band buffers (see codec.Payload)

# -- control ops (control pipe) --------------------------------------------------------------
STOP: Final = 1  # never start it; running: interrupt it (interpreters) or say RUNNING
TAKE_BACK: Final = 2  # never start it if it has not begun (REVOKED); else nothing
PING: Final = 3  # value: the ping's number; the watcher answers PONG at once
CREDIT: Final = 4  # a stream may send ``value`` more items
CLOSE: Final = 5  # close the stream's generator (GeneratorExit) at its next item
WAKE: Final = 6  # the parent read the ring or an arena: space to write again

PICKLE_PROTOCOL: Final = 5


def frame(
    wire_id: int, tag: int, payload: bytes | memoryview | list[memoryview], seconds: float
) -> list[memoryview]:
    """One frame as ``writev`` parts: the header, then the payload (whole, or in parts)."""
    if isinstance(payload, list):
        size = sum(part.nbytes for part in payload)
        header = memoryview(HEADER.pack(wire_id, tag, size, seconds))
        return [header, *(part for part in payload if part.nbytes)]
    view = memoryview(payload)
    header = memoryview(HEADER.pack(wire_id, tag, view.nbytes, seconds))
    return [header, view] if view.nbytes else [header]


def control_word(op: int, wire_id: int = 0, value: int = 0) -> bytes:
    """A control pipe message."""
    return CONTROL.pack(op, wire_id, value)
