"""Benchmark suite for offload against its peers: ``python -m benchmarks --help``.

This package is imported inside every worker (processes and subinterpreters alike),
because the task functions live in :mod:`benchmarks._tasks`; keep it free of imports.
"""
