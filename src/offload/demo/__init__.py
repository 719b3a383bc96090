"""The ``offload demo`` and ``offload calibrate`` commands.

This package is code of the command line, not of the executor: nothing in offload's core
imports it. ``offload demo`` runs a web app under load three ways (``offload.demo._web``),
``offload demo --local`` a narrated mixed workload (``offload.demo._local``), ``offload
calibrate`` times password-hash costs on this machine (``offload.demo._calibrate``). The
server and the open-loop load generator are also used by ``benchmarks/overload.py``.
"""

from __future__ import annotations

__all__: list[str] = []
