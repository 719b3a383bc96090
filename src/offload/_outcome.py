"""Turning a worker's answer into the caller's result or exception."""

from __future__ import annotations

import pickle
import sys
from typing import Any

from ._offload_worker import protocol as p
from .errors import NotSerializable, PayloadTooLarge, TaskFailed, UnsupportedKind

__all__ = ("RemoteTraceback", "alias_main", "decode", "loads")


class RemoteTraceback(Exception):
    """Chained as ``__cause__`` of a task's exception: the traceback from inside the worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def loads(data: bytes | memoryview, buffers: list[Any] | None = None) -> Any:
    # A class a worker defined in the caller's __main__ comes back as __mp_main__: the manager
    # aliases that name to __main__ when it starts (see alias_main).
    return pickle.loads(data, buffers=buffers)


def alias_main() -> None:
    """Let ``__mp_main__`` (how workers name the caller's main module) resolve here too."""
    main = sys.modules.get("__main__")
    if main is not None:
        sys.modules.setdefault("__mp_main__", main)


def decode(
    tag: int,
    payload: memoryview | bytes,
    kind: str,
    task_id: str | None,
    buffers: list[Any] | None = None,
) -> Any:
    """The result for an answer ``tag``/``payload`` (and its out-of-band ``buffers``); raises
    the task's exception or the error that stands for it."""
    if tag == p.OK or tag == p.ITEM:
        try:
            return loads(payload, buffers)
        except BaseException as exc:  # the result's own code ran here: it must not escape
            raise NotSerializable(
                f"the result could not be unpickled here: {type(exc).__name__}: {exc}",
                task_id=task_id,
            ) from None
    if tag == p.RAISED or tag == p.LOAD_FAILED:
        raise rebuild(pickle.loads(payload), tag, kind, task_id)
    if tag == p.RESULT_NOT_SERIALIZABLE:
        type_name, message = pickle.loads(payload)
        raise NotSerializable(
            f"the result could not be pickled: {type_name}: {message}", task_id=task_id
        )
    if tag == p.RESULT_TOO_LARGE:
        size = pickle.loads(payload)
        raise PayloadTooLarge(
            f"the result is {size} bytes pickled, over the manager's max_payload; "
            "return less, or raise max_payload",
            task_id=task_id,
        )
    raise TaskFailed(f"unexpected answer tag {tag} from the worker", task_id=task_id)


def rebuild(
    info: tuple[bytes | None, str, str, str], tag: int, kind: str, task_id: str | None
) -> BaseException:
    """The exception a task raised (or ``TaskFailed`` standing for it)."""
    exc_bytes, type_name, message, tb = info
    if kind == "interpreter" and "ImportError" in type_name and _refuses_subinterpreters(message):
        return UnsupportedKind(
            f"the task imports a module that cannot load in a subinterpreter ({message}); "
            "run it on process workers (kind='process', or give an interpreter manager "
            "process_workers and register the task type with kinds=('process',))",
            task_id=task_id,
        )
    exc: BaseException | None = None
    if exc_bytes is not None:
        try:
            exc = loads(exc_bytes)
        except BaseException:
            exc = None
    if not isinstance(exc, Exception) or isinstance(exc, StopIteration | StopAsyncIteration):
        # Not rebuildable here, a BaseException (SystemExit, KeyboardInterrupt) that must not
        # escape into the caller's event loop as itself, or a StopIteration (which a future
        # cannot carry: it would end the awaiting coroutine's frame).
        what = "could not be loaded" if tag == p.LOAD_FAILED else "raised"
        failed = TaskFailed(
            f"the task {what}: {type_name}: {message}",
            task_id=task_id,
            exc_type=type_name,
            remote_traceback=tb,
        )
        failed.__cause__ = RemoteTraceback(tb)
        return failed
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def _refuses_subinterpreters(message: str) -> bool:
    # CPython: "module X does not support loading in subinterpreters"
    return "subinterpreter" in message or "sub-interpreter" in message
