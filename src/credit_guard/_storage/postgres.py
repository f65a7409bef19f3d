"""PostgreSQL: the hot statements in one round trip each, on a dedicated asyncpg pool.

Why not through SQLAlchemy: checking a connection out of SQLAlchemy's pool adds a BEGIN
and, on return, a ROLLBACK round trip; measured on this project's machine that cut the
throughput of the very same statement to 0.3x. The charge is the only statement on every
guarded request, so it gets its own pool and is sent as ONE statement with no explicit
transaction: PostgreSQL runs it atomically (the CTE's UPDATE and INSERTs commit together
or not at all). Everything else is ``SqlStore``'s, through SQLAlchemy.

Correctness: under READ COMMITTED a concurrent UPDATE waits for the row lock and then
re-checks ``balance >= cost`` against the committed row, so no interleaving overdraws.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import anyio
import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import StorageUnavailable
from ..schema import accounts, holds, idempotency_keys, ledger
from .base import ChargeOutcome, ChargeRequest, ClaimKind, ClaimOutcome, Completion, KeyClaim
from .batching import ChargeBatcher
from .sql import SqlStore

log = logging.getLogger("credit_guard")

_DEDUCT = f"""
WITH debit AS (
    UPDATE {accounts.name}
       SET balance = balance - $2::bigint, updated_at = now()
     WHERE organization_id = $1 AND balance >= $2::bigint
 RETURNING balance
), entry AS (
    INSERT INTO {ledger.name}
           (organization_id, kind, amount, balance_after, feature_key, user_id, request_method, request_path)
    SELECT $1, 'charge', -$2::bigint, balance, $3, $4, $5, $6 FROM debit
 RETURNING id, balance_after
), hold AS (
    INSERT INTO {holds.name} (charge_id, expires_at)
    SELECT id, $7::timestamptz FROM entry WHERE $7::timestamptz IS NOT NULL
)
SELECT (SELECT id FROM entry) AS charge_id,
       (SELECT balance_after FROM entry) AS balance_after,
       (SELECT balance FROM {accounts.name} WHERE organization_id = $1) AS available
"""
# The idempotent charge, also ONE statement: claim the key (or take over a dead or expired
# one), then debit, ledger and hold only if the claim succeeded. The charge's ledger id is
# drawn first so the key row can name it in the same statement. A claim whose debit finds
# the balance short must not stay (the key would block the retry after a top-up): the last
# SELECT then divides by zero, which aborts the statement and so everything it wrote.
_CLAIM_AND_DEDUCT = f"""
WITH new_charge AS (
    SELECT nextval(pg_get_serial_sequence('{ledger.name}', 'id')) AS id
), claim AS (
    INSERT INTO {idempotency_keys.name} AS k
           (organization_id, idempotency_key, fingerprint, state, charge_id, status_code,
            response_headers, response_body, body_stored, locked_until, expires_at, created_at)
    SELECT $1, $8, $9, 'running', id, NULL, NULL, NULL, true, $10::timestamptz, $11::timestamptz, $12::timestamptz
      FROM new_charge
    ON CONFLICT (organization_id, idempotency_key) DO UPDATE
       SET fingerprint = EXCLUDED.fingerprint, state = 'running', charge_id = EXCLUDED.charge_id,
           status_code = NULL, response_headers = NULL, response_body = NULL, body_stored = true,
           locked_until = EXCLUDED.locked_until, expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at
     WHERE (k.state = 'done' AND k.expires_at < $12::timestamptz)
        OR (k.state = 'running' AND k.locked_until < $12::timestamptz
            AND NOT EXISTS (SELECT 1 FROM {holds.name} h WHERE h.charge_id = k.charge_id))
 RETURNING charge_id
), debit AS (
    UPDATE {accounts.name}
       SET balance = balance - $2::bigint, updated_at = now()
     WHERE organization_id = $1 AND balance >= $2::bigint AND EXISTS (SELECT 1 FROM claim)
 RETURNING balance
), entry AS (
    INSERT INTO {ledger.name}
           (id, organization_id, kind, amount, balance_after, feature_key, user_id, request_method, request_path)
    SELECT (SELECT charge_id FROM claim), $1, 'charge', -$2::bigint, balance, $3, $4, $5, $6 FROM debit
 RETURNING id, balance_after
), hold AS (
    INSERT INTO {holds.name} (charge_id, expires_at)
    SELECT id, $7::timestamptz FROM entry WHERE $7::timestamptz IS NOT NULL
)
SELECT (SELECT id FROM entry) AS charge_id,
       (SELECT balance_after FROM entry) AS balance_after,
       EXISTS (SELECT 1 FROM claim) AS claimed,
       CASE WHEN EXISTS (SELECT 1 FROM claim) THEN 1 / (SELECT count(*)::int FROM entry) END AS abort_if_short
"""
# Many charges in ONE statement, decided in arrival order (``ord``) exactly as they would be
# one by one: the accounts are locked once (in key order, so two batches cannot deadlock),
# then a recursive walk over each account's charges accepts one only while what is left
# covers it; the accepted ones draw their ledger ids, and one UPDATE per account, their
# ledger rows and holds are written together. A charge refused here is refused with what
# was left at its turn (never "costs 5, you have 7").
_CHARGE_MANY = f"""
WITH RECURSIVE req AS (
    SELECT r.*, row_number() OVER (PARTITION BY r.org ORDER BY r.ord) AS rn
      FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])
           WITH ORDINALITY AS r(org, cost, feature, user_id, method, path, hold_until, ord)
), acct AS MATERIALIZED (
    SELECT organization_id, balance FROM {accounts.name}
     WHERE organization_id IN (SELECT org FROM req)
     ORDER BY organization_id
       FOR UPDATE
), walk(org, rn, remaining, accepted) AS (
    SELECT organization_id, 0::bigint, balance, false FROM acct
    UNION ALL
    SELECT w.org, r.rn,
           CASE WHEN r.cost <= w.remaining THEN w.remaining - r.cost ELSE w.remaining END,
           r.cost <= w.remaining
      FROM walk w JOIN req r ON r.org = w.org AND r.rn = w.rn + 1
), decided AS MATERIALIZED (
    SELECT r.ord, r.org, r.cost, r.feature, r.user_id, r.method, r.path, r.hold_until,
           coalesce(w.accepted, false) AS accepted, coalesce(w.remaining, 0) AS remaining,
           CASE WHEN w.accepted THEN nextval(pg_get_serial_sequence('{ledger.name}', 'id')) END AS charge_id
      FROM req r LEFT JOIN walk w ON w.org = r.org AND w.rn = r.rn
), debit AS (
    UPDATE {accounts.name} a SET balance = a.balance - t.total, updated_at = now()
      FROM (SELECT org, sum(cost) AS total FROM decided WHERE accepted GROUP BY org) t
     WHERE a.organization_id = t.org
), entry AS (
    INSERT INTO {ledger.name}
           (id, organization_id, kind, amount, balance_after, feature_key, user_id, request_method, request_path)
    SELECT charge_id, org, 'charge', -cost, remaining, feature, user_id, method, path FROM decided WHERE accepted
), hold AS (
    INSERT INTO {holds.name} (charge_id, expires_at)
    SELECT charge_id, hold_until FROM decided WHERE accepted AND hold_until IS NOT NULL
)
SELECT charge_id, remaining FROM decided ORDER BY ord
"""
_KEY_ROW = f"SELECT * FROM {idempotency_keys.name} WHERE organization_id = $1 AND idempotency_key = $2"
_HAS_SEQUENCE = f"SELECT pg_get_serial_sequence('{ledger.name}', 'id') IS NOT NULL"
_BALANCE = f"SELECT balance FROM {accounts.name} WHERE organization_id = $1"
_SETTLE = f"""
DELETE FROM {holds.name} WHERE charge_id = ANY(string_to_array($1::text, ',')::bigint[]) RETURNING charge_id
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


def asyncpg_dsn(url: str | URL) -> str:
    """The SQLAlchemy URL as a DSN asyncpg understands (driver suffix removed)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


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
        **pool_kwargs: Any,
    ) -> None:
        super().__init__(engine, owns_engine=owns_engine)
        self._dsn = asyncpg_dsn(engine.url)
        # An asyncpg pool belongs to the loop that made it: ``_pool_loop`` tells whether the
        # running loop may use it (a guard started again on a new loop makes a new pool).
        self._pool: asyncpg.Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._timeout = timeout
        self._claims: bool | None = None
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
                    self._pool = await asyncpg.create_pool(self._dsn, timeout=self._timeout, **self._pool_kwargs)
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

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        """Alone, one statement; under load, in a batch with the charges queued beside it
        (``batching.py``): one round trip either way."""
        batcher = self._batcher
        if batcher is None or self._batcher_loop is not asyncio.get_running_loop():
            # Made with no await before it: every charge of this loop shares the one batcher.
            batcher = self._batcher = ChargeBatcher(self._charge_one, self._charge_many, max_in_flight=self._in_flight)
            self._batcher_loop = asyncio.get_running_loop()
        return await batcher.charge(request)

    async def _charge_many(self, requests: Sequence[ChargeRequest]) -> list[ChargeOutcome]:
        """Many charges, one statement, one round trip (see ``_CHARGE_MANY``). Without a
        ledger id sequence to draw from (a hand-made table), one statement each."""
        if not await self._supports_claims():
            return [await self._charge_one(request) for request in requests]
        columns: list[list[Any]] = [[], [], [], [], [], [], []]
        for r in requests:
            for column, value in zip(
                columns,
                (
                    r.organization_id,
                    r.credits,
                    r.feature_key,
                    r.user_id,
                    r.request_method,
                    r.request_path,
                    r.hold_until,
                ),
                strict=True,
            ):
                column.append(value)
        try:
            pool = await self._get_pool()
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
            try:
                rows = await conn.fetch(_CHARGE_MANY, *columns)
            finally:
                await pool.release(conn)
        except _UNAVAILABLE as exc:
            log.error("credit_guard: PostgreSQL batch of %d charges failed: %s", len(requests), exc, exc_info=exc)
            raise StorageUnavailable(str(exc)) from exc
        return [ChargeOutcome(int(row[0]) if row[0] is not None else None, int(row[1])) for row in rows]

    async def _charge_one(self, request: ChargeRequest) -> ChargeOutcome:
        """One statement, one round trip (two only when short and the balance moved meanwhile)."""
        try:
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
                row = await conn.fetchrow(
                    _DEDUCT,
                    request.organization_id,
                    request.credits,
                    request.feature_key,
                    request.user_id,
                    request.request_method,
                    request.request_path,
                    request.hold_until,
                )
                assert row is not None
                charge_id, balance_after, available = row
                if charge_id is not None:
                    return ChargeOutcome(int(charge_id), int(balance_after))
                available = int(available or 0)
                if available >= request.credits:
                    # The scalar read saw the statement's snapshot, taken before we waited on
                    # a racing charge; read the committed balance so a 402 never says "enough".
                    available = int(await conn.fetchval(_BALANCE, request.organization_id) or 0)
                return ChargeOutcome(None, available)
            finally:
                await pool.release(conn)
        except _UNAVAILABLE as exc:
            log.error("credit_guard: PostgreSQL charge failed: %s", exc, exc_info=exc)
            raise StorageUnavailable(str(exc)) from exc

    async def _supports_claims(self) -> bool:
        """Whether the ledger's id comes from a sequence the one-statement claim can draw
        from (a table created by ``create_schema`` or the documented migration has one);
        if not, keyed charges take ``SqlStore``'s transaction."""
        if self._claims is None:
            try:
                pool = await self._get_pool()
                async with asyncio.timeout(self._timeout):
                    self._claims = bool(await pool.fetchval(_HAS_SEQUENCE))
            except _UNAVAILABLE as exc:
                raise StorageUnavailable(str(exc)) from exc
            if not self._claims:
                log.warning("credit_guard: %s.id has no sequence; idempotent charges take the slower path", ledger.name)
        return self._claims

    async def claim_and_charge(self, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
        """The keyed charge in one round trip when the key is free (two when it is taken:
        the stored row is read, or the balance when short). A free feature, or the engine
        API's immediate answer (``finish_now``), takes ``SqlStore``'s transaction."""
        if request.credits <= 0 or claim.finish_now or not await self._supports_claims():
            return await super().claim_and_charge(request, claim)
        try:
            pool = await self._get_pool()
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
            try:
                for _ in range(3):
                    try:
                        row = await conn.fetchrow(
                            _CLAIM_AND_DEDUCT,
                            request.organization_id,
                            request.credits,
                            request.feature_key,
                            request.user_id,
                            request.request_method,
                            request.request_path,
                            request.hold_until,
                            claim.key,
                            claim.fingerprint,
                            claim.locked_until,
                            claim.expires_at,
                            claim.now,
                        )
                    except asyncpg.DivisionByZeroError:
                        # Claimed but short: the statement was aborted, the key left free.
                        balance = await conn.fetchval(_BALANCE, request.organization_id)
                        return ClaimOutcome(ClaimKind.INSUFFICIENT, balance=int(balance or 0))
                    assert row is not None
                    if row["claimed"]:
                        return ClaimOutcome(
                            ClaimKind.CLAIMED, charge_id=int(row["charge_id"]), balance=int(row["balance_after"])
                        )
                    stored = await conn.fetchrow(_KEY_ROW, request.organization_id, claim.key)
                    if stored is None:
                        continue  # freed (refunded) between the two statements: claim it again
                    return ClaimOutcome.for_taken(stored, claim.fingerprint)
                # Freed and retaken three times in a row: as busy as can be, say so.
                return ClaimOutcome(ClaimKind.RUNNING, stored={})
            finally:
                await pool.release(conn)
        except _UNAVAILABLE as exc:
            log.error("credit_guard: PostgreSQL idempotent charge failed: %s", exc, exc_info=exc)
            raise StorageUnavailable(str(exc)) from exc

    async def settle_holds(self, charge_ids: Sequence[int], completions: Sequence[Completion] = ()) -> set[int]:
        """Holds alone are closed in ONE statement on the pool (no BEGIN/COMMIT): one round
        trip per batch, not three. Stored responses take SQLAlchemy's pipelined executemany."""
        if completions:
            return await super().settle_holds(charge_ids, completions)
        if not charge_ids:
            return set()
        try:
            pool = await self._get_pool()
            async with asyncio.timeout(self._timeout):
                conn = await pool.acquire()
            try:
                # The ids travel as text: an array parameter would make asyncpg introspect
                # the array type on every pooled connection (extra round trips, measured).
                rows = await conn.fetch(_SETTLE, ",".join(map(str, charge_ids)))
            finally:
                await pool.release(conn)
        except _UNAVAILABLE as exc:
            log.error("credit_guard: PostgreSQL settlement failed: %s", exc, exc_info=exc)
            raise StorageUnavailable(str(exc)) from exc
        return {int(row[0]) for row in rows}
