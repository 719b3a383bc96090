"""Command-line helpers: option types with ranges, and a parser whose errors fit on one line.

Every option of ``offload`` takes one of these types, so a bad value (``--workers 0``,
``--seconds -1``, ``--load nan``) ends in one clear line on stderr and exit status 2::

    offload demo: error: argument --workers: must be a whole number >= 1, not '0'
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ("OneLineParser", "count", "seconds", "share")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``PROG: error: WHAT (see PROG
    --help)``, instead of the usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An option type: a whole number from ``low`` (to ``high``).

    >>> count(1)("4")
    4
    """

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be a whole number {_span(low, high)}, not {text!r}"
            )
        return value

    parse.__name__ = "whole number"
    return parse


def seconds(
    low: float = 0.0, *, strict: bool = True, high: float | None = None
) -> Callable[[str], float]:
    """An option type: a finite number of seconds ``> low`` (``>= low`` unless ``strict``).

    >>> seconds()("2.5")
    2.5
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        bad = (
            not math.isfinite(value)
            or value < low
            or (strict and value == low)
            or (high is not None and value > high)
        )
        if bad:
            what = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
            raise argparse.ArgumentTypeError(f"must be a number of seconds {what}, not {text!r}")
        return value

    parse.__name__ = "seconds"
    return parse


def share(low: float, high: float, what: str = "a number") -> Callable[[str], float]:
    """An option type: a finite number ``> low`` and ``<= high``.

    >>> share(0, 1)("0.25")
    0.25
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not low < value <= high:
            raise argparse.ArgumentTypeError(
                f"must be {what} > {low:g} and <= {high:g}, not {text!r}"
            )
        return value

    parse.__name__ = what
    return parse


def _span(low: int, high: int | None) -> str:
    return f">= {low}" if high is None else f"from {low} to {high}"


def stderr_line(text: str) -> None:
    """Print one line on stderr."""
    print(text, file=sys.stderr, flush=True)
