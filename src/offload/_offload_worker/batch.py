"""Running a chunk of ``wm.map`` items in a worker: one call, one answer, many results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .codec import raised_payload

#: An item's exception pickles within this many bytes in a chunk's answer.
_ITEM_LIMIT = 1 << 20


class ItemFailed:
    """Stands in a chunk's results for an item that raised: its index, and its exception
    (the payload a worker sends for one, or the exception itself when a whole chunk failed).

    Results stay a plain list of values (cheap to pickle and to hand out), and no task's
    own result can be one of these.
    """

    __slots__ = ("chunk", "error", "index")

    def __init__(self, index: int, error: Any, chunk: tuple[int, int] | None = None) -> None:
        self.index = index
        self.error = error
        self.chunk = chunk  #: (first, last) item of a chunk that failed as a whole

    def __reduce__(self) -> tuple[Any, ...]:
        return ItemFailed, (self.index, self.error, self.chunk)


def run_chunk(fn: Callable[[Any], Any], items: list[Any]) -> tuple[list[Any], int]:
    """``fn(item)`` for each item, an ``ItemFailed`` (index within the chunk) for one that
    raised; and how many raised."""
    out: list[Any] = []
    append = out.append
    failed = 0
    for item in items:
        try:
            append(fn(item))
        except Exception as exc:
            append(ItemFailed(len(out), raised_payload(exc, _ITEM_LIMIT)))
            failed += 1
    return out, failed
