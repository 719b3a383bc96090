"""Helpers shared by the built-in tasks: input checks and lazy optional imports.

Nothing here imports a third-party module. Messages name fields and types, never values:
the values are often keys, passwords or tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from ..errors import InvalidInput, UnsupportedKind

__all__ = (
    "NEEDS_CRYPTOGRAPHY",
    "NEEDS_ZSTANDARD",
    "PROCESS_KINDS",
    "as_bytes",
    "check_int",
    "optional_import",
    "shown",
    "unpack",
)

#: Worker kinds for tasks whose dependency refuses to load in an isolated subinterpreter.
PROCESS_KINDS: Final = ("process", "dask")

# Why a type is not declared for interpreter workers (the manager adds what to do about it).
NEEDS_CRYPTOGRAPHY: Final = (
    "it needs 'cryptography', whose Rust extension refuses to load in an isolated subinterpreter"
)
NEEDS_ZSTANDARD: Final = (
    "before Python 3.14 it needs 'zstandard', whose C extension refuses to load in an isolated "
    "subinterpreter (3.14+ uses the stdlib's compression.zstd, which loads anywhere); "
    "compress:gzip/decompress:gzip run anywhere"
)
_REMEDY: Final = (
    "use a WorkerManager(kind='process'); an interpreter manager with process_workers routes "
    "only the dict tasks that need a process to them (jwt:* with RS256/ES256/EdDSA, argon2id, "
    "crypto:encrypt/decrypt, and *:zstd before Python 3.14)"
)


@contextmanager
def optional_import(package: str, extra: str, why_not: str) -> Iterator[None]:
    """Turn the import errors of an optional dependency into useful ones.

    Not installed -> ``ModuleNotFoundError`` naming the pip extra; installed but refusing to
    load here (a subinterpreter) -> ``UnsupportedKind`` saying what to do instead.
    """
    missing: Exception
    try:
        yield
    except ModuleNotFoundError:
        missing = ModuleNotFoundError(
            f"this built-in task needs {package!r}: install offload's {extra} extra"
            f" (pip install '.[{extra}]' in offload's checkout)"
        )
    except ImportError:
        missing = UnsupportedKind(
            f"this built-in task cannot run in this worker: {why_not}; {_REMEDY}"
        )
    else:
        return
    raise missing


def unpack(
    data: object, task_type: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check a dict task's ``data``: a mapping with every required key and no unknown key."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{task_type}: data must be a dict, not {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise InvalidInput(f"{task_type}: data keys must be strings")
    missing = [key for key in required if key not in data]
    if missing:
        raise InvalidInput(f"{task_type}: data is missing {missing}; it takes {list(required)}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise InvalidInput(
            f"{task_type}: unknown data keys {unknown}; it takes {list(required + optional)}"
        )
    return dict(data)


def as_bytes(value: object, field: str, *, allow_str: bool = True) -> bytes:
    """``bytes``-like (or ``str``, UTF-8 encoded) -> ``bytes``; anything else is InvalidInput."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if allow_str and isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    expected = "bytes or str" if allow_str else "bytes"
    raise InvalidInput(f"{field} must be {expected}, not {type(value).__name__}")


def check_int(value: object, field: str, low: int, high: int) -> int:
    """An ``int`` (not ``bool``) in ``[low, high]``; anything else is InvalidInput."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidInput(f"{field} must be between {low} and {high}, not {value}")
    return value


def shown(name: str) -> str:
    """``repr(name)`` if it looks like an algorithm name; else nothing (it may be a secret)."""
    if len(name) <= 16 and name.replace("_", "").replace("-", "").isalnum():
        return repr(name)
    return "(value not shown)"
