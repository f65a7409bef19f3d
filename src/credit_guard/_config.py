"""Small facts of a guard's configuration, shared by the facade and the web flow."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.engine import URL

DATABASE_URL_ENV = "CREDIT_GUARD_DATABASE_URL"
#: Takes the framework's request object (anything with ``.state``, ``.headers``, ``.scope``)
#: and returns the id, or None when the request has none. May be sync or async.
Resolver = Callable[[Any], "str | Awaitable[str | None] | None"]
#: Honour ``Idempotency-Key`` (True), require it ("required"), or not (False).
IdempotencyMode = bool | Literal["required"]
#: The largest ``max_overage``: reported usage may cost up to 101 times the reserve.
MAX_OVERAGE_SHARE = 100


def check_idempotency(mode: object, *, optional: bool = False) -> None:
    """``mode`` is an IdempotencyMode (or None, when ``optional``: the guard's default)."""
    if not (mode is None and optional) and mode not in (True, False, "required"):
        raise ValueError(f"idempotency must be True, False or 'required', got {mode!r:.40}")
    if isinstance(mode, int) and not isinstance(mode, bool):  # 1 == True, but is no mode
        raise ValueError(f"idempotency must be True, False or 'required', got {mode!r:.40}")


def check_max_overage(share: object) -> None:
    """``share``: how far above its reserve reported usage may be charged, 0 to 100."""
    if (
        isinstance(share, bool)
        or not isinstance(share, int | float)
        or share != share  # NaN
        or not 0 <= share <= MAX_OVERAGE_SHARE
    ):
        raise ValueError(f"max_overage must be a share of the reserve from 0 to {MAX_OVERAGE_SHARE}, got {share!r:.40}")


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """The database connections one guard opens per process, by use."""

    #: PostgreSQL's LISTEN connection for other processes' pricing changes.
    listener: int
    #: SQLAlchemy's pool: refunds, settlements, sweeps, admin and reads on PostgreSQL;
    #: the readers on SQLite.
    sqlalchemy: int
    #: PostgreSQL's asyncpg pool: every charge, and the batched settlement.
    asyncpg: int = 0
    #: SQLite's one writing connection (``_storage/sqlite.py``).
    writer: int = 0

    @property
    def total(self) -> int:
        return self.listener + self.sqlalchemy + self.asyncpg + self.writer

    @classmethod
    def of(cls, max_connections: int, url: URL, *, listens: bool, asyncpg: int | None = None) -> ConnectionBudget:
        if url.get_backend_name() == "sqlite":
            return cls(0, max(1, max_connections - 1), writer=1)
        listener = 1 if listens else 0
        rest = max_connections - listener
        # The charges want the connections: SQLAlchemy's work (refunds, settlements with
        # stored responses, sweeps, admin) is rare and short. Measured: 6 of 10 for asyncpg
        # cost the decorator 0.10 of its ratio to the one-statement limit (10 connections).
        sqlalchemy = max(1, rest // 5)
        return cls(listener, sqlalchemy, asyncpg if asyncpg is not None else max(1, rest - sqlalchemy))
