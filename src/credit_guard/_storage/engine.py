"""Building the SQLAlchemy engine with the settings each database needs to be safe.

SQLite is a file shared by every connection of the pool: without WAL, a busy timeout
and ``BEGIN IMMEDIATE``, two concurrent writers make one of them fail with "database
is locked" instead of waiting its turn, and a request would be refused for nothing.
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///credit_guard.db"
#: The async drivers credit_guard runs on, per database: the first is the one to write.
ASYNC_DRIVERS = {"postgresql": ("asyncpg",), "sqlite": ("aiosqlite",)}


def parse_database_url(url: str | URL) -> URL:
    """``url`` parsed, or a ValueError that says which URL to write instead.

    ``postgresql://`` and ``postgres://`` (what hosting providers hand out) name no async
    driver; SQLAlchemy would answer "No module named psycopg2" or "Can't load plugin".
    """
    parsed = make_url(url)
    backend = (
        "postgresql" if parsed.drivername.split("+")[0] in ("postgres", "postgresql") else parsed.get_backend_name()
    )
    drivers = ASYNC_DRIVERS.get(backend)
    if drivers is None:
        raise ValueError(
            f"credit_guard runs on SQLite (sqlite+aiosqlite:///file.db) and PostgreSQL"
            f" (postgresql+asyncpg://user@host/db), not {parsed.drivername!r}"
        )
    if "+" not in parsed.drivername or parsed.drivername.split("+", 1)[1] not in drivers:
        fixed = parsed.set(drivername=f"{backend}+{drivers[0]}").render_as_string(hide_password=True)
        raise ValueError(f"{parsed.drivername}:// has no async driver credit_guard can use: write {fixed}")
    return parsed


#: A PostgreSQL schema name credit_guard accepts in ``?schema=`` (a plain identifier).
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def pg_schema(url: str | URL) -> str | None:
    """The ``?schema=NAME`` of a PostgreSQL URL (Prisma's spelling): the tables live in
    that schema (``search_path``), created by ``create_schema()`` if missing. A name that
    is not a lower-case identifier is refused rather than quoted."""
    parsed = make_url(url)
    name = parsed.query.get("schema")
    if name is None or parsed.get_backend_name() != "postgresql":
        return None
    if not isinstance(name, str) or not _SCHEMA_RE.fullmatch(name):
        raise ValueError(f"?schema= must be one lower-case identifier (letters, digits, _), got {name!r}")
    return name


def build_engine(
    url: str | URL, *, connect_timeout: float = 5.0, pool_size: int | None = None, **engine_kwargs: Any
) -> AsyncEngine:
    """An engine for ``url``; ``connect_timeout`` bounds every wait on the database, and
    ``pool_size`` (when given) is the most connections its pool opens (no overflow).

    On SQLite it is also the busy timeout of its (reading) connections.
    """
    parsed = make_url(url)
    if pool_size is not None and not (parsed.get_backend_name() == "sqlite" and _in_memory(parsed)):
        engine_kwargs.setdefault("pool_size", pool_size)
        engine_kwargs.setdefault("max_overflow", 0)
        engine_kwargs.setdefault("pool_timeout", connect_timeout)
    if parsed.get_backend_name() == "sqlite":
        sqlite_args = {"timeout": connect_timeout, **engine_kwargs.pop("connect_args", {})}
        engine = create_async_engine(parsed, connect_args=sqlite_args, **engine_kwargs)
        _make_sqlite_writers_queue(engine, busy_timeout=connect_timeout)
        return engine
    if parsed.drivername == "postgresql+asyncpg":
        connect_args: dict[str, Any] = {"timeout": connect_timeout, "command_timeout": connect_timeout * 2}
        schema = pg_schema(parsed)
        if schema is not None:
            parsed = parsed.difference_update_query(["schema"])
            connect_args["server_settings"] = {"search_path": schema}
        connect_args.update(engine_kwargs.pop("connect_args", {}))
        engine_kwargs.setdefault("pool_pre_ping", True)
        engine_kwargs.setdefault("pool_timeout", connect_timeout)
        engine = create_async_engine(parsed, connect_args=connect_args, **engine_kwargs)
        _treat_half_closed_as_disconnect(engine)
        return engine
    return create_async_engine(parsed, **engine_kwargs)


def _in_memory(url: URL) -> bool:
    return (url.database or "") in ("", ":memory:") or "mode=memory" in (url.database or "")


def setup_sqlite_connection(dbapi_connection: Any, *, busy_ms: int, wal_wait: float = 10.0) -> None:
    """The settings every SQLite connection of ours runs with (the readers' pool and the
    writer thread alike): WAL, a busy timeout, foreign keys, NORMAL sync.

    Switching a new file to WAL takes a lock that another process starting at the same
    moment may hold (4 workers on a fresh file); SQLite can answer "database is locked"
    at once there instead of waiting, so the switch is retried for up to ``wal_wait``.
    """
    # Let SQLAlchemy's "begin" event, not the driver, decide how a transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        deadline = time.monotonic() + wal_wait
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.001, 0.005))
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _make_sqlite_writers_queue(engine: AsyncEngine, *, busy_timeout: float) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        setup_sqlite_connection(dbapi_connection, busy_ms=int(busy_timeout * 1000))

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Deferred: these connections read (WAL readers take no lock). The writes go
        # through the process's one writer (``_storage/sqlite.py``), which begins IMMEDIATE.
        conn.exec_driver_sql("BEGIN")


def _treat_half_closed_as_disconnect(engine: AsyncEngine) -> None:
    """A connection the server terminated can fail with asyncpg's InternalClientError
    ("cannot switch to state ...") before asyncpg sees the socket closed. Marking that a
    disconnect makes the pool throw the connection away and the next checkout (a refund's
    retry) reconnect, instead of failing again on the same dead connection."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: Any) -> None:
        original = context.original_exception
        if type(original).__name__ == "InternalClientError" or "cannot switch to state" in str(original):
            context.is_disconnect = True
