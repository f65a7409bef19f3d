"""PostgreSQL: the hot statements in one round trip each, on a dedicated asyncpg pool.

Why not through SQLAlchemy: checking a connection out of SQLAlchemy's pool adds a BEGIN
and, on return, a ROLLBACK round trip; measured on this project's machine that cut the
throughput of the very same statement to 0.3x. The charge is the only statement on every
guarded request, so it gets its own pool and is sent as ONE statement with no explicit
transaction: PostgreSQL runs it atomically (the CTE's UPDATE and INSERTs commit together
or not at all). Everything else is ``SqlStore``'s, through SQLAlchemy.

Correctness: the statement locks the account rows before it reads their grants
(``pg_charge.py``), and the grants it reads are the committed ones, so no interleaving
overdraws; the CHECK on each grant's floor backs it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import IntegrityViolation
from ..schema import holds, idempotency_keys, ledger
from .base import ChargeOutcome, ChargeRequest, ClaimOutcome, Completion, KeyClaim
from .batching import ChargeBatcher, Item
from .engine import pg_schema
from .pg_decide import Outcome, decide
from .sql import SqlStore, unavailable

_HAS_SEQUENCE = f"SELECT pg_get_serial_sequence('{ledger.name}', 'id') IS NOT NULL"
_SETTLE = f"""
DELETE FROM {holds.name} WHERE charge_id = ANY(string_to_array($1::text, ',')::bigint[]) RETURNING charge_id
"""
#: The same, with the finished idempotent responses stored in the same statement.
_SETTLE_DONE = f"""
WITH done AS (
    UPDATE {idempotency_keys.name} k
       SET state = 'done', status_code = c.status, response_headers = c.headers, response_body = c.body,
           body_stored = c.stored, expires_at = c.expires
      FROM unnest($2::text[], $3::text[], $4::int[], $5::text[], $6::bytea[], $7::bool[], $8::timestamptz[])
           AS c(org, key, status, headers, body, stored, expires)
     WHERE k.organization_id = c.org AND k.idempotency_key = c.key AND k.state = 'running'
), settled AS (
    DELETE FROM {holds.name} WHERE charge_id = ANY(string_to_array($1::text, ',')::bigint[]) RETURNING charge_id
)
SELECT charge_id FROM settled
"""

# What asyncpg raises when the server is gone, restarting, or too slow to answer.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection the server terminated, used before asyncpg noticed ("cannot switch to state").
    asyncpg.InternalClientError,
)


#: A generic plan is made once, from the tables as they are then: made on an empty table
#: (a new install, a benchmark's first second) it would scan that table whole for as long
#: as the connection lives (measured: keyed charges fell to a third as the keys table
#: grew). Every statement on this pool finds its rows by an index, so sequential scans are
#: ruled out here and the plan stays right at any size.
GENERIC_PLANS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}


def generic_plans(pool_kwargs: dict[str, Any]) -> dict[str, str]:
    """The pool's server settings: the app's, over ``plan_cache_mode = force_generic_plan``.

    The charge statement is planned in 0.7-0.9 ms and runs in well under that: with
    PostgreSQL's default (``auto``), its one-element arrays always look cheaper to plan
    afresh, so every charge paid for planning (measured: 1.8 ms a charge at one
    connection, 1.0 ms with the generic plan; docs/benchmarks.md). A generic plan needs
    a named prepared statement, so where the app turned asyncpg's statement cache off
    (PgBouncer in transaction mode: ``statement_cache_size=0``) nothing is sent, and
    the app's own ``server_settings`` win (``{"plan_cache_mode": "auto"}`` turns it off).
    This pool carries only credit_guard's statements, so nothing else is planned this way.
    """
    if pool_kwargs.get("statement_cache_size", 100) == 0:
        return dict(pool_kwargs.get("server_settings") or {})
    return {**GENERIC_PLANS, **(pool_kwargs.get("server_settings") or {})}


def asyncpg_dsn(url: str | URL) -> str:
    """The SQLAlchemy URL as a DSN asyncpg understands (driver suffix removed; a
    ``?schema=`` becomes the ``search_path`` server setting, which asyncpg reads from a DSN)."""
    parsed = make_url(url)
    schema = pg_schema(parsed)
    if schema is not None:
        parsed = parsed.difference_update_query(["schema"]).update_query_dict({"search_path": schema})
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Used as the pool's ``reset``: asyncpg's default sends ``RESET ALL; UNLISTEN *; ...``
    on every release, a second round trip per charge (measured: 2.00 -> 1.00 per
    request). The pool's connections run only this module's statements, which leave no
    session state behind; asyncpg still rolls back an open transaction before calling this."""


class PostgresStore(SqlStore):
    """``SqlStore`` with the charge, the keyed charge and the batched settlement sent on
    an asyncpg pool of its own (opened on first use, on the loop that uses it)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        owns_engine: bool = True,
        pool_size: int = 10,
        timeout: float = 5.0,
        charges_in_flight: int = 2,
        url: URL | None = None,
        **pool_kwargs: Any,
    ) -> None:
        super().__init__(engine, owns_engine=owns_engine)
        # ``url`` keeps what the engine's URL lost (``?schema=``: a server setting there).
        self._dsn = asyncpg_dsn(url or engine.url)
        # An asyncpg pool belongs to the loop that made it: ``_pool_loop`` tells whether the
        # running loop may use it (a guard started again on a new loop makes a new pool).
        self._pool: asyncpg.Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._timeout = timeout
        # Charges decided together under load (one batcher per event loop: its futures are the loop's).
        self._batcher: ChargeBatcher | None = None
        self._batcher_loop: asyncio.AbstractEventLoop | None = None
        #: Charge statements in flight at once before the next charges queue for a batch.
        self._in_flight = max(1, min(charges_in_flight, pool_size))
        self._pool_kwargs = {
            "min_size": 1,
            "max_size": pool_size,
            "command_timeout": timeout,
            "reset": _keep_session,
            **pool_kwargs,
        }
        settings = generic_plans(pool_kwargs)
        if settings:
            self._pool_kwargs["server_settings"] = settings

    async def _get_pool(self) -> asyncpg.Pool:
        """The running loop's pool, made on first use (one maker at a time per loop)."""
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._pool_loop is loop:
            return self._pool
        if self._pool_loop is not loop:
            self._abandon()
            self._pool_loop, self._lock = loop, asyncio.Lock()
        assert self._lock is not None
        async with self._lock:
            if self._pool is None:
                with anyio.fail_after(self._timeout):
                    pool = await asyncpg.create_pool(self._dsn, timeout=self._timeout, **self._pool_kwargs)
                    has_sequence = await pool.fetchval(_HAS_SEQUENCE)
                if not has_sequence:
                    await pool.close()
                    # The charge statement takes each ledger id from the table's sequence
                    # (create_schema and the documented migrations make one).
                    raise RuntimeError(
                        f"credit_guard: {ledger.name}.id has no sequence (a table made by hand?):"
                        " create the tables with create_schema() or the migration in docs/alembic.md"
                    )
                self._pool = pool
        return self._pool

    def _abandon(self) -> None:
        """Drop a pool made on another loop (ended without close()): it cannot be awaited
        from here, so its sockets are cut without a goodbye."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.terminate()
            except Exception:  # its loop is closed: the sockets die with the process
                pass

    async def close(self) -> None:
        """Close the pool (the next use, on any loop, opens a new one) and the engine's."""
        if self._pool is not None and self._pool_loop is not asyncio.get_running_loop():
            self._abandon()
        elif self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        self._pool_loop = self._lock = None
        await super().close()

    def _batcher_here(self) -> ChargeBatcher:
        batcher = self._batcher
        if batcher is None or self._batcher_loop is not asyncio.get_running_loop():
            # Made with no await before it: every charge of this loop shares the one batcher.
            batcher = self._batcher = ChargeBatcher(self._decide_one, self._decide, max_in_flight=self._in_flight)
            self._batcher_loop = asyncio.get_running_loop()
        return batcher

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        """Alone, one statement; under load, in a batch with the charges queued beside it
        (``batching.py``): one round trip either way."""
        return await self._batcher_here().charge(request)  # type: ignore[no-any-return]

    async def claim_and_charge(self, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
        """A keyed charge, batched with the others: its key is claimed by the statement
        that charges for it, and only if the charge is taken (a refusal leaves the key
        free for the retry after a top-up). A taken key is answered from its row, in the
        same round trip. A free feature, or the engine API's immediate answer
        (``finish_now``), takes ``SqlStore``'s transaction (the same charge statement)."""
        if request.credits <= 0 or claim.finish_now:
            return await super().claim_and_charge(request, claim)
        return await self._batcher_here().charge(request, claim)  # type: ignore[no-any-return]

    async def _decide(self, items: Sequence[Item]) -> list[Outcome]:
        """Many charges, one statement, one round trip (``pg_decide.py``)."""
        try:
            async with self._connection() as conn:
                return await decide(conn, items)
        except _UNAVAILABLE as exc:
            raise unavailable(exc) from exc  # logged there, with the driver's error

    async def _decide_one(self, request: ChargeRequest, claim: KeyClaim | None) -> ChargeOutcome | ClaimOutcome:
        outcome = (await self._decide([(request, claim)]))[0]
        if isinstance(outcome, IntegrityViolation):
            raise outcome
        return outcome

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        pool = (
            self._pool
            if self._pool_loop is asyncio.get_running_loop() and self._pool is not None
            else await self._get_pool()
        )
        # asyncio.timeout rather than acquire(timeout=): before Python 3.12 asyncpg
        # implements the latter with asyncio.wait_for, which creates a Task per call.
        async with asyncio.timeout(self._timeout):
            conn = await pool.acquire()
        try:
            yield conn
        finally:
            await pool.release(conn)

    async def settle_holds(self, charge_ids: Sequence[int], completions: Sequence[Completion] = ()) -> set[int]:
        """Holds closed, and finished idempotent responses stored, in ONE statement on the
        pool (no BEGIN/COMMIT): one round trip per settlement batch."""
        if not charge_ids and not completions:
            return set()
        # The ids travel as text: an array parameter of them made asyncpg introspect the
        # array type on every pooled connection (extra round trips, measured).
        ids = ",".join(map(str, charge_ids))
        try:
            async with self._connection() as conn:
                if not completions:
                    rows = await conn.fetch(_SETTLE, ids)
                else:
                    rows = await conn.fetch(
                        _SETTLE_DONE,
                        ids,
                        [done.organization_id for done in completions],
                        [done.idempotency_key for done in completions],
                        [done.status_code for done in completions],
                        [done.response_headers for done in completions],
                        [done.response_body for done in completions],
                        [done.body_stored for done in completions],
                        [done.expires_at for done in completions],
                    )
        except _UNAVAILABLE as exc:
            raise unavailable(exc) from exc  # logged there, with the driver's error
        return {int(row[0]) for row in rows}
