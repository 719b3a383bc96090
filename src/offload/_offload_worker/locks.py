"""Locks the worker's main thread can take while an interrupt may land at any bytecode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ("locked",)

T = TypeVar("T")


def locked(lock: Any, fn: Callable[[], T]) -> T:
    """``fn()`` holding ``lock`` (an ``RLock``), safe against an interrupt landing anywhere.

    An asynchronous exception can be raised right after ``acquire`` returns and before a
    ``with`` block's handler covers it (CPython 3.14 compiles ``with`` so), which would leave
    the lock held for good. Here every such point is covered: the handler releases the lock
    if this thread still owns it. The main thread uses this wherever an interrupt may land.
    """
    try:
        lock.acquire()
        try:
            return fn()
        finally:
            lock.release()
    except BaseException:
        if lock._is_owned():
            lock.release()
        raise
