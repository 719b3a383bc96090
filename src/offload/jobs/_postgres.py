"""The PostgreSQL store: psycopg 3, for workers on several hosts.

psycopg's async connections need asyncio, and offload runs on trio too, so the store uses
psycopg's blocking connections from a small pool, each operation in a worker thread
(``anyio.to_thread``). Claims take rows with ``FOR UPDATE SKIP LOCKED``: two workers never
take the same job, and neither waits for the other. An enqueue (and anything else that makes
a job due) sends ``NOTIFY`` in the same statement; a waiting worker holds one extra connection
that ``LISTEN``\\ s, and waits for its socket to become readable on the event loop
(``anyio.wait_readable``), so it wakes within a round trip and uses no CPU while idle; being
cancelled stops the wait at once. A lost listening connection is reopened (with a back-off),
and the worker looks at the store after each reconnection.

Times come from the server's clock: its offset to this host's clock is measured when the store
opens and every minute after, so leases mean the same on every host.

URL: any libpq URL (``postgresql://user@/dbname?host=/run/postgresql``); the password never
appears in an error message or a log line. The table lives in the connection's first schema on
``search_path`` (``?options=-csearch_path%3Dmyschema``), and the notification channel is named
after that schema, so two schemas in one database do not wake each other's workers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio

from ._errors import StoreError, StoreFull, StoreUnavailable
from ._store import SCHEMA_VERSION, Store, Subscription, log

if TYPE_CHECKING:
    import psycopg

__all__ = ("PostgresStore", "redact")

T = TypeVar("T")

_LOCK_KEY: Final = 0x0FF10AD10B5  # pg_advisory_xact_lock key for schema changes
_CLOCK_EVERY: Final = 60.0  # seconds between clock-offset measurements

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS offload_jobs (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        queue text NOT NULL,
        type text NOT NULL,
        data text NOT NULL,
        state text NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
        priority smallint NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        retries integer NOT NULL DEFAULT 0,
        backoff text NOT NULL,
        retry_until double precision,
        retry_on text,
        timeout double precision,
        created_at double precision NOT NULL,
        run_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision,
        lease_until double precision,
        worker text,
        token text,
        error_code text,
        error_type text,
        error text,
        traceback text,
        result text
    )""",
    "CREATE INDEX IF NOT EXISTS offload_jobs_due "
    "ON offload_jobs (queue, priority, run_at, seq) WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_next "
    "ON offload_jobs (queue, run_at) WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_lease "
    "ON offload_jobs (lease_until) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_token ON offload_jobs (token) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS offload_jobs_finished "
    "ON offload_jobs (state, queue, finished_at) WHERE state IN ('done', 'failed')",
)


def redact(url: str) -> str:
    """The URL without its password (``postgresql://user:***@host/db``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc[-1]}"))


def _psycopg() -> Any:
    try:
        import psycopg
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the PostgreSQL job store needs psycopg 3 ({exc.name} is missing): "
            "install offload's postgres extra (pip install '.[postgres]' in offload's checkout)"
        ) from None
    return psycopg


class PostgresStore(Store):
    named_params_pct = True
    claim_lock = "FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, pool_size: int = 4) -> None:
        super().__init__(redact(url))
        self._psycopg = _psycopg()
        self.url = url
        self.width = pool_size
        self._free: list[psycopg.Connection[Any]] = []
        self._all: set[psycopg.Connection[Any]] = set()
        self._lock = threading.Lock()
        self._offset = 0.0
        self._clock_at = 0.0
        self.channel = "offload_jobs"

    # -- connections -----------------------------------------------------------------------

    def _new_connection(self) -> psycopg.Connection[Any]:
        try:
            conn: psycopg.Connection[Any] = self._psycopg.connect(self.url, autocommit=True)
        except self._psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot connect to the job store {self.display_url}: {_first_line(exc)}"
            ) from None
        with self._lock:
            self._all.add(conn)
        return conn

    def _connect_all(self) -> None:
        conn = self._new_connection()
        self._measure_clock(conn)
        schema = conn.execute("SELECT current_schema()").fetchone()
        if schema is None or schema[0] is None:
            conn.close()
            raise StoreError(
                f"the job store {self.display_url} has no schema to create its table in "
                "(search_path names none that exists)"
            )
        self.channel = "offload_jobs" if schema[0] == "public" else f"offload_jobs.{schema[0]}"
        with self._lock:
            self._free.append(conn)

    def _close_all(self) -> None:
        with self._lock:
            conns, self._all, self._free = list(self._all), set(), []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    def _with_connection(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            conn = self._free.pop() if self._free else None
        if conn is None:
            conn = self._new_connection()
        broken = False
        try:
            if time.monotonic() - self._clock_at > _CLOCK_EVERY:
                self._measure_clock(conn)
            return fn(conn)
        except self._psycopg.Error as exc:
            broken = conn.closed or conn.broken
            raise self._error(exc) from None
        finally:
            with self._lock:
                if broken or conn not in self._all:
                    self._all.discard(conn)
                    conn.close()
                else:
                    self._free.append(conn)

    def _error(self, exc: BaseException) -> StoreError:
        errors = self._psycopg.errors
        where = f"the job store {self.display_url}"
        if isinstance(exc, errors.DiskFull):
            return StoreFull(f"{where}: the server's disk is full; nothing was written")
        if isinstance(exc, self._psycopg.OperationalError):
            return StoreUnavailable(f"lost {where}: {_first_line(exc)}")
        return StoreError(f"{where} failed: {type(exc).__name__}: {_first_line(exc)}")

    def _measure_clock(self, conn: psycopg.Connection[Any]) -> None:
        before = time.time()
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        after = time.time()
        assert row is not None
        self._offset = float(row[0]) - (before + after) / 2
        self._clock_at = time.monotonic()

    def _migrate(self, conn: Any) -> None:
        row = conn.execute("SELECT to_regclass('offload_jobs_meta') IS NOT NULL").fetchone()
        if row[0]:
            self.check_version(_version(conn))
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS offload_jobs_meta "
                "(key text PRIMARY KEY, value text NOT NULL)"
            )
            found = _version(conn)
            self.check_version(found)
            if found is None:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO offload_jobs_meta (key, value) VALUES ('schema_version', %s)",
                    (str(SCHEMA_VERSION),),
                )
            # Later versions: apply the steps from `found` up to SCHEMA_VERSION here.

    # -- dialect ---------------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._offset

    def in_list(self, column: str, param: str) -> str:
        return f"{column} = ANY(CAST(:{param} AS text[]))"

    def list_param(self, values: Sequence[str]) -> Any:
        return list(values)

    def _insert(self, conn: Any, sql: str, params: dict[str, Any]) -> set[str]:
        # One statement (so one round trip and one commit): insert, then notify per queue.
        params["channel"] = self.channel
        rows = conn.execute(
            self.sql(
                f"WITH ins AS ({sql}), note AS (SELECT pg_notify(:channel, queue) "
                "FROM (SELECT DISTINCT queue FROM ins) AS q) "
                "SELECT id FROM ins, (SELECT count(*) FROM note) AS n"
            ),
            params,
        ).fetchall()
        return {row[0] for row in rows}

    def _transaction(self, conn: Any) -> contextlib.AbstractContextManager[None]:
        return conn.transaction()  # type: ignore[no-any-return]

    def _pipeline(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        return conn.pipeline()  # type: ignore[no-any-return]

    def _wake(self, conn: Any, queues: Sequence[str]) -> None:
        for queue in queues:
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, queue))

    async def subscribe(self) -> Subscription:
        listener = PgListener(self)
        await listener.connect()
        return listener


class PgListener(Subscription):
    """One ``LISTEN`` connection; ``wait`` returns on a notification (or a reconnection)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.conn: psycopg.Connection[Any] | None = None
        self._backoff = 0.5

    def _open(self) -> psycopg.Connection[Any]:
        pg = self.store._psycopg
        try:
            conn: psycopg.Connection[Any] = pg.connect(self.store.url, autocommit=True)
            conn.execute(pg.sql.SQL("LISTEN {}").format(pg.sql.Identifier(self.store.channel)))
        except pg.Error as exc:
            raise StoreUnavailable(
                f"cannot listen on the job store {self.store.display_url}: {_first_line(exc)}"
            ) from None
        return conn

    async def connect(self) -> None:
        self.conn = await anyio.to_thread.run_sync(self._open)

    async def wait(self) -> None:
        conn = self.conn
        if conn is None:  # lost earlier: reconnect, then say "look" (we may have missed one)
            await anyio.sleep(self._backoff)
            try:
                await self.connect()
            except StoreUnavailable as exc:
                self._backoff = min(self._backoff * 2, 10.0)
                log.warning("%s; retrying in %.1f s", exc, self._backoff)
                return
            self._backoff = 0.5
            return
        pgconn = conn.pgconn
        try:
            while True:
                pgconn.consume_input()
                if pgconn.notifies() is not None:
                    while pgconn.notifies() is not None:
                        pass
                    return
                await anyio.wait_readable(pgconn.socket)
        except self.store._psycopg.Error as exc:
            log.warning(
                "the job store %s: the listening connection was lost (%s); reconnecting",
                self.store.display_url,
                _first_line(exc),
            )
            await self._drop()

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                anyio.notify_closing(conn.pgconn.socket)
            await anyio.to_thread.run_sync(conn.close)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._drop()


def _version(conn: Any) -> int | None:
    row = conn.execute(
        "SELECT value FROM offload_jobs_meta WHERE key = 'schema_version'"
    ).fetchone()
    return None if row is None else int(row[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
