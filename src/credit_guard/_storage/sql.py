"""The store over SQLAlchemy: every read and write of credit_guard's tables, every dialect.

Every write is one short transaction whose correctness rests on the database, never on
a value read into Python first:

* charge: the database's one charge (``charge.py``: SQLite's statements in the writer's
  locked transaction, PostgreSQL's one statement), taken only if the live grants' room
  covers it, so two racing requests can never both pass;
* refund: the ledger's UNIQUE ``refund_of`` makes a second refund of one charge fail
  inside the database, rolling back its balance change with it;
* grant: an upsert (the first top-up creates the account), conditional on the maximum
  balance, and unique per (organization, idempotency key).

Each write body is a plain function of a *sync* SQLAlchemy ``Connection``
(``writes.py``, ``grants.py``, ``reservations.py``), so one body serves both ways of
running it: ``SqlStore._write`` runs it through the async engine (``run_sync``), and on
SQLite ``SqliteStore`` hands it to the process's one writer thread, which commits many of
them in one transaction. PostgreSQL's hot statements are ``postgres.py``'s, on asyncpg.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    delete,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._clock import utcnow
from ..errors import DuplicateFeature, SchemaMissing, StorageUnavailable
from ..models import FeaturePricing, Grant, RefundResult, Reservation
from ..schema import feature_pricing, holds, idempotency_keys, ledger
from .base import (
    ChargeOutcome,
    ChargeRequest,
    ClaimOutcome,
    Completion,
    ExpiredGrant,
    GrantOutcome,
    KeyClaim,
    Lane,
    UsageSettlement,
)
from .charge import charge_in
from .grants import expire_in, expiring_in, list_grants_in, overdraft_in, pool_balances_in, set_overdraft_in
from .member_store import MemberStore
from .outbox_store import OutboxStore
from .plan_store import PlanStore
from .report_store import ReportStore
from .reservations import adopt_in, close_in, reservation_in, reserve_in
from .topup_store import TopupStore
from .writes import (
    Abandon,
    create_schema_in,
    delete_expired_keys_in,
    extend_holds_in,
    grant_in,
    granted_in,
    import_pricing_in,
    keyed_charge_in,
    new_pricing_row,
    pricing_from_row,
    refund_in,
    settle_holds_in,
    settle_usage_in,
    spendable_now_in,
    update_pricing_in,
)

log = logging.getLogger("credit_guard")
T = TypeVar("T")
#: A write: a function of a sync connection inside the transaction that runs it.
Work = Callable[[Connection], T]


def unavailable(exc: BaseException) -> StorageUnavailable:
    """A driver's failure as the one exception the web layer turns into a 503; missing
    tables as ``SchemaMissing``, which says how to create them."""
    if missing_tables(exc):
        log.error("credit_guard: its tables are missing (run create_schema() or `credit-guard init`): %s", exc)
        return SchemaMissing(str(exc).splitlines()[0])
    log.error("credit_guard storage error: %s", exc, exc_info=exc)
    return StorageUnavailable(str(exc))


def missing_tables(exc: BaseException) -> bool:
    """Whether a driver's error says a table does not exist: SQLite's "no such table",
    PostgreSQL's undefined_table (SQLSTATE 42P01), raw or wrapped by SQLAlchemy."""
    seen: BaseException | None = exc
    for _ in range(4):  # the error, SQLAlchemy's ``orig``, the adapter's cause
        if seen is None:
            return False
        if getattr(seen, "sqlstate", None) == "42P01" or "no such table" in str(seen):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


class SqlStore(PlanStore, OutboxStore, ReportStore, TopupStore, MemberStore):
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
        await self._write(create_schema_in)

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
        values = new_pricing_row(fields, utcnow())

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
            return await self._write(partial(update_pricing_in, pricing_id=pricing_id, changes=changes))
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
            return await self._write(partial(import_pricing_in, rows=rows, update_existing=update_existing))
        except IntegrityError as exc:
            raise DuplicateFeature(", ".join(str(row["feature_key"]) for row in rows)) from exc

    # -- money ----------------------------------------------------------------------------

    async def grant(
        self,
        organization_id: str,
        amount: int,
        reason: str | None,
        idempotency_key: str | None = None,
        *,
        expires_at: datetime | None = None,
        priority: int = 0,
        pool: str | None = None,
    ) -> GrantOutcome:
        """Top up (creating the account on first use) with a new grant, never past ``MAX_BALANCE``.

        With ``idempotency_key`` the grant happens once per organization and key: the
        ledger's UNIQUE (organization, key) decides, so racing calls in any number of
        processes grant once, and every other call reads the balance instead. The limit
        is part of the upsert's condition, so nothing is written when it would be passed.
        """
        work = partial(
            grant_in,
            dialect=self.dialect,
            organization_id=organization_id,
            amount=amount,
            reason=reason,
            idempotency_key=idempotency_key,
            expires_at=expires_at,
            priority=priority,
            pool=pool,
        )
        try:
            return await self._write(work)
        except IntegrityError:
            # A twin with the same key committed first; this transaction rolled back whole.
            if idempotency_key is None:
                raise
            done = await self._read(
                partial(granted_in, organization_id=organization_id, idempotency_key=idempotency_key)
            )
            if done is None:
                raise
            return done

    async def expire_grants(self, now: datetime) -> list[ExpiredGrant]:
        """Write off what expired grants still hold (an 'expiry' ledger row each), one
        organization per transaction."""
        closed: list[ExpiredGrant] = []
        for _ in range(1000):  # each round clears every organization it found; bounded all the same
            orgs = await self._read(partial(expiring_in, now=now))
            if not orgs:
                break
            for org in orgs:
                closed += [
                    ExpiredGrant(*row)
                    for row in await self._write(partial(expire_in, org=org, now=now, notify=self.notify))
                ]
        return closed

    async def list_grants(self, organization_id: str, now: datetime) -> list[Grant]:
        return await self._read(partial(list_grants_in, org=organization_id, now=now))

    async def set_overdraft(self, organization_id: str, limit: int) -> None:
        try:
            await self._write(partial(set_overdraft_in, org=organization_id, limit=limit, now=utcnow()))
        except IntegrityError as exc:  # the floor CHECK: it owes more than the new limit
            raise ValueError(f"{organization_id!r:.80} owes more than {limit} credits: pay it off first") from exc

    async def overdraft(self, organization_id: str) -> tuple[int, int]:
        return await self._read(partial(overdraft_in, org=organization_id))

    async def reserve(
        self, request: ChargeRequest, job_id: str, *, unit_price: int, max_overage_credits: int
    ) -> tuple[Reservation | None, int, bool]:
        """Claim ``job_id`` and charge, in one transaction: ``(reservation, balance, new)``;
        ``(None, available, False)`` when short; an existing one charges nothing."""
        work = partial(
            reserve_in,
            dialect=self.dialect,
            request=request,
            job_id=job_id,
            unit_price=unit_price,
            max_overage_credits=max_overage_credits,
        )
        try:
            return await self._write(work)
        except Abandon as short:
            return None, short.spendable, False
        except IntegrityError:
            return await self._write(work)  # a twin of the same job committed first: answer with it

    async def adopt_reservation(
        self, job_id: str, charge_id: int, request: ChargeRequest, *, unit_price: int, max_overage_credits: int
    ) -> Reservation:
        work = partial(
            adopt_in,
            job_id=job_id,
            charge_id=charge_id,
            request=request,
            unit_price=unit_price,
            max_overage_credits=max_overage_credits,
        )
        return await self._write(work)

    async def reservation(self, job_id: str) -> Reservation | None:
        return await self._read(partial(reservation_in, job_id=job_id))

    async def close_reservation(
        self, job_id: str, *, used: int | None, reason: str, capture: bool = True
    ) -> tuple[Reservation, UsageSettlement | RefundResult | None]:
        """Capture or release, once: the first close wins, a later one moves nothing."""
        try:
            return await self._write(partial(close_in, job_id=job_id, capture=capture, used=used, reason=reason))
        except IntegrityError:
            # A racing refund of the same charge committed first (the UNIQUE refund_of).
            found = await self.reservation(job_id)
            assert found is not None
            return found, None

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        """Take ``request.credits`` if the balance covers them; a hold when ``hold_until`` is set."""
        return await self._write(partial(charge_in, request=request))

    async def claim_and_charge(self, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
        """Claim an idempotency key and charge for it in ONE transaction.

        The key is claimed only if the charge is taken: a refusal leaves it free for the
        retry after a top-up. A key that is already taken is answered from its row
        (replay, still running, or reused for another request) and charges nothing. An
        expired key, or a running one whose lock ran out (its process died), is taken over
        (``keys.py`` says when).
        """
        return await self._write(partial(keyed_charge_in, request=request, claim=claim))

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
        work = partial(refund_in, charge_id=charge_id, reason=reason, credits=credits, expired_before=expired_before)
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
        return await self._write(partial(settle_holds_in, charge_ids=charge_ids, completions=completions))

    async def settle_usage(self, charge_id: int, used: int, max_overage_credits: int, reason: str) -> UsageSettlement:
        """Close a hold at what the request really used: refund the unused part, or take up
        to ``max_overage_credits`` more (never more than the balance holds). Exactly once: the hold
        is closed by a conditional DELETE in the same transaction. Returns what moved
        (nothing when the hold was already closed)."""
        work = partial(
            settle_usage_in, charge_id=charge_id, used=used, max_overage_credits=max_overage_credits, reason=reason
        )
        try:
            return await self._write(work)
        except IntegrityError:
            return UsageSettlement()

    async def extend_holds(self, charge_ids: Sequence[int], until: datetime) -> set[int]:
        """Push the expiry of live requests' holds (and their idempotency locks) forward;
        returns the ids still held (the others were settled or refunded, maybe elsewhere)."""
        if not charge_ids:
            return set()
        return await self._write(partial(extend_holds_in, charge_ids=charge_ids, until=until))

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
        return await self._write(partial(delete_expired_keys_in, now=now))

    # -- reads ----------------------------------------------------------------------------

    async def spendable(self, organization_id: str, lane: Lane | None = None) -> int:
        """What the organization can spend now: its live grants (expired credits left out),
        every pool's, or those a charge of ``lane`` may draw from."""
        return await self._read(partial(spendable_now_in, organization_id=organization_id, lane=lane))

    async def pool_balances(self, organization_id: str) -> dict[str | None, int]:
        return await self._read(partial(pool_balances_in, org=organization_id, now=utcnow()))
