"""Running a chunk of ``wm.map`` items in a worker: one call, one answer, many results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .codec import raised_payload

#: An item's exception pickles within this many bytes in a chunk's answer.
_ITEM_LIMIT = 1 << 20


def run_chunk(fn: Callable[[Any], Any], items: list[Any]) -> list[tuple[bool, Any]]:
    """``[(True, fn(item)) or (False, the exception's payload), ...]`` for each item."""
    out: list[tuple[bool, Any]] = []
    append = out.append
    for item in items:
        try:
            append((True, fn(item)))
        except Exception as exc:
            append((False, raised_payload(exc, _ITEM_LIMIT)))
    return out
