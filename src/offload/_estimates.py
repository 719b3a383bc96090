"""Run-time estimates per flow (a function, or a registered task type), from recent runs.

The dispatcher uses them to admit only work that can meet its deadline, to share workers
fairly between flows, to decide what may wait on a busy worker, and to run tiny tasks inline.
An estimate is an exponentially weighted mean of the last runs (weight 0.2 on the newest,
so about the last ten runs count), plus how many runs it has seen.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Final

__all__ = ("Estimates", "flow_of")

_ALPHA: Final = 0.2
_FLOWS: Final = 1024  # the most flows remembered (least recently used ones are forgotten)


def flow_of(fn: Any) -> str:
    """The flow a callable belongs to: its module and qualified name (partials unwrapped)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)  # a bound method's function
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


class Estimates:
    """Per-flow run-time estimates, in seconds."""

    def __init__(self) -> None:
        self._mean: OrderedDict[object, float] = OrderedDict()
        self._runs: dict[object, int] = {}

    def get(self, flow: object) -> float | None:
        """The estimated run seconds of ``flow``, or ``None`` before its first run."""
        return self._mean.get(flow)

    def runs(self, flow: object) -> int:
        return self._runs.get(flow, 0)

    def add(self, flow: object, seconds: float) -> None:
        """Record one run of ``flow`` that took ``seconds``."""
        mean = self._mean.get(flow)
        if mean is None:
            self._mean[flow] = seconds
            self._runs[flow] = 1
            if len(self._mean) > _FLOWS:
                old, _ = self._mean.popitem(last=False)
                self._runs.pop(old, None)
            return
        self._mean[flow] = mean + _ALPHA * (seconds - mean)
        self._runs[flow] += 1
        if self._runs[flow] % 64 == 0:
            self._mean.move_to_end(flow)
