"""What a Dask worker runs for a task without ``isolate``: the call, in the worker's thread.

The call and its answer use the worker package's codec and tags (``offload._offload_worker``),
so the manager decodes a Dask answer exactly as a process worker's. This module imports only
the standard library and that package: Dask workers import it to find ``run_here``.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

from .._offload_worker import codec
from .._offload_worker import protocol as p

__all__ = ("load_call", "run_here")

#: ``(tag, payload, run seconds)``: a worker package answer (``protocol`` tags).
Answer = tuple[int, bytes, float]


def load_call(body: bytes, oob: bool) -> tuple[Any, Any, Any]:
    """``(fn, args, kwargs)`` from a pickled call; ``oob``: ``body`` is a ``codec.Payload``'s
    inline body (the pickle, then its out-of-band buffers)."""
    if not oob:
        return codec.loads(body)  # type: ignore[no-any-return]
    data, buffers, _ = codec.decode_body(memoryview(body), [])
    return codec.loads(data, buffers)  # type: ignore[no-any-return]


def run_here(body: bytes, oob: bool, limit: int) -> Answer:
    """Run one pickled call in this thread: its answer, as a process worker would give it.

    ``limit``: the manager's ``max_payload`` (bytes) for the result and the exception. A
    function from the caller's ``__main__`` resolves only where that module is loaded already
    (the development cluster's workers are started from it); offload does not load it into a
    shared Dask worker. Isolated children load it as process workers do.
    """
    try:
        fn, args, kwargs = load_call(body, oob)
    except BaseException as exc:
        return p.LOAD_FAILED, codec.raised_payload(exc, limit), 0.0
    del body
    started = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit too: it must not end the Dask worker's thread
        return p.RAISED, codec.raised_payload(exc, limit), time.perf_counter() - started
    elapsed = time.perf_counter() - started
    del fn, args, kwargs
    try:
        data = codec.dumps(result)
    except BaseException as exc:
        return p.RESULT_NOT_SERIALIZABLE, pickle.dumps(codec.describe(exc)), elapsed
    if len(data) > limit:
        return p.RESULT_TOO_LARGE, pickle.dumps(len(data)), elapsed
    return p.OK, data, elapsed
