"""Storage: the ``Store`` protocol and the one that fits a database URL (``open_store``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .base import Store
from .sql import SqlStore
from .sqlite import SqliteStore, is_file_database


def open_store(
    engine: AsyncEngine,
    *,
    owns_engine: bool,
    timeout: float,
    pg_pool_size: int,
    url: URL | None = None,
    **pool_kwargs: Any,
) -> Store:
    """PostgreSQL (asyncpg): hot statements on an asyncpg pool; a SQLite file: one writer
    thread per process; anything else (an in-memory SQLite): the engine alone. ``url``:
    the URL the guard was given, when the engine's lost part of it (``?schema=``)."""
    if engine.url.drivername == "postgresql+asyncpg":
        from .postgres import PostgresStore

        return PostgresStore(
            engine, owns_engine=owns_engine, pool_size=pg_pool_size, timeout=timeout, url=url, **pool_kwargs
        )
    if is_file_database(engine.url):
        return SqliteStore(engine, owns_engine=owns_engine, timeout=timeout)
    return SqlStore(engine, owns_engine=owns_engine)


__all__ = ["Store", "open_store"]
