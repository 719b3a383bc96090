"""The narrow interface between the dispatcher and the places tasks run (backends).

Calls go down: the dispatcher ``offer``s a ``Ticket`` (a backend takes it if it has room now),
``stop``s one (its deadline passed, its caller left, the manager shuts down), and for streams
gives ``credit`` or ``close``s. Outcomes come up through one callback, ``on_outcome(ticket,
outcome)``, and ``on_capacity()`` says that room may have appeared. A backend never sees a
``Job``, and never decides a caller's fate: it reports what happened to the work.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import anyio.abc

    from ._offload_worker.codec import Payload
    from ._runtime import Runtime
    from ._stats import WorkerInfo

__all__ = ("Backend", "BackendStats", "Outcome", "OutcomeKind", "OutcomeSink", "Ticket")


class Ticket:
    """One task as a backend sees it: what to run and what placement needs to know."""

    __slots__ = (
        "cost",
        "credit",
        "flow",
        "key",
        "name",
        "payload",
        "priority",
        "seq",
        "stream",
        "task_id",
        "via_pipe",
    )

    def __init__(
        self,
        key: int,
        seq: int,
        priority: int,
        flow: object,
        cost: float | None,
        payload: bytes | Payload,
        name: str,
        task_id: str | None,
        stream: bool = False,
        credit: int = 0,
    ) -> None:
        self.key = key  # the dispatcher's handle
        self.seq = seq  # arrival order (FIFO within a priority; kept when it is requeued)
        self.priority = priority  # 0 high, 1 normal, 2 low
        self.flow = flow  # the function or registered type (fair share, estimates)
        self.cost = cost  # estimated run seconds, None when unknown
        self.payload = payload  # the pickled call
        self.name = name
        self.task_id = task_id
        self.stream = stream  # a generator function: items come back as they are made
        self.credit = credit  # streams: items the worker may send before the consumer asks
        self.via_pipe = False  # its buffers could not be mapped once: send them inline

    def __repr__(self) -> str:
        return f"<Ticket #{self.seq} {self.name}>"


class OutcomeKind(enum.Enum):
    ANSWER = "answer"  # the worker answered (result, exception, unpicklable result, ...)
    LOST = "lost"  # the worker died while this task ran (or loaded)
    RETURNED = "returned"  # never started and never will: may run elsewhere
    STOPPED = "stopped"  # was stopped as asked (killed, interrupted, or quarantined)
    PROGRESS = "progress"  # not final: a progress event
    ITEM = "item"  # not final: one item of a stream


class Outcome:
    """What happened to a ticket's work, as the backend saw it.

    ``tag`` and ``payload`` are the worker's answer (``ANSWER``, ``ITEM``, ``PROGRESS``);
    ``buffers`` its out-of-band buffers, or ``loader()`` to read ``(pickle, buffers)`` from
    shared memory (``size`` bytes: a big read belongs in a thread); ``release()`` once decoded;
    ``seconds`` the run time; ``note`` says why for ``LOST``.
    """

    __slots__ = (
        "buffers",
        "kind",
        "loader",
        "note",
        "payload",
        "release",
        "seconds",
        "size",
        "tag",
    )

    def __init__(
        self,
        kind: OutcomeKind,
        tag: int = 0,
        payload: Any = None,
        seconds: float = 0.0,
        note: str = "",
        buffers: list[Any] | None = None,
        release: Callable[[], None] | None = None,
        loader: Callable[[], tuple[Any, list[Any]]] | None = None,
        size: int = 0,
    ) -> None:
        self.kind = kind
        self.tag = tag
        self.payload = payload
        self.seconds = seconds
        self.note = note
        self.buffers = buffers
        self.release = release
        self.loader = loader  # reads the pickle and buffers from shared memory (big: a thread)
        self.size = size  # bytes ``loader`` reads


class OutcomeSink(Protocol):
    """The dispatcher, as backends see it."""

    def on_outcome(self, ticket: Ticket, outcome: Outcome) -> None: ...

    def on_capacity(self) -> None: ...

    def on_failure(self, route: str, error: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class BackendStats:
    """What a backend says about itself for ``WorkerManager.stats()``."""

    kind: str
    workers: int  # ready to take work
    spares: int = 0
    busy: int = 0  # workers running a task now
    holding: int = 0  # tickets held (running or waiting on a worker)
    restarts: int = 0  # workers replaced after a crash, a kill or a quarantine
    recycles: int = 0  # workers replaced by policy
    started: int = 0  # workers started, ever (scaling)
    retired: int = 0  # workers retired for being idle (scaling)
    min_workers: int = 0
    max_workers: int = 0


class Backend(Protocol):
    """Where tickets run: the local pool, or a cluster."""

    kind: str
    #: Whether this backend can report progress events and run streams.
    supports_progress: bool

    def bind(self, sink: OutcomeSink) -> None: ...

    async def start(self, runtime: Runtime, tg: anyio.abc.TaskGroup) -> None:
        """Start the workers (background work goes in ``tg``, the manager's task group)."""
        ...

    def offer(self, ticket: Ticket) -> bool:
        """Take ``ticket`` now if there is room (sent on, or parked behind short work)."""
        ...

    def stop(self, ticket: Ticket) -> None:
        """Make sure ``ticket`` never starts, or stop it if it runs; an outcome follows."""
        ...

    def credit(self, ticket: Ticket, items: int) -> None: ...

    def close_stream(self, ticket: Ticket) -> None: ...

    def drain(self) -> None:
        """Shutdown began: replace no worker from now on."""
        ...

    async def aclose(self, grace: float) -> None:
        """Stop every worker (those holding work within ``grace`` seconds); nothing leaks."""
        ...

    def statistics(self) -> BackendStats: ...

    def worker_statistics(self) -> list[WorkerInfo]: ...

    def worker_pids(self) -> list[int]: ...


class WorkerKind(Protocol):
    """A worker kind given as an object: ``WorkerManager(kind=DaskKind(...))``."""

    name: str

    def create_backend(self, size: int, config: Any, settings: dict[str, Any]) -> Backend:
        """The backend for a manager of ``size`` workers with ``config``; ``settings`` is what
        the manager tells every worker (``sys.path``, the caller's ``__main__``, limits)."""
        ...
