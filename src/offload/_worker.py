"""The worker side of offload's transport: a loop that runs tasks sent over a pipe.

This file imports only the standard library and nothing from ``offload``: it runs as a script
in a worker process (``python -P _worker.py RFD WFD CFD``) and is executed by path inside a
subinterpreter, so a worker starts without paying for the parent package's imports.

Wire format, both directions: a fixed header ``<QBQd`` (task id, tag, payload length, run
seconds) followed by the payload. Parent -> worker: ``INIT`` (settings), ``RUN`` (a pickled
``(fn, args, kwargs)``). Worker -> parent:
``READY`` then one answer per ``RUN``, in order, plus ``PONG`` (answer to a health ping) and
``RECYCLE`` (over the memory ceiling) at any time. A third pipe, the control pipe, carries
8-byte words: a task id to interrupt (interpreter workers) or, with the top bit set, a health
ping. It is also the worker's lifeline: when the parent goes away, its end closes and a process
worker exits at once.

Big buffers (bytes, bytearray, memoryview, and anything pickled as a ``PickleBuffer``, from
``SHARED_MIN`` up) travel out of band: the pickle refers to them, and they are copied once into
a shared-memory arena (a memfd both sides map) instead of through the pipe. A frame whose tag
has the ``OOB`` bit carries a body (see ``Payload``) that says where they are. Each worker has
two arenas towards it (one per task it may hold) and one back; the parent frees an inbound
arena when the task's answer comes, and tells the worker in each frame's seconds field how many
outbound arena answers it has read (``acked``). A buffer with no free arena goes inline, after
the pickle in the same frame.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import select
import struct
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

HEADER = struct.Struct("<QBQd")

# parent -> worker
INIT = 1
RUN = 2
# worker -> parent
READY = 10
OK = 11  # payload: the pickled result
RAISED = 12  # payload: pickled (exception pickle or None, type name, message, traceback text)
RESULT_NOT_SERIALIZABLE = 13  # payload: pickled (type name, message)
RESULT_TOO_LARGE = 14  # payload: pickled size in bytes
LOAD_FAILED = 15  # the task could not be unpickled here; payload as RAISED
INTERRUPTED = 17  # the running task was stopped by an interrupt (interpreter workers)
PONG = 18  # task id field: the ping's number
RECYCLE = 19  # payload: pickled resident memory in bytes, over the ceiling
STOLEN = 20  # a task waiting here was taken back by the parent: it will not run here

PING_BIT = 1 << 63  # a control word with this bit is a health ping, not an interrupt
STEAL_BIT = 1 << 62  # ... with this one, a request to give back a task not started yet

OOB = 0x80  # tag bit: the payload is a body with out-of-band buffers (see Payload)

PICKLE_PROTOCOL = 5
_READ_CHUNK = 1 << 20
SHARED_MIN = 1 << 16  # buffers from this size up travel out of band
INLINE = 255  # arena number of a body whose buffers follow its pickle in the frame
_BODY = struct.Struct("<BI")  # arena number, buffer count; then a <Q size and a flag each
_ALIGN = 64


class _Interrupted(BaseException):
    """Raised asynchronously in the running task to stop it (interpreter workers)."""


_main: tuple[str, str] | None = None  # the caller's __main__: ("path", file) or ("module", name)


def _load_main() -> None:
    """Load the caller's ``__main__`` as ``__mp_main__`` (and alias it), as multiprocessing does."""
    import importlib.util

    if _main is None:
        raise ImportError(
            "the task refers to __main__, but the caller's __main__ is not a file or module "
            "(interactive or -c); define task functions in an importable module"
        )
    how, where = _main
    if how == "path":
        spec = importlib.util.spec_from_file_location("__mp_main__", where)
    else:
        spec = importlib.util.find_spec(where)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the caller's main module {where!r}")
    module = importlib.util.module_from_spec(spec)
    module.__name__ = "__mp_main__"  # so its `if __name__ == "__main__":` block does not run
    sys.modules["__mp_main__"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["__mp_main__"]
        raise
    # Pickles name it __main__ (the caller's) or __mp_main__ (ours); `import multiprocessing`
    # inside the script re-points __mp_main__, so both are set after it ran.
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def loads(data: bytes | memoryview, buffers: list[Any] | None = None) -> Any:
    """Unpickle (without copying ``data``), loading the caller's ``__main__`` if it needs it."""
    try:
        return pickle.loads(data, buffers=buffers)
    except (AttributeError, ImportError):
        if "__mp_main__" in sys.modules or _main is None:
            raise
    _load_main()
    return pickle.loads(data, buffers=buffers)


def _reduce_memoryview(view: memoryview) -> tuple[type[memoryview], tuple[bytes]]:
    return memoryview, (view.tobytes(),)  # comes back as a read-only view of bytes


_DISPATCH = {memoryview: _reduce_memoryview}


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


# -- out-of-band buffers -------------------------------------------------------------------


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


_BUFFER_OR_CONTAINER = frozenset({bytes, bytearray, memoryview, tuple, list, dict})


def may_hold_buffers(values: Any) -> bool:
    """Whether any of ``values`` is a buffer or a container (a quick check before encoding)."""
    return not _BUFFER_OR_CONTAINER.isdisjoint(map(type, values))


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
        """The frame body: the buffers go into ``arena`` (numbered ``number``), else inline."""
        sizes = [b.nbytes for b in self.buffers]
        head = bytearray(_BODY.pack(INLINE if arena is None else number, len(sizes)))
        head += struct.pack(f"<{len(sizes)}Q", *sizes) + self.lendable
        parts = [memoryview(bytes(head)), memoryview(self.data)]
        if arena is None:
            return parts + self.buffers
        view = arena.view(_span(sizes), grow=True)
        with view:
            offset = 0
            for buffer in self.buffers:
                view[offset : offset + buffer.nbytes] = buffer
                offset = _aligned(offset + buffer.nbytes)
        return parts


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
        if not depth:
            return obj
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


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _span(sizes: list[int]) -> int:
    return _aligned(sum(_aligned(size) for size in sizes)) or _ALIGN


def decode_body(body: memoryview, arenas: list[Arena]) -> tuple[memoryview, list[Any], Any]:
    """A body's pickle and buffers (views of the frame or of an arena), and the arena's view.

    Release the returned view (if any) once the pickle is loaded: the arena is then free.
    """
    number, count = _BODY.unpack_from(body)
    sizes = struct.unpack_from(f"<{count}Q", body, _BODY.size)
    flags_at = _BODY.size + 8 * count
    lendable = body[flags_at : flags_at + count]
    data_end = len(body) - (sum(sizes) if number == INLINE else 0)
    data = body[flags_at + count : data_end]
    inline = number == INLINE
    held = None if inline else arenas[number].view(_span(list(sizes)))
    source = body if held is None else held
    offset = data_end if inline else 0
    buffers: list[Any] = []
    for size, lend in zip(sizes, lendable, strict=True):
        piece = source[offset : offset + size]
        buffers.append(piece if lend else bytearray(piece))
        offset += size if inline else _aligned(size)
    return data, buffers, held


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


class Arena:
    """A growable shared-memory region, mapped by the parent and one worker (a memfd)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None

    @staticmethod
    def create() -> int | None:
        """A new memfd for an arena, or ``None`` where there is none (not Linux)."""
        try:
            return os.memfd_create("offload-arena", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            return None

    def view(self, size: int, grow: bool = False) -> memoryview:
        """A view of the first ``size`` bytes (the writer grows the region as needed)."""
        if self._map is None or len(self._map) < size:
            have = os.fstat(self.fd).st_size
            if have < size:
                if not grow:
                    raise ValueError("the arena is smaller than the frame says")
                have = max(size, 2 * have)
                os.ftruncate(self.fd, have)
            self._drop_map()
            self._map = mmap.mmap(self.fd, have)
        return memoryview(self._map)[:size]

    def _drop_map(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view is still out: it keeps the map
                self._map.close()
            self._map = None

    def close(self) -> None:
        self._drop_map()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def frame(
    task_id: int, tag: int, payload: bytes | memoryview | list[memoryview], seconds: float
) -> list[memoryview]:
    """One frame as ``writev`` parts: the header, then the payload (whole, or in parts)."""
    if isinstance(payload, list):
        size = sum(part.nbytes for part in payload)
        header = memoryview(HEADER.pack(task_id, tag, size, seconds))
        return [header, *(part for part in payload if part.nbytes)]
    view = memoryview(payload)
    header = memoryview(HEADER.pack(task_id, tag, view.nbytes, seconds))
    return [header, view] if view.nbytes else [header]


class _Channel:
    """Frames over a pair of pipe file descriptors (blocking, this side)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.buffer = bytearray()
        self.frames: deque[tuple[int, int, memoryview]] = deque()
        self.eof = False
        self.acked = 0.0  # how many answers in the outbound arena the parent has read
        self.send_lock = threading.Lock()  # the watcher thread answers pings too

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
        task_id, tag, length, acked = HEADER.unpack_from(buf, 0)
        if length < _READ_CHUNK:
            return
        self.acked = max(self.acked, acked)
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
        self.frames.append((task_id, tag, memoryview(payload)))

    def _parse(self) -> None:
        buf = self.buffer
        start = 0
        size = HEADER.size
        while len(buf) - start >= size:
            task_id, tag, length, acked = HEADER.unpack_from(buf, start)
            end = start + size + length
            if len(buf) < end:
                break
            self.acked = max(self.acked, acked)
            self.frames.append((task_id, tag, memoryview(bytes(buf[start + size : end]))))
            start = end
        if start:
            del buf[:start]

    def receive(self) -> tuple[int, int, memoryview] | None:
        """The next frame, blocking; ``None`` when the parent closed the pipe."""
        while not self.frames:
            if self.eof:
                return None
            self._fill()
        return self.frames.popleft()

    def poll(self) -> None:
        """Take in what has arrived, without waiting (an ack may be in it)."""
        if not self.eof and select.select([self.rfd], [], [], 0)[0]:
            self._fill()

    def send(
        self, task_id: int, tag: int, payload: bytes | list[memoryview] = b"", seconds: float = 0.0
    ) -> None:
        parts = frame(task_id, tag, payload, seconds)
        with self.send_lock:
            while parts:
                written = os.writev(self.wfd, parts)
                while parts and written >= len(parts[0]):
                    written -= len(parts.pop(0))
                if parts and written:
                    parts[0] = parts[0][written:]


def _describe(exc: BaseException) -> tuple[str, str]:
    kind = type(exc)
    try:
        message = str(exc)
    except BaseException:  # a broken __str__ must not take the worker down
        message = f"<{kind.__name__}: str() failed>"
    return f"{kind.__module__}.{kind.__qualname__}", message


def _raised_payload(exc: BaseException) -> bytes:
    type_name, message = _describe(exc)
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException:
        tb = f"{type_name}: {message}\n(the traceback could not be formatted)\n"
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, PICKLE_PROTOCOL)
    except BaseException:
        exc_bytes = None
    return pickle.dumps((exc_bytes, type_name, message, tb), PICKLE_PROTOCOL)


class _Interrupter:
    """Watches the control pipe: interrupt requests, and the parent going away.

    Inside a subinterpreter, ``PyThreadState_SetAsyncExc`` called from this thread reaches the
    interpreter's running thread (called from the main interpreter it does nothing). A task
    blocked in C code is not reached; the parent then quarantines this interpreter. A request
    for a task that has not started yet (a waiting task whose caller gave up, in any kind of
    worker) is kept, and that task never starts: it is answered ``INTERRUPTED``.
    """

    def __init__(self, ctl_fd: int, exit_on_eof: bool, channel: _Channel) -> None:
        self.ctl_fd = ctl_fd
        self.channel = channel
        self.exit_on_eof = exit_on_eof
        self.lock = threading.Lock()
        self.running: int | None = None
        self.last_started = 0  # the task being loaded or run (interrupts wait until it runs)
        self.completed = 0  # the last task whose call ended
        self.early: set[int] = set()  # requests for tasks not started yet
        self.stolen: set[int] = set()  # tasks given back: never run, never answered
        self.delivered = False  # an interrupt was raised in the current task
        self.target = threading.get_ident()
        self.thread = threading.Thread(target=self._watch, name="offload-watch", daemon=False)
        self.thread.start()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self.ctl_fd, 8)
            except OSError:
                data = b""
            if len(data) < 8:
                if self.exit_on_eof:
                    os._exit(0)  # the parent is gone: never outlive it
                return
            task_id = int.from_bytes(data, "little")
            if task_id & PING_BIT:  # answered from this thread: alive even while a task runs
                self.channel.send(task_id & ~PING_BIT, PONG)
                continue
            if task_id & STEAL_BIT:
                self._give_back(task_id & ~STEAL_BIT)
                continue
            with self.lock:
                if self.running == task_id:
                    self.delivered = True
                    _set_async_exc(self.target, _Interrupted)
                elif task_id >= self.last_started:  # not started, or still loading
                    self.early.add(task_id)

    def _give_back(self, task_id: int) -> None:
        """The parent wants a waiting task back (a worker fell idle): yes if it has not begun.

        A task being loaded is given back too, but the loader says ``STOLEN`` once it has let
        go of the task's arena (the parent reuses it on hearing ``STOLEN``).
        """
        with self.lock:
            if task_id <= self.completed or self.running == task_id:
                return  # too late: it runs or ran here, and its answer comes as usual
            self.stolen.add(task_id)
            if self.last_started == task_id:
                return
        self.channel.send(task_id, STOLEN)

    def start_loading(self, task_id: int) -> bool:
        """``task_id`` is about to be loaded here, unless it was given back already."""
        with self.lock:
            if task_id in self.stolen:
                self.stolen.discard(task_id)
                self.completed = max(self.completed, task_id)
                return False
            self.last_started = task_id
            return True

    def claim(self, task_id: int) -> bool:
        """Whether ``task_id`` (loaded, run or failed) is still ours to answer; from now on it
        cannot be taken back. ``False``: it was given back while loading; say ``STOLEN``."""
        with self.lock:
            self.completed = max(self.completed, task_id)
            if task_id not in self.stolen:
                return True
            self.stolen.discard(task_id)
            return False

    def begin(self, task_id: int) -> None:
        """``task_id`` runs now (its call is loaded), unless it was stopped already."""
        with self.lock:
            self.last_started = task_id
            if task_id in self.early or task_id in self.stolen:
                self.early = {i for i in self.early if i > task_id}
                raise _Interrupted
            self.running = task_id

    def finished(self) -> None:
        with self.lock:
            self.completed = max(self.completed, self.last_started)
            self.running = None
            if self.delivered:
                self.delivered = False
                _set_async_exc(self.target, None)  # drop an interrupt that came too late


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


def _resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak (other Unixes)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(rfd: int, wfd: int, ctl_fd: int, *, in_process: bool, stop_flag: Any = None) -> None:
    """Run tasks until the parent closes the task pipe (or, in a process, the control pipe).

    ``stop_flag`` (interpreter workers) is a one-byte buffer shared with the parent: once it is
    set, the parent has given this worker's waiting tasks to another worker, so none may run.
    """
    stop = memoryview(stop_flag) if stop_flag is not None else None
    channel = _Channel(rfd, wfd)
    first = channel.receive()
    if first is None or first[1] != INIT:
        return
    settings: dict[str, Any] = pickle.loads(first[2])
    sys.path[:] = settings["sys_path"]
    global _main
    _main = settings.get("main")
    max_payload: int = settings["max_payload"]
    max_rss: int | None = settings.get("max_rss") if in_process else None
    if settings.get("nice"):
        with contextlib.suppress(OSError):  # this thread: the event loop's keeps its priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(settings["nice"]))
    if in_process and settings.get("rlimit_as"):
        import resource

        limit = int(settings["rlimit_as"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    interrupter = _Interrupter(ctl_fd, exit_on_eof=in_process, channel=channel)
    inbound: list[Arena] = []
    outbound: Arena | None = None
    try:
        inbound, outbound = _open_arenas(settings.get("arenas", ()))
        answers = _Answers(channel, outbound)
        channel.send(0, READY, pickle.dumps({"pid": os.getpid(), "arenas": bool(inbound)}))
        while True:
            frame = channel.receive()
            if frame is None or (stop is not None and stop[0]):
                return
            task_id, tag, payload = frame
            if not interrupter.start_loading(task_id):  # given back before it began
                continue
            tag, answer, seconds = _run_frame(
                tag, payload, inbound, max_payload, interrupter, task_id
            )
            del payload
            if interrupter.claim(task_id):
                answers.send(task_id, tag, answer, seconds)
            else:  # given back while it was loading
                channel.send(task_id, STOLEN)
            del answer
            if max_rss is not None and (rss := _resident_bytes()) > max_rss:
                channel.send(0, RECYCLE, pickle.dumps(rss))
    finally:
        for arena in (*inbound, outbound):
            if arena is not None:
                arena.close()
        # In a subinterpreter, the host thread closes the pipes after this returns (or raises);
        # the parent then closes the control pipe, and join_watcher() can finish.
        _watchers.append(interrupter.thread)


def _run_frame(
    tag: int,
    payload: memoryview,
    arenas: list[Arena],
    limit: int,
    interrupter: _Interrupter,
    task_id: int,
) -> tuple[int, bytes | Payload, float]:
    """Load and run one RUN frame's call (its buffers from ``arenas`` or inline): the answer."""
    if not tag & OOB:
        return _execute(payload, limit, interrupter, task_id, out_of_band=True)
    try:
        data, buffers, held = decode_body(payload, arenas)
    except Exception as exc:  # e.g. no memory left to map the arena
        return LOAD_FAILED, _raised_payload(exc), 0.0
    try:
        return _execute(data, limit, interrupter, task_id, buffers, out_of_band=True)
    finally:
        release(buffers, held)  # the parent reuses the arena once it hears about this task


class _Answers:
    """Sends answers; a big result's buffers go to the outbound arena once it is free."""

    def __init__(self, channel: _Channel, arena: Arena | None) -> None:
        self.channel = channel
        self.arena = arena
        self.written = 0  # answers put in the arena (the parent acks each once it read it)

    def send(self, task_id: int, tag: int, answer: bytes | Payload, seconds: float) -> None:
        if not isinstance(answer, Payload):
            self.channel.send(task_id, tag, answer, seconds)
            return
        arena = self.arena if self._arena_free() else None
        try:
            parts = answer.parts(arena, 0)
        except (OSError, ValueError):  # the arena could not grow (memory): inline then
            arena, parts = None, answer.parts(None, 0)
        self.written += arena is not None
        self.channel.send(task_id, tag | OOB, parts, seconds)

    def _arena_free(self) -> bool:
        if self.arena is None:
            return False
        if self.channel.acked < self.written:
            self.channel.poll()  # the ack for the last one may be on its way
        return self.channel.acked >= self.written


def _open_arenas(fds: Any) -> tuple[list[Arena], Arena | None]:
    """This side's handles on the parent's arenas: the inbound ones, and the outbound one.

    Duplicated: a subinterpreter shares the parent's descriptor numbers, which the parent
    closes when it is done with this worker.
    """
    arenas: list[Arena] = []
    try:
        arenas.extend(Arena(os.dup(fd)) for fd in fds)
    except OSError:  # none then: every buffer goes inline
        for arena in arenas:
            arena.close()
        return [], None
    return arenas[:-1], (arenas[-1] if arenas else None)


_watchers: list[threading.Thread] = []


def join_watcher() -> None:
    """Wait for the watcher thread to end (it does once the parent closes the control pipe)."""
    for thread in _watchers:
        thread.join()


def execute(payload: bytes | memoryview, limit: int) -> tuple[int, bytes, float]:
    """Load and run one pickled ``(fn, args, kwargs)``: the answer's tag, payload and run time.

    For backends that run tasks elsewhere (``offload.dask``): all in band.
    """
    tag, answer, seconds = _execute(payload, limit)
    assert isinstance(answer, bytes)
    return tag, answer, seconds


def _execute(
    payload: bytes | memoryview,
    limit: int,
    interrupter: _Interrupter | None = None,
    task_id: int = 0,
    buffers: list[Any] | None = None,
    out_of_band: bool = False,
) -> tuple[int, bytes | Payload, float]:
    if interrupter is not None:
        interrupter.last_started = task_id
    try:
        # Loading may import modules: an interrupt then could leave one half-imported,
        # so it waits until the call itself begins.
        fn, args, kwargs = loads(payload, buffers)
    except BaseException as exc:
        return LOAD_FAILED, _raised_payload(exc), 0.0
    del payload
    started = time.perf_counter()
    try:
        try:
            if interrupter is not None:
                interrupter.begin(task_id)
            result = fn(*args, **kwargs)
        finally:
            if interrupter is not None:
                interrupter.finished()
    except _Interrupted:
        return INTERRUPTED, b"", time.perf_counter() - started
    except BaseException as exc:
        return RAISED, _raised_payload(exc), time.perf_counter() - started
    elapsed = time.perf_counter() - started
    del fn, args, kwargs
    try:
        depth = 2 if may_hold_buffers((result,)) else 0
        data = encode(result, out_of_band, snapshot=False, depth=depth)  # sent at once
    except BaseException as exc:
        return RESULT_NOT_SERIALIZABLE, pickle.dumps(_describe(exc)), elapsed
    if len(data) > limit:
        return RESULT_TOO_LARGE, pickle.dumps(len(data)), elapsed
    return OK, data, elapsed


def main(argv: list[str]) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent decides what stops, not the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rfd, wfd, ctl_fd = (int(arg) for arg in argv[1:4])
    code = 0
    try:
        serve(rfd, wfd, ctl_fd, in_process=True)
    except BaseException:
        code = 70
        traceback.print_exc()
    finally:
        # Never linger (the watcher thread would keep a broken worker alive): flush and go.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
