"""Subinterpreters behind one small adapter: ``concurrent.interpreters`` (3.14+, PEP 734)
where it exists, the private ``_interpreters`` module on 3.13.

Only what an interpreter worker needs: create an isolated interpreter (its own GIL), run code
in it, and close it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Final

from ..errors import UnsupportedKind

__all__ = ("Subinterpreter", "available", "describe_failure")

_NEEDS: Final = (3, 13)  # subinterpreters with their own GIL that load stdlib extension modules


def available() -> None:
    """Raise ``UnsupportedKind`` unless this Python can run interpreter workers."""
    if tuple(sys.version_info[:2]) < _NEEDS:
        raise UnsupportedKind(
            'kind="interpreter" needs Python 3.13 or newer (subinterpreters with their own GIL); '
            f'this is Python {sys.version_info.major}.{sys.version_info.minor}: use kind="process"'
        )
    try:
        _module()
    except ImportError:
        raise UnsupportedKind(
            'kind="interpreter": this Python build has no subinterpreter support; '
            'use kind="process"'
        ) from None


def _module() -> Any:
    if sys.version_info >= (3, 14):
        import concurrent.interpreters

        return concurrent.interpreters
    import _interpreters

    return _interpreters


class Subinterpreter:
    """An isolated subinterpreter (its own GIL); run code in it from one thread at a time."""

    def __init__(self, attempts: int = 3) -> None:
        """Create one. CPython 3.13 occasionally fails a creation made while other threads
        create or destroy interpreters ("interpreter creation failed", seen in its own test
        suite too); a retry a moment later succeeds, so a transient failure is retried."""
        self._public = sys.version_info >= (3, 14)
        module = _module()
        failure: Exception = RuntimeError("no attempt made")
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.05 * attempt)
            try:
                self._handle: Any = module.create() if self._public else module.create("isolated")
                return
            except Exception as exc:
                failure = exc
        raise failure

    def run(self, code: str) -> str | None:
        """Run ``code`` in the interpreter (blocking); the formatted error, if it raised."""
        if self._public:
            try:
                self._handle.exec(code)
            except Exception as exc:  # concurrent.interpreters.ExecutionFailed
                return str(exc)
            return None
        error = _module().exec(self._handle, code)
        if error is None:
            return None
        return str(getattr(error, "formatted", error))

    def close(self) -> None:
        """Destroy the interpreter (it must not be running)."""
        try:
            if self._public:
                self._handle.close()
            else:
                _module().destroy(self._handle)
        except Exception:  # already gone, or still running: nothing more can be done
            pass


def describe_failure(exc: BaseException) -> str:
    """``exc`` and what it was raised from (CPython chains the real reason)."""
    reasons = [f"{exc}"]
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        reasons.append(f"{type(cause).__name__}: {cause}")
    return "; ".join(reasons)
