"""``DaskKind``: the options of the Dask worker kind, checked when it is made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedKind

if TYPE_CHECKING:
    from .._config import Config
    from ._backend import DaskBackend

__all__ = ("DaskKind", "load_distributed")


def load_distributed() -> Any:
    """The ``distributed`` module, or ``UnsupportedKind`` saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise UnsupportedKind(
            f"the dask worker kind needs 'distributed' ({exc}): install offload's dask extra"
            " (pip install '.[dask]' in offload's checkout)"
        ) from None
    return distributed


class DaskKind:
    """Run a manager's tasks on a Dask cluster: ``WorkerManager(kind=DaskKind(...))``.

    >>> kind = DaskKind(address="tcp://10.0.0.5:8786", isolate=True)  # doctest: +SKIP
    >>> async with WorkerManager(kind=kind, max_queue=10_000) as wm:  # doctest: +SKIP
    ...     await wm.run(crunch, data, timeout=30)

    Args:
        address: a scheduler address; offload connects its own ``Client`` (closed on shutdown).
        client: an already started ``distributed.Client(..., asynchronous=True)`` on the
            manager's event loop; offload uses it and never closes it.
        isolate: run each call in a killable child process of its Dask worker, so that a
            deadline, a cancellation or a shutdown stops the work itself and a crashing call
            does not take its Dask worker down (see ``offload.dask`` for the cost).
        in_flight: how many tasks may be in Dask's hands at once (an int >= 1). Default: the
            cluster's total threads, so a task reaches Dask only when a thread is free (strict
            priority order, and a dying worker fails only the task it ran). Raise it to keep
            workers fed when tasks are tiny, or to let an adaptive cluster see more demand.

    With neither ``address`` nor ``client``, the manager starts a development
    ``LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)`` on this
    machine and shuts it down with the manager (``WorkerManager(kind="dask")`` does that).

    Raises ``UnsupportedKind`` (``UNSUPPORTED_KIND``) when ``distributed`` is not installed,
    ``ValueError`` for both ``address`` and ``client``, or a bad ``in_flight``. The manager
    raises ``UnsupportedKind`` when it is started on an event loop other than asyncio.
    """

    name = "dask"
    #: Dask's client is asyncio's: the manager refuses this kind on trio (``UnsupportedKind``).
    any_loop = False

    def __init__(
        self,
        address: str | None = None,
        *,
        client: Any = None,
        isolate: bool = False,
        in_flight: int | None = None,
    ) -> None:
        load_distributed()
        if address is not None and client is not None:
            raise ValueError("give DaskKind an address or a client, not both")
        if in_flight is not None and (
            isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1
        ):
            raise ValueError(f"in_flight must be an int >= 1 or None, not {in_flight!r}")
        self.address = address
        self.client = client
        self.isolate = bool(isolate)
        self.in_flight = in_flight

    def __repr__(self) -> str:
        where = self.address or ("a client" if self.client is not None else "a local cluster")
        return f"<DaskKind {where} isolate={self.isolate} in_flight={self.in_flight}>"

    def create_backend(self, size: int, config: Config, settings: dict[str, Any]) -> DaskBackend:
        """The manager calls this once, when it starts: the backend for this kind's cluster.

        ``size``: the development cluster's worker count (``WorkerManager(workers=N)``);
        ``settings``: what every worker is told (the caller's ``__main__``, limits).
        """
        from ._backend import DaskBackend

        return DaskBackend(self, size, config, settings)
