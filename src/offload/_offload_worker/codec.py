"""Pickling calls, results and exceptions, with big buffers out of band.

Big buffers (``bytes``, ``bytearray``, ``memoryview`` and anything pickled as a
``PickleBuffer``, from ``SHARED_MIN`` bytes up) leave the pickle: ``encode`` returns a
``Payload`` whose buffers travel through a shared-memory arena (or inline, after the pickle in
the same frame, when no arena is free). ``decode_body`` reads such a body back.
"""

from __future__ import annotations

import io
import pickle
import struct
import traceback
from typing import TYPE_CHECKING, Any, Final

from .arena import aligned
from .protocol import PICKLE_PROTOCOL

if TYPE_CHECKING:
    from .arena import Arena

SHARED_MIN: Final = 1 << 16  # buffers from this size up travel out of band
INLINE: Final = 255  # arena number of a body whose buffers follow its pickle in the frame
#: Buffers of at least this many bytes are copied (into, and out of, an arena) off the event
#: loop, in a thread: a 100 MiB copy takes 20-130 ms, far over a loop's budget.
OFFLOOP_BYTES: Final = 8 << 20
_BODY: Final = struct.Struct("<BI")  # arena number, buffer count; then a <Q size and a flag each
#: Longest exception message or traceback text sent for display (the exception itself, when it
#: pickles within the payload cap, keeps its full message).
MAX_TEXT: Final = 64 * 1024


def loads(data: bytes | memoryview, buffers: list[Any] | None = None) -> Any:
    return pickle.loads(data, buffers=buffers)


def _reduce_memoryview(view: memoryview) -> tuple[type[memoryview], tuple[bytes]]:
    return memoryview, (view.tobytes(),)  # comes back as a read-only view of bytes


_DISPATCH: Final = {memoryview: _reduce_memoryview}


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` (protocol 5); memoryviews travel as views of bytes."""
    try:  # (not contextlib.suppress: on every call, it would cost as much as the pickling)
        return pickle.dumps(obj, PICKLE_PROTOCOL)
    except TypeError:  # e.g. a memoryview: again below, with the table
        pass
    return _dumps_with_views(obj)


def _dumps_with_views(obj: Any, buffer_callback: Any = None) -> bytes:
    out = io.BytesIO()
    pickler = pickle.Pickler(out, PICKLE_PROTOCOL, buffer_callback=buffer_callback)
    pickler.dispatch_table = _DISPATCH  # type: ignore[assignment]
    pickler.dump(obj)
    return out.getvalue()


# -- exceptions ------------------------------------------------------------------------------


def describe(exc: BaseException) -> tuple[str, str]:
    """``(qualified type name, message)``, whatever ``exc.__str__`` does."""
    kind = type(exc)
    try:
        message = str(exc)
    except BaseException:  # a broken __str__ must not take the worker down
        message = f"<{kind.__name__}: str() failed>"
    return f"{kind.__module__}.{kind.__qualname__}", message


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text``, cut to ``limit`` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return (
        f"{text[: limit // 2]}\n... ({len(text) - limit} characters left out) ...\n"
        + text[-limit // 2 :]
    )


def raised_payload(exc: BaseException, limit: int) -> bytes:
    """What a task's exception sends back: its pickle, its type name, message and traceback.

    Everything is bounded: the message and traceback text to ``MAX_TEXT`` characters each,
    and the exception's own pickle to ``limit`` bytes (over it, only the texts go, and the
    caller gets ``TaskFailed``).
    """
    type_name, message = describe(exc)
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException:
        tb = f"{type_name}: {message}\n(the traceback could not be formatted)\n"
    short = clip(message)
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, PICKLE_PROTOCOL)
    except BaseException:
        exc_bytes = None
    if exc_bytes is not None and len(exc_bytes) + 2 * MAX_TEXT > limit:
        exc_bytes = None
        short = f"{short} (the exception is over the manager's max_payload={limit} bytes)"
    return pickle.dumps((exc_bytes, type_name, short, clip(tb)), PICKLE_PROTOCOL)


# -- out-of-band buffers ---------------------------------------------------------------------


class _Lifted:
    """A big bytes, bytearray or memoryview, pickled so that its buffer goes out of band.

    The pickler writes exact bytes and bytearray objects itself (no hook sees them), so they
    are swapped for this before pickling. Each rebuilds as a copy (``bytes(buffer)``), which
    frees the arena at once.
    """

    __slots__ = ("buffer", "kind")

    def __init__(self, kind: type, buffer: pickle.PickleBuffer) -> None:
        self.kind = kind
        self.buffer = buffer

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if self.kind is memoryview:  # comes back as a read-only view of bytes, as in band
            return memoryview, (_Lifted(bytes, self.buffer),)
        return self.kind, (self.buffer,)


_BUFFER_OR_CONTAINER: Final = frozenset({bytes, bytearray, memoryview, tuple, list, dict})


def may_hold_buffers(values: Any) -> bool:
    """Whether any of ``values`` is a buffer or a container (a quick check before encoding)."""
    return not _BUFFER_OR_CONTAINER.isdisjoint(map(type, values))


def big_buffer_bytes(values: Any, depth: int = 2) -> int:
    """How many bytes of buffers ``values`` hold, looked for ``depth`` containers deep."""
    if _BUFFER_OR_CONTAINER.isdisjoint(map(type, values)):
        return 0  # (numbers or strings: one pass in C)
    total = 0
    for value in values:
        kind = type(value)
        if kind is bytes or kind is bytearray:
            total += len(value)
        elif kind is memoryview:
            total += value.nbytes
        elif depth and (kind is tuple or kind is list):
            total += big_buffer_bytes(value, depth - 1)
        elif depth and kind is dict:
            total += big_buffer_bytes(value.values(), depth - 1)
    return total


class Payload:
    """A pickle and the buffers it left out of band (``encode`` returns one when there are any).

    ``lendable`` flags each buffer that only offload's own rebuilders read (they copy it);
    another buffer (a numpy array's, say) may be kept by what it rebuilds, so the receiver
    hands that one over as a private copy, never as a view of an arena.
    """

    __slots__ = ("buffers", "data", "lendable", "size")

    def __init__(self, data: bytes, buffers: list[memoryview], lendable: bytes) -> None:
        self.data = data
        self.buffers = buffers
        self.lendable = lendable
        self.size = len(data) + sum(b.nbytes for b in buffers)

    def __len__(self) -> int:
        return self.size

    def parts(self, arena: Arena | None, number: int) -> list[memoryview]:
        """The frame body: the buffers go into ``arena`` (numbered ``number``), else inline.

        Raises ``OSError``/``ValueError`` (nothing written) if the arena cannot grow.
        """
        sizes = [b.nbytes for b in self.buffers]
        head = bytearray(_BODY.pack(INLINE if arena is None else number, len(sizes)))
        head += struct.pack(f"<{len(sizes)}Q", *sizes) + self.lendable
        parts = [memoryview(bytes(head)), memoryview(self.data)]
        if arena is None:
            return parts + self.buffers
        arena.write(self.buffers)
        return parts


def _refuse_buffer(buffer: pickle.PickleBuffer) -> bool:
    raise _HasBuffers


class _HasBuffers(Exception):
    """An object pickled a ``PickleBuffer``: it needs ``encode``'s out-of-band path."""


def dumps_plain(obj: Any) -> bytes | Payload:
    """``encode(obj)`` for an ``obj`` that holds no bytes, bytearray or memoryview where
    ``encode`` looks: one plain pickle, unless something in it pickles a ``PickleBuffer``."""
    try:
        return pickle.dumps(obj, PICKLE_PROTOCOL, buffer_callback=_refuse_buffer)
    except (_HasBuffers, TypeError):  # (TypeError: a memoryview deep inside: encode copes)
        return encode(obj, True, depth=0)


def encode(
    obj: Any, out_of_band: bool = True, snapshot: bool = True, depth: int = 2
) -> bytes | Payload:
    """Pickle ``obj``; with ``out_of_band``, big buffers are left out (a ``Payload``).

    Bytes, bytearrays and memoryviews are found up to ``depth`` containers (tuple, list, dict)
    deep (0: not looked for); other objects' ``PickleBuffer``s anywhere. ``snapshot``: copy
    what may change now (a caller may change it before it is sent).
    """
    if not out_of_band:
        return dumps(obj)
    return _Encoder(snapshot).encode(obj, depth)


class _Cycle(Exception):
    """A container holds itself: its big buffers stay in the pickle (which keeps the cycle)."""


class _Encoder:
    """One ``encode`` call: finds big buffers, and collects what the pickler leaves out."""

    __slots__ = ("buffers", "lendable", "open", "ours", "snapshot", "swapped")

    def __init__(self, snapshot: bool) -> None:
        self.snapshot = snapshot
        self.swapped: dict[int, Any] = {}  # id of an object -> what stands in for it
        self.open: set[int] = set()  # ids of the containers being walked
        self.ours: set[int] = set()  # ids of the PickleBuffers made by _Lifted
        self.buffers: list[memoryview] = []
        self.lendable = bytearray()

    def encode(self, obj: Any, depth: int) -> bytes | Payload:
        if depth:
            try:
                obj = self.lift(obj, depth)
            except _Cycle:  # (its stand-ins are dropped: their ids may be reused now)
                self.swapped.clear()
                self.ours.clear()
        try:
            data = pickle.dumps(obj, PICKLE_PROTOCOL, buffer_callback=self.keep)
        except TypeError:  # e.g. a small memoryview left in: again, with the table
            self.buffers.clear()
            self.lendable.clear()
            data = _dumps_with_views(obj, self.keep)
        if not self.buffers:
            return data
        return Payload(data, self.buffers, bytes(self.lendable))

    def lift(self, obj: Any, depth: int) -> Any:
        """``obj`` with its big buffers (``depth`` containers deep) swapped for _Lifted.

        On the path of every call: it allocates nothing unless it finds a big buffer. One
        object found twice gets one stand-in, so the pickle still shares it.
        """
        kind = type(obj)
        if kind is bytes or kind is bytearray or kind is memoryview:
            return self._lift_buffer(obj, kind)
        if not (kind is tuple or kind is list or kind is dict):
            return obj
        key = id(obj)
        if key in self.swapped:
            return self.swapped[key]
        if key in self.open:  # (even past ``depth``: a copy would break the cycle)
            raise _Cycle
        if not depth or (kind is not dict and _BUFFER_OR_CONTAINER.isdisjoint(map(type, obj))):
            return obj  # (a list of numbers or strings: one pass in C, no walk)
        self.open.add(key)
        if kind is dict:
            swapped: dict[Any, Any] | None = None
            for name, value in obj.items():
                lifted = self.lift(value, depth - 1)
                if lifted is not value:
                    if swapped is None:
                        swapped = dict(obj)
                    swapped[name] = lifted
            new: Any = swapped
        else:
            changed: list[Any] | None = None
            for index, item in enumerate(obj):
                lifted = self.lift(item, depth - 1)
                if lifted is not item:
                    if changed is None:
                        changed = list(obj)
                    changed[index] = lifted
            new = None if changed is None else kind(changed)
        self.open.discard(key)
        if new is None:
            return obj
        self.swapped[key] = new
        return new

    def _lift_buffer(self, obj: Any, kind: type) -> Any:
        if (obj.nbytes if kind is memoryview else len(obj)) < SHARED_MIN:
            return obj
        if kind is memoryview and not obj.c_contiguous:
            return obj
        stand_in = self.swapped.get(id(obj))
        if stand_in is None:
            data = obj
            if self.snapshot and not _immutable(obj):
                data = bytes(obj)  # the call gets the value it had when it was made
            buffer = pickle.PickleBuffer(data)
            self.ours.add(id(buffer))
            stand_in = self.swapped[id(obj)] = _Lifted(kind, buffer)
        return stand_in

    def keep(self, buffer: pickle.PickleBuffer) -> bool:
        """The pickler's buffer callback: ``False`` (out of band) for a big one."""
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < SHARED_MIN:
            return True
        ours = id(buffer) in self.ours
        if self.snapshot and not ours and not _immutable(raw):
            raw = memoryview(bytes(raw))
        self.buffers.append(raw)
        self.lendable.append(ours)
        return False


def _immutable(buffer: bytes | bytearray | memoryview) -> bool:
    """Whether no one can change these bytes: a ``bytes``, or a view of one."""
    if type(buffer) is bytes:
        return True
    return type(buffer) is memoryview and type(buffer.obj) is bytes


def body_size(body: memoryview) -> int:
    """Bytes of out-of-band buffers a body carries."""
    _, count = _BODY.unpack_from(body)
    return sum(struct.unpack_from(f"<{count}Q", body, _BODY.size))


def body_arena(body: memoryview) -> int | None:
    """The arena number a body's buffers are in, or ``None`` when they are inline."""
    number: int = body[0]
    return None if number == INLINE else number


def decode_body(body: memoryview, arenas: list[Arena]) -> tuple[memoryview, list[Any], Any]:
    """A body's pickle and buffers, and (always ``None`` now) a view to release.

    Inline buffers are views of the frame; buffers in an arena are read out of it, each
    into its own object (``bytes`` for offload's own rebuilders, ``bytearray`` for others),
    so nothing keeps the arena, or maps it. Raises ``OSError``/``ValueError`` when the arena
    cannot be read (e.g. no memory for the copy).
    """
    number, count = _BODY.unpack_from(body)
    sizes = struct.unpack_from(f"<{count}Q", body, _BODY.size)
    flags_at = _BODY.size + 8 * count
    lendable = body[flags_at : flags_at + count]
    inline = number == INLINE
    data_end = len(body) - (sum(sizes) if inline else 0)
    data = body[flags_at + count : data_end]
    buffers: list[Any] = []
    if inline:
        offset = data_end
        for size, lend in zip(sizes, lendable, strict=True):
            piece = body[offset : offset + size]
            buffers.append(piece if lend else bytearray(piece))
            offset += size
        return data, buffers, None
    arena = arenas[number]
    offset = 0
    for size, lend in zip(sizes, lendable, strict=True):
        buffers.append(arena.read(offset, size) if lend else arena.read_into(offset, size))
        offset = aligned(offset + size)
    return data, buffers, None


def release(buffers: list[Any], held: memoryview | None) -> bool:
    """Let go of what ``decode_body`` lent; ``False`` if something still holds an arena view."""
    free = True
    for buffer in buffers:
        if isinstance(buffer, memoryview):
            try:
                buffer.release()
            except BufferError:
                free = False
    if held is not None:
        held.release()
    return free
