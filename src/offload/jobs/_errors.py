"""Errors of the job store, each an ``OffloadError`` with a stable ``code``.

The tree (under ``offload.OffloadError``)::

    StoreError          STORE_ERROR        the store failed in a way not listed below
    ├── StoreLocked     STORE_LOCKED       the SQLite file stayed locked past the busy timeout
    ├── StoreCorrupt    STORE_CORRUPT      the file is not a database, or it is damaged
    ├── StoreFull       STORE_FULL         the disk is full, or a file-size limit was reached
    ├── StoreUnavailable STORE_UNAVAILABLE the PostgreSQL server cannot be reached
    └── SchemaTooNew    SCHEMA_TOO_NEW     the schema was written by a newer offload
    JobNotFound         JOB_NOT_FOUND      no job with that id (the CLI's ``retry``/``forget``)
    LeaseExpired        LEASE_EXPIRED      the host running a job stopped renewing its lease

Transient errors (``transient`` is true: locked, unavailable) are retried by the worker loop;
the others stop it. In every case the operation that raised changed nothing: an enqueue that
raises stored no job, a worker that cannot record an outcome keeps the job leased until it can
or until the lease runs out (and the job comes back).
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import OffloadError

__all__ = (
    "JobNotFound",
    "LeaseExpired",
    "SchemaTooNew",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreLocked",
    "StoreUnavailable",
)


class StoreError(OffloadError):
    """The job store failed. ``transient``: worth retrying as it is (the worker loop does)."""

    code = "STORE_ERROR"
    transient: ClassVar[bool] = False


class StoreLocked(StoreError):
    """Another connection held the SQLite write lock past the busy timeout (``?timeout=``)."""

    code = "STORE_LOCKED"
    transient = True


class StoreCorrupt(StoreError):
    """The SQLite file is not a database or is damaged. Nothing was written to it."""

    code = "STORE_CORRUPT"


class StoreFull(StoreError):
    """A write failed: the disk is full, or the process hit its file-size limit."""

    code = "STORE_FULL"
    transient = True


class StoreUnavailable(StoreError):
    """The PostgreSQL server refused or dropped the connection."""

    code = "STORE_UNAVAILABLE"
    transient = True


class SchemaTooNew(StoreError):
    """The store's schema version is newer than this offload knows: upgrade offload."""

    code = "SCHEMA_TOO_NEW"


class JobNotFound(OffloadError, LookupError):
    """No job (or no failed job, for ``retry``) has this id."""

    code = "JOB_NOT_FOUND"


class LeaseExpired(OffloadError):
    """Recorded on a job whose lease ran out: the host running it died or lost the store."""

    code = "LEASE_EXPIRED"
