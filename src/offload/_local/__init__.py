"""Local workers: process and interpreter workers on this machine (the default backend)."""

from ._pool import LocalPool

__all__ = ("LocalPool",)
