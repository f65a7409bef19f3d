"""The money statements, written once in SQLAlchemy Core for every dialect.

Every write is one short transaction whose correctness rests on the database, never on
a value read into Python first:

* charge: ``UPDATE accounts SET balance = balance - :cost WHERE balance >= :cost RETURNING``;
  no row back means not enough credits, so two racing requests can never both pass;
* refund: the ledger's UNIQUE ``refund_of`` makes a second refund of one charge fail
  inside the database, rolling back its balance change with it;
* grant: an upsert (the first top-up creates the account), conditional on the maximum
  balance, and unique per (organization, idempotency key).

Each write is a plain function of a *sync* SQLAlchemy ``Connection`` (``_charge_in``,
``_refund_in``...), so one body serves both ways of running it: ``SqlStore._write`` runs
it through the async engine (``run_sync``), and on SQLite ``SqliteStore`` hands it to the
process's one writer thread, which commits many of them in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Row,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy import Date as SqlDate
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from .._clock import utcnow
from ..errors import DuplicateFeature, PricingNotFound, StorageUnavailable
from ..models import AuditIssue, FeaturePricing, RefundResult, UsageGroup, UsageRow
from ..schema import MAX_BALANCE, accounts, feature_pricing, holds, idempotency_keys, ledger, metadata
from .base import (
    ChargeOutcome,
    ChargeRequest,
    ClaimKind,
    ClaimOutcome,
    Completion,
    GrantOutcome,
    GrantStatus,
    KeyClaim,
    UsageSettlement,
)

log = logging.getLogger("credit_guard")
T = TypeVar("T")
#: A write: a function of a sync connection inside the transaction that runs it.
Work = Callable[[Connection], T]

#: The PostgreSQL advisory lock ``create_schema`` holds (a constant: ``credit_g`` in ASCII).
SCHEMA_LOCK_ID = 0x6372656469745F67

#: What a refund or a settlement copies from the charge it answers.
_CHARGE_COLUMNS = (
    ledger.c.organization_id,
    ledger.c.amount,
    ledger.c.feature_key,
    ledger.c.user_id,
    ledger.c.request_method,
    ledger.c.request_path,
)


def pricing_from_row(row: Row[Any] | Mapping[str, Any]) -> FeaturePricing:
    m = row._mapping if isinstance(row, Row) else row
    return FeaturePricing(
        id=m["id"],
        feature_key=m["feature_key"],
        feature_name=m["feature_name"],
        category=m["category"],
        credits=int(m["credits"]),
        description=m["description"],
        is_active=bool(m["is_active"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


def _new_pricing_row(fields: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A pricing row to insert: validated fields plus the id and stamps the store owns."""
    return {
        "id": str(uuid.uuid4()),
        "description": None,
        "is_active": True,
        **fields,
        "created_at": now,
        "updated_at": now,
    }


def _upsert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


class _Abandon(Exception):
    """Rolls back a claim whose charge the balance could not cover."""

    def __init__(self, balance: int) -> None:
        self.balance = balance


def unavailable(exc: BaseException) -> StorageUnavailable:
    """A driver's failure as the one exception the web layer turns into a 503."""
    log.error("credit_guard storage error: %s", exc, exc_info=exc)
    return StorageUnavailable(str(exc))


# -- the write bodies: one transaction each, on a sync connection ---------------------------


def _balance_in(conn: Connection, organization_id: str) -> int:
    value = conn.scalar(select(accounts.c.balance).where(accounts.c.organization_id == organization_id))
    return int(value or 0)


def _granted_in(conn: Connection, organization_id: str, idempotency_key: str) -> GrantOutcome | None:
    row = conn.execute(
        select(ledger.c.id, ledger.c.amount).where(
            ledger.c.organization_id == organization_id,
            ledger.c.idempotency_key == idempotency_key,
            ledger.c.kind == "grant",
        )
    ).first()
    if row is None:
        return None
    return GrantOutcome(GrantStatus.ALREADY_GRANTED, _balance_in(conn, organization_id), int(row.id), int(row.amount))


def _grant_in(
    conn: Connection, dialect: str, organization_id: str, amount: int, reason: str | None, idempotency_key: str | None
) -> GrantOutcome:
    if idempotency_key is not None:
        done = _granted_in(conn, organization_id, idempotency_key)
        if done is not None:
            return done
    now = utcnow()
    values = _upsert(dialect)(accounts).values(
        organization_id=organization_id, balance=amount, created_at=now, updated_at=now
    )
    stmt = values.on_conflict_do_update(
        index_elements=[accounts.c.organization_id],
        set_={"balance": accounts.c.balance + values.excluded.balance, "updated_at": now},
        where=accounts.c.balance <= MAX_BALANCE - values.excluded.balance,
    ).returning(accounts.c.balance)
    balance = conn.execute(stmt).scalar_one_or_none()
    if balance is None:
        return GrantOutcome(GrantStatus.OVER_LIMIT, _balance_in(conn, organization_id))
    entry_id = conn.execute(
        insert(ledger)
        .values(
            organization_id=organization_id,
            kind="grant",
            amount=amount,
            balance_after=balance,
            reason=reason,
            idempotency_key=idempotency_key,
            created_at=now,
        )
        .returning(ledger.c.id)
    ).scalar_one()
    return GrantOutcome(GrantStatus.GRANTED, int(balance), int(entry_id), amount)


def _charge_in(conn: Connection, request: ChargeRequest, charge_id: int | None = None) -> ChargeOutcome:
    now = utcnow()
    credits = request.credits
    balance = conn.execute(
        update(accounts)
        .where(and_(accounts.c.organization_id == request.organization_id, accounts.c.balance >= credits))
        .values(balance=accounts.c.balance - credits, updated_at=now)
        .returning(accounts.c.balance)
    ).scalar_one_or_none()
    if balance is None:
        return ChargeOutcome(None, _balance_in(conn, request.organization_id))
    row = {
        "organization_id": request.organization_id,
        "kind": "charge",
        "amount": -credits,
        "balance_after": balance,
        "feature_key": request.feature_key,
        "user_id": request.user_id,
        "request_method": request.request_method,
        "request_path": request.request_path,
        "created_at": now,
    }
    new_id = conn.execute(insert(ledger).values(**row).returning(ledger.c.id)).scalar_one()
    if request.hold_until is not None:
        conn.execute(insert(holds).values(charge_id=new_id, expires_at=request.hold_until))
    return ChargeOutcome(int(new_id), int(balance))


def _claim_and_charge_in(conn: Connection, dialect: str, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
    """Claim the key and charge for it; a short balance raises _Abandon (rolling the claim back)."""
    fresh = {
        "fingerprint": claim.fingerprint,
        "state": "running",
        "charge_id": None,
        "status_code": None,
        "response_headers": None,
        "response_body": None,
        "body_stored": True,
        "locked_until": claim.locked_until,
        "expires_at": claim.expires_at,
        "created_at": claim.now,
    }
    keys = idempotency_keys.c
    org, key = request.organization_id, claim.key
    stmt = (
        _upsert(dialect)(idempotency_keys)
        .values(organization_id=org, idempotency_key=key, **fresh)
        .on_conflict_do_update(
            index_elements=[keys.organization_id, keys.idempotency_key],
            set_=fresh,
            # A finished key lives until it expires; a running one until its lock runs out
            # (its process died), never merely because its TTL passed mid-request.
            # A running key whose charge still has an open hold is not abandoned, whatever
            # its lock says (its process may only have lost the database for a while).
            where=((keys.state == "done") & (keys.expires_at < claim.now))
            | (
                (keys.state == "running")
                & (keys.locked_until < claim.now)
                & ~exists(select(holds.c.charge_id).where(holds.c.charge_id == keys.charge_id))
            ),
        )
        .returning(keys.organization_id)
    )
    if conn.execute(stmt).first() is None:
        row = conn.execute(
            select(idempotency_keys).where(keys.organization_id == org, keys.idempotency_key == key)
        ).one()
        return ClaimOutcome.for_taken(row._mapping, claim.fingerprint)
    outcome = _charge_in(conn, request)
    if outcome.charge_id is None and request.credits > 0:
        raise _Abandon(outcome.balance)
    finish: dict[str, Any] = {"charge_id": outcome.charge_id}
    if claim.finish_now:
        answer = {
            "charge_id": outcome.charge_id,
            "remaining_credits": outcome.balance,
            "credits_deducted": request.credits,
        }
        finish.update(state="done", status_code=200, response_body=json.dumps(answer).encode())
    conn.execute(
        update(idempotency_keys).where(keys.organization_id == org, keys.idempotency_key == key).values(**finish)
    )
    return ClaimOutcome(ClaimKind.CLAIMED, charge_id=outcome.charge_id, balance=outcome.balance)


def _refund_in(
    conn: Connection,
    charge_id: int,
    reason: str | None,
    *,
    credits: int | None = None,
    expired_before: datetime | None = None,
) -> RefundResult:
    if expired_before is not None:
        closed = conn.scalar(
            delete(holds)
            .where(holds.c.charge_id == charge_id, holds.c.expires_at < expired_before)
            .returning(holds.c.charge_id)
        )
        if closed is None:
            return RefundResult(refunded=False, error="not an expired hold")
    charge = conn.execute(
        select(*_CHARGE_COLUMNS, ledger.c.extra_of).where(ledger.c.id == charge_id, ledger.c.kind == "charge")
    ).first()
    if charge is None:
        return RefundResult(refunded=False, error="charge not found")
    if conn.scalar(select(ledger.c.id).where(ledger.c.refund_of == charge_id)) is not None:
        return RefundResult(refunded=False, error="already refunded")
    charged = -int(charge.amount)
    amount = charged if credits is None else min(credits, charged)
    conn.execute(delete(holds).where(holds.c.charge_id == charge_id))
    if amount <= 0:
        if credits is None:  # a free request failed: its key must not stay locked
            conn.execute(delete(idempotency_keys).where(idempotency_keys.c.charge_id == charge_id))
        return RefundResult(refunded=False, error="nothing to refund")
    now = utcnow()
    balance = conn.execute(
        update(accounts)
        .where(accounts.c.organization_id == charge.organization_id)
        .values(balance=accounts.c.balance + amount, updated_at=now)
        .returning(accounts.c.balance)
    ).scalar_one()
    refund_id = conn.execute(
        insert(ledger)
        .values(
            organization_id=charge.organization_id,
            kind="refund",
            amount=amount,
            balance_after=balance,
            feature_key=charge.feature_key,
            user_id=charge.user_id,
            request_method=charge.request_method,
            request_path=charge.request_path,
            reason=reason[:500] if reason else reason,
            refund_of=charge_id,
            created_at=now,
        )
        .returning(ledger.c.id)
    ).scalar_one()
    if credits is None:
        # A full refund means the request did not happen: its idempotency key is free
        # again, and a surcharge taken for its usage goes back with it.
        conn.execute(delete(idempotency_keys).where(idempotency_keys.c.charge_id == charge_id))
        surcharge = conn.execute(
            select(ledger.c.id).where(ledger.c.extra_of == charge_id, ledger.c.kind == "charge")
        ).scalar_one_or_none()
        if surcharge is not None:
            extra = _refund_in(conn, int(surcharge), reason)
            if extra.refunded:
                amount += extra.credits_refunded
                balance = extra.remaining_credits or balance
    return RefundResult(
        refunded=True,
        credits_refunded=amount,
        remaining_credits=int(balance),
        refund_id=int(refund_id),
        organization_id=charge.organization_id,
        feature_key=charge.feature_key,
    )


def _settle_holds_in(conn: Connection, charge_ids: Sequence[int], completions: Sequence[Completion]) -> set[int]:
    settled: set[int] = set()
    if charge_ids:
        result = conn.execute(delete(holds).where(holds.c.charge_id.in_(list(charge_ids))).returning(holds.c.charge_id))
        settled = {int(row[0]) for row in result}
    if completions:
        # One executemany: asyncpg pipelines it (one round trip for the batch).
        conn.execute(
            update(idempotency_keys)
            .where(
                idempotency_keys.c.organization_id == bindparam("done_org"),
                idempotency_keys.c.idempotency_key == bindparam("done_key"),
                idempotency_keys.c.state == "running",
            )
            .values(
                state="done",
                status_code=bindparam("status_code"),
                response_headers=bindparam("response_headers"),
                response_body=bindparam("response_body"),
                body_stored=bindparam("body_stored"),
                expires_at=bindparam("expires_at"),
            ),
            [
                {
                    "done_org": done.organization_id,
                    "done_key": done.idempotency_key,
                    "status_code": done.status_code,
                    "response_headers": done.response_headers,
                    "response_body": done.response_body,
                    "body_stored": done.body_stored,
                    "expires_at": done.expires_at,
                }
                for done in completions
            ],
        )
    return settled


def _settle_usage_in(conn: Connection, charge_id: int, used: int, max_extra: int, reason: str) -> UsageSettlement:
    closed = conn.scalar(delete(holds).where(holds.c.charge_id == charge_id).returning(holds.c.charge_id))
    charge = conn.execute(select(*_CHARGE_COLUMNS).where(ledger.c.id == charge_id, ledger.c.kind == "charge")).first()
    if closed is None or charge is None:
        return UsageSettlement()
    moved = UsageSettlement(
        organization_id=charge.organization_id, feature_key=charge.feature_key, user_id=charge.user_id
    )
    held = -int(charge.amount)
    if used < held:
        refund = _refund_in(conn, charge_id, reason, credits=held - used)
        return replace(
            moved, refunded=refund.credits_refunded, balance=refund.remaining_credits, refund_id=refund.refund_id
        )
    extra = min(used - held, max_extra)
    if extra <= 0:
        return moved
    # Lock the account row first (an UPDATE that changes nothing but the stamp): the
    # balance it returns cannot move until we commit, and the debit below is still
    # conditional, so even a wrong sum here could never overdraw.
    now = utcnow()
    locked = conn.scalar(
        update(accounts)
        .where(accounts.c.organization_id == charge.organization_id)
        .values(updated_at=now)
        .returning(accounts.c.balance)
    )
    taken = min(extra, int(locked or 0))
    if taken <= 0:
        return moved
    balance = conn.scalar(
        update(accounts)
        .where(accounts.c.organization_id == charge.organization_id, accounts.c.balance >= taken)
        .values(balance=accounts.c.balance - taken)
        .returning(accounts.c.balance)
    )
    assert balance is not None
    conn.execute(
        insert(ledger).values(
            organization_id=charge.organization_id,
            kind="charge",
            amount=-taken,
            balance_after=balance,
            feature_key=charge.feature_key,
            user_id=charge.user_id,
            request_method=charge.request_method,
            request_path=charge.request_path,
            reason=reason[:500] if reason else reason,
            extra_of=charge_id,
            created_at=now,
        )
    )
    return replace(moved, extra=taken, balance=int(balance))


def _extend_holds_in(conn: Connection, charge_ids: Sequence[int], until: datetime) -> set[int]:
    still: set[int] = set()
    ids = list(charge_ids)
    for start in range(0, len(ids), 1000):  # bound the bind parameters per statement
        chunk = ids[start : start + 1000]
        result = conn.execute(
            update(holds).where(holds.c.charge_id.in_(chunk)).values(expires_at=until).returning(holds.c.charge_id)
        )
        still |= {int(row[0]) for row in result}
        conn.execute(
            update(idempotency_keys)
            .where(idempotency_keys.c.charge_id.in_(chunk), idempotency_keys.c.state == "running")
            .values(locked_until=until)
        )
    return still


def _delete_expired_keys_in(conn: Connection, now: datetime) -> int:
    keys = idempotency_keys.c
    # Two statements, not one OR: each can use its own condition's index.
    done = conn.execute(delete(idempotency_keys).where(keys.state == "done", keys.expires_at < now))
    dead = conn.execute(
        delete(idempotency_keys).where(
            keys.state == "running",
            keys.locked_until < now,
            keys.charge_id.is_(None) | ~exists(select(holds.c.charge_id).where(holds.c.charge_id == keys.charge_id)),
        )
    )
    return int(done.rowcount or 0) + int(dead.rowcount or 0)


def _create_schema_in(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_ID)))
    metadata.create_all(conn, checkfirst=True)


def _update_pricing_in(conn: Connection, pricing_id: str, changes: Mapping[str, Any]) -> tuple[FeaturePricing, str]:
    old_key = conn.scalar(select(feature_pricing.c.feature_key).where(feature_pricing.c.id == pricing_id))
    if old_key is None:
        raise PricingNotFound(pricing_id)
    row = conn.execute(
        update(feature_pricing)
        .where(feature_pricing.c.id == pricing_id)
        .values(**changes, updated_at=utcnow())
        .returning(feature_pricing)
    ).one()
    return pricing_from_row(row), old_key


def _import_pricing_in(
    conn: Connection, rows: Sequence[Mapping[str, Any]], update_existing: bool
) -> tuple[list[FeaturePricing], list[FeaturePricing]]:
    now = utcnow()
    created: list[FeaturePricing] = []
    updated: list[FeaturePricing] = []
    keys = [str(row["feature_key"]) for row in rows]
    existing: dict[str, str] = {
        key: pricing_id
        for key, pricing_id in conn.execute(
            select(feature_pricing.c.feature_key, feature_pricing.c.id).where(feature_pricing.c.feature_key.in_(keys))
        )
    }
    for fields in rows:
        pricing_id = existing.get(str(fields["feature_key"]))
        if pricing_id is not None and not update_existing:
            raise DuplicateFeature(str(fields["feature_key"]))
        if pricing_id is not None:
            stmt = (
                update(feature_pricing)
                .where(feature_pricing.c.id == pricing_id)
                .values(**fields, updated_at=now)
                .returning(feature_pricing)
            )
            updated.append(pricing_from_row(conn.execute(stmt).one()))
        else:
            values = _new_pricing_row(fields, now)
            created.append(
                pricing_from_row(
                    conn.execute(insert(feature_pricing).values(**values).returning(feature_pricing)).one()
                )
            )
    return created, updated


class SqlStore:
    """Every read and write of credit_guard's tables through one SQLAlchemy async engine."""

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = True) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.owns_engine = owns_engine
        # The loop the engine's pooled connections belong to (see ``_follow_loop``).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _follow_loop(self) -> None:
        """Pooled connections belong to the loop that opened them. On a new loop (a guard
        used again after its first loop ended without ``close()``) the pool of an engine
        this store owns is replaced; an app's own engine is the app's to manage."""
        loop = asyncio.get_running_loop()
        old, self._loop = self._loop, loop
        if old is not None and self.owns_engine:
            # SQLite's connections are threads and can be closed from here; asyncpg's died with their loop.
            await self.engine.dispose(close=self.dialect == "sqlite")

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on the async engine whose connectivity failures surface as
        StorageUnavailable. IntegrityError passes through untouched: callers turn it into
        a business answer (duplicate key, already refunded). Everything else the driver
        raises means the store cannot be trusted right now: the web layer fails closed."""
        if self._loop is not asyncio.get_running_loop():
            await self._follow_loop()
        try:
            async with self.engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise unavailable(exc) from exc

    async def _write(self, work: Work[T]) -> T:
        """Run one write body in its own transaction (SQLite overrides this: one writer
        thread per process commits many of them together)."""
        async with self._tx() as conn:
            return await conn.run_sync(work)

    async def _read(self, work: Work[T]) -> T:
        """Run a read body; it needs no write lock, so it never waits for writers."""
        async with self._tx() as conn:
            return await conn.run_sync(work)

    async def close(self) -> None:
        """Close the pooled connections of an engine this store owns; the engine stays
        usable (a restart reopens them). An engine the app handed in is left as it is."""
        if not self.owns_engine:
            return
        if self._loop is None or self._loop is asyncio.get_running_loop():
            await self.engine.dispose()
        else:
            await self.engine.dispose(close=self.dialect == "sqlite")
        self._loop = None

    # -- schema ---------------------------------------------------------------------------

    async def create_schema(self) -> None:
        """Create the missing tables; safe from any number of processes at once.

        ``CREATE TABLE IF NOT EXISTS`` alone is not: two PostgreSQL sessions creating one
        table can both pass the check and collide in the catalog (``duplicate key ...
        pg_type_typname_nsp_index``: 4 workers starting on a fresh database crashed). So
        the creation holds a transaction-scoped advisory lock; the others wait, then find
        the tables there. On SQLite the write transaction (``BEGIN IMMEDIATE``) is that lock.
        """
        await self._write(_create_schema_in)

    # -- pricing --------------------------------------------------------------------------

    async def pricing_by_key(self, feature_key: str) -> FeaturePricing | None:
        """The row for a key, active or not: the caller decides what inactive means."""
        async with self._tx() as conn:
            row = (
                await conn.execute(select(feature_pricing).where(feature_pricing.c.feature_key == feature_key))
            ).first()
        return pricing_from_row(row) if row is not None else None

    async def pricing_by_id(self, pricing_id: str) -> FeaturePricing | None:
        async with self._tx() as conn:
            row = (await conn.execute(select(feature_pricing).where(feature_pricing.c.id == pricing_id))).first()
        return pricing_from_row(row) if row is not None else None

    async def list_pricing(self, *, category: str | None = None, is_active: bool | None = None) -> list[FeaturePricing]:
        query = select(feature_pricing).order_by(feature_pricing.c.category, feature_pricing.c.feature_name)
        if category is not None:
            query = query.where(feature_pricing.c.category == category)
        if is_active is not None:
            query = query.where(feature_pricing.c.is_active == is_active)
        async with self._tx() as conn:
            rows = (await conn.execute(query)).all()
        return [pricing_from_row(row) for row in rows]

    async def create_pricing(self, fields: Mapping[str, Any]) -> FeaturePricing:
        values = _new_pricing_row(fields, utcnow())

        def work(conn: Connection) -> FeaturePricing:
            return pricing_from_row(
                conn.execute(insert(feature_pricing).values(**values).returning(feature_pricing)).one()
            )

        try:
            return await self._write(work)
        except IntegrityError as exc:
            raise DuplicateFeature(str(fields["feature_key"])) from exc

    async def update_pricing(self, pricing_id: str, changes: Mapping[str, Any]) -> tuple[FeaturePricing, str]:
        """Apply changes; returns the new row and the key it had before (for cache invalidation)."""
        try:
            return await self._write(partial(_update_pricing_in, pricing_id=pricing_id, changes=changes))
        except IntegrityError as exc:
            raise DuplicateFeature(str(changes.get("feature_key"))) from exc

    async def delete_pricing(self, pricing_id: str) -> FeaturePricing | None:
        def work(conn: Connection) -> FeaturePricing | None:
            stmt = delete(feature_pricing).where(feature_pricing.c.id == pricing_id).returning(feature_pricing)
            row = conn.execute(stmt).first()
            return pricing_from_row(row) if row is not None else None

        return await self._write(work)

    async def import_pricing(
        self, rows: Sequence[Mapping[str, Any]], *, update_existing: bool = False
    ) -> tuple[list[FeaturePricing], list[FeaturePricing]]:
        """Create many validated pricing rows in ONE transaction; returns (created, updated).

        Seeding an environment must land whole or not at all: an existing key (unless
        ``update_existing``, which overwrites the fields each row gives), a twin inserted
        concurrently, or a connection lost halfway rolls back every row.
        """
        try:
            return await self._write(partial(_import_pricing_in, rows=rows, update_existing=update_existing))
        except IntegrityError as exc:
            raise DuplicateFeature(", ".join(str(row["feature_key"]) for row in rows)) from exc

    # -- money ----------------------------------------------------------------------------

    async def grant(
        self, organization_id: str, amount: int, reason: str | None, idempotency_key: str | None = None
    ) -> GrantOutcome:
        """Top up (creating the account on first use), never past ``MAX_BALANCE``.

        With ``idempotency_key`` the grant happens once per organization and key: the
        ledger's UNIQUE (organization, key) decides, so racing calls in any number of
        processes grant once, and every other call reads the balance instead. The limit
        is part of the upsert's condition, so nothing is written when it would be passed.
        """
        work = partial(
            _grant_in,
            dialect=self.dialect,
            organization_id=organization_id,
            amount=amount,
            reason=reason,
            idempotency_key=idempotency_key,
        )
        try:
            return await self._write(work)
        except IntegrityError:
            # A twin with the same key committed first; this transaction rolled back whole.
            if idempotency_key is None:
                raise
            done = await self._read(
                partial(_granted_in, organization_id=organization_id, idempotency_key=idempotency_key)
            )
            if done is None:
                raise
            return done

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        """Take ``request.credits`` if the balance covers them; a hold when ``hold_until`` is set."""
        return await self._write(partial(_charge_in, request=request))

    async def claim_and_charge(self, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
        """Claim an idempotency key and charge for it in ONE transaction.

        Either both happen or neither: a short balance rolls the claim back, so the key
        stays free for the retry after a top-up. A key that is already taken is answered
        from its row (replay, still running, or reused for another request) and charges
        nothing. An expired key, or a running one whose lock ran out (its process died),
        is taken over by the same upsert.
        """
        try:
            return await self._write(partial(_claim_and_charge_in, dialect=self.dialect, request=request, claim=claim))
        except _Abandon as short:
            return ClaimOutcome(ClaimKind.INSUFFICIENT, balance=short.balance)

    async def refund(
        self,
        charge_id: int,
        reason: str | None = None,
        *,
        credits: int | None = None,
        expired_before: datetime | None = None,
    ) -> RefundResult:
        """Give a charge's credits back (all, or ``credits`` of them), at most once per charge, ever.

        The read of the charge only decides *how much*; *whether* is decided by the
        UNIQUE ``refund_of`` constraint, so two racing refunds cannot both commit. The
        refund also closes the charge's hold and deletes the idempotency key it paid for,
        in the same transaction, so the client may retry. ``expired_before`` is the
        sweeper's condition: refund only a hold still open and expired at that moment,
        decided by one conditional DELETE that a racing settle cannot slip past.
        """
        work = partial(_refund_in, charge_id=charge_id, reason=reason, credits=credits, expired_before=expired_before)
        try:
            return await self._write(work)
        except IntegrityError:
            # A twin refund committed between our check and our insert; ours rolled back whole.
            return RefundResult(refunded=False, error="already refunded")

    async def settle_holds(self, charge_ids: Sequence[int], completions: Sequence[Completion] = ()) -> set[int]:
        """Close many holds as kept, and record finished idempotent responses, in ONE transaction.

        Returns the ids that were still held: a missing one was refunded meanwhile (by a
        failure or by the sweeper, if its request outlived its hold).
        """
        return await self._write(partial(_settle_holds_in, charge_ids=charge_ids, completions=completions))

    async def settle_usage(self, charge_id: int, used: int, max_extra: int, reason: str) -> UsageSettlement:
        """Close a hold at what the request really used: refund the unused part, or take up
        to ``max_extra`` more (never more than the balance holds). Exactly once: the hold
        is closed by a conditional DELETE in the same transaction. Returns what moved
        (nothing when the hold was already closed)."""
        work = partial(_settle_usage_in, charge_id=charge_id, used=used, max_extra=max_extra, reason=reason)
        try:
            return await self._write(work)
        except IntegrityError:
            return UsageSettlement()

    async def extend_holds(self, charge_ids: Sequence[int], until: datetime) -> set[int]:
        """Push the expiry of live requests' holds (and their idempotency locks) forward;
        returns the ids still held (the others were settled or refunded, maybe elsewhere)."""
        if not charge_ids:
            return set()
        return await self._write(partial(_extend_holds_in, charge_ids=charge_ids, until=until))

    async def expired_holds(self, now: datetime, limit: int) -> list[int]:
        async with self._tx() as conn:
            rows = await conn.execute(
                select(holds.c.charge_id).where(holds.c.expires_at < now).order_by(holds.c.expires_at).limit(limit)
            )
            return [int(row[0]) for row in rows]

    async def open_holds(self, organization_id: str | None = None) -> list[int]:
        query = select(holds.c.charge_id).order_by(holds.c.charge_id)
        if organization_id is not None:
            query = query.join(ledger, ledger.c.id == holds.c.charge_id).where(
                ledger.c.organization_id == organization_id
            )
        async with self._tx() as conn:
            return [int(row[0]) for row in await conn.execute(query)]

    async def release_key(self, organization_id: str, idempotency_key: str) -> None:
        """Forget a key whose request failed without a charge to refund (a free feature)."""

        def work(conn: Connection) -> None:
            conn.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.organization_id == organization_id,
                    idempotency_keys.c.idempotency_key == idempotency_key,
                )
            )

        await self._write(work)

    async def delete_expired_keys(self, now: datetime) -> int:
        return await self._write(partial(_delete_expired_keys_in, now=now))

    # -- reads ----------------------------------------------------------------------------

    async def balance(self, organization_id: str) -> int:
        return await self._read(partial(_balance_in, organization_id=organization_id))

    async def audit(self) -> list[AuditIssue]:
        """Every account whose balance is not the sum of its ledger, and every malformed refund."""
        sums = (
            select(ledger.c.organization_id, func.sum(ledger.c.amount).label("total"))
            .group_by(ledger.c.organization_id)
            .subquery()
        )
        total = func.coalesce(sums.c.total, 0)
        mismatched = (
            select(accounts.c.organization_id, accounts.c.balance, total.label("total"))
            .select_from(accounts.outerjoin(sums, sums.c.organization_id == accounts.c.organization_id))
            .where(accounts.c.balance != total)
        )
        orphans = (
            select(sums.c.organization_id, sums.c.total)
            .select_from(sums.outerjoin(accounts, sums.c.organization_id == accounts.c.organization_id))
            .where(accounts.c.organization_id.is_(None))
        )
        charge = ledger.alias("charge")
        bad_refunds = (
            select(ledger.c.organization_id, ledger.c.id)
            .select_from(ledger.outerjoin(charge, charge.c.id == ledger.c.refund_of))
            .where(
                ledger.c.kind == "refund",
                (charge.c.id.is_(None))
                | (charge.c.kind != "charge")
                | (charge.c.organization_id != ledger.c.organization_id)
                # A partial refund (unused reserve) may be smaller than its charge, never larger.
                | (literal(0) - charge.c.amount < ledger.c.amount),
            )
        )
        bad_extras = (
            select(ledger.c.organization_id, ledger.c.id)
            .select_from(ledger.outerjoin(charge, charge.c.id == ledger.c.extra_of))
            .where(
                ledger.c.extra_of.isnot(None),
                (charge.c.id.is_(None))
                | (charge.c.kind != "charge")
                | (charge.c.extra_of.isnot(None))
                | (charge.c.organization_id != ledger.c.organization_id),
            )
        )
        refund = ledger.alias("refund")
        bad_holds = (
            select(holds.c.charge_id, charge.c.organization_id)
            .select_from(
                holds.outerjoin(charge, charge.c.id == holds.c.charge_id).outerjoin(
                    refund, refund.c.refund_of == holds.c.charge_id
                )
            )
            .where((charge.c.id.is_(None)) | (charge.c.kind != "charge") | (refund.c.id.isnot(None)))
        )
        async with self._tx() as conn:
            issues = [
                AuditIssue(row.organization_id, "balance differs from ledger", int(row.balance), int(row.total))
                for row in await conn.execute(mismatched)
            ]
            issues += [
                AuditIssue(row.organization_id, "ledger rows without an account", None, int(row.total))
                for row in await conn.execute(orphans)
            ]
            issues += [
                AuditIssue(row.organization_id, f"refund {row.id} does not mirror its charge")
                for row in await conn.execute(bad_refunds)
            ]
            issues += [
                AuditIssue(row.organization_id, f"surcharge {row.id} does not point at a charge")
                for row in await conn.execute(bad_extras)
            ]
            issues += [
                AuditIssue(row.organization_id or "?", f"hold {row.charge_id} is not an open charge")
                for row in await conn.execute(bad_holds)
            ]
        return issues

    async def usage(
        self,
        *,
        group_by: UsageGroup = "day",
        organization_id: str | None = None,
        feature_key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        """Charges and refunds per day, feature or organization, newest day / biggest first."""
        key: ColumnElement[Any]
        if group_by == "day":
            key = cast(ledger.c.created_at, SqlDate) if self.dialect == "postgresql" else func.date(ledger.c.created_at)
        elif group_by == "feature":
            key = ledger.c.feature_key
        elif group_by == "org":
            key = ledger.c.organization_id
        else:
            raise ValueError(f"group_by must be day, feature or org, not {group_by!r}")
        is_charge = ledger.c.kind == "charge"
        # A surcharge (usage beyond the reserve) adds credits to its charge, not a charge.
        is_first_charge = and_(is_charge, ledger.c.extra_of.is_(None))
        is_refund = ledger.c.kind == "refund"
        query = (
            select(
                key.label("key"),
                func.sum(case((is_first_charge, 1), else_=0)).label("charges"),
                func.sum(case((is_charge, -ledger.c.amount), else_=0)).label("credits_charged"),
                func.sum(case((is_refund, 1), else_=0)).label("refunds"),
                func.sum(case((is_refund, ledger.c.amount), else_=0)).label("credits_refunded"),
            )
            .where(ledger.c.kind.in_(("charge", "refund")))
            .group_by(key)
        )
        if organization_id is not None:
            query = query.where(ledger.c.organization_id == organization_id)
        if feature_key is not None:
            query = query.where(ledger.c.feature_key == feature_key)
        if since is not None:
            query = query.where(ledger.c.created_at >= since)
        if until is not None:
            query = query.where(ledger.c.created_at < until)
        query = (
            query.order_by(key.desc())
            if group_by == "day"
            else query.order_by(func.sum(case((is_charge, -ledger.c.amount), else_=0)).desc(), key)
        )
        async with self._tx() as conn:
            rows = (await conn.execute(query)).all()
        return [
            UsageRow(
                key=str(row.key),
                charges=int(row.charges or 0),
                credits_charged=int(row.credits_charged or 0),
                refunds=int(row.refunds or 0),
                credits_refunded=int(row.credits_refunded or 0),
            )
            for row in rows
        ]
