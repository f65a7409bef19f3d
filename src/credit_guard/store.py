"""The money statements, written once in SQLAlchemy Core for every dialect.

Every write is a single short transaction whose correctness rests on the database,
never on a value read into Python first:

* deduct: ``UPDATE accounts SET balance = balance - :cost WHERE balance >= :cost RETURNING``;
  no row back means not enough credits, so two racing requests can never both pass.
* refund: the ledger's UNIQUE ``refund_of`` makes a second refund of one charge fail
  inside the database, rolling back its balance change with it.
* grant: an upsert, so the first top-up creates the account.

On SQLite every transaction starts with ``BEGIN IMMEDIATE`` (see ``engine.py``), so
writers queue on the busy timeout instead of failing with "database is locked".
PostgreSQL's hot path (deduction) has a one-round-trip twin in ``pgcharge.py``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Date as SqlDate
from sqlalchemy import Row, and_, case, cast, delete, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from .errors import DuplicateFeature, PricingNotFound, StorageUnavailable
from .models import AuditIssue, FeaturePricing, RefundResult, UsageGroup, UsageRow
from .schema import accounts, feature_pricing, ledger, metadata

log = logging.getLogger("credit_guard")


def utcnow() -> datetime:
    return datetime.now(UTC)


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


class SqlStore:
    """All reads and writes of credit_guard's tables through one SQLAlchemy async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        """A transaction whose connectivity failures surface as StorageUnavailable.

        IntegrityError passes through untouched: callers turn it into a business answer
        (duplicate key, already refunded). Everything else the driver raises means the
        store cannot be trusted right now, and the web layer must fail closed.
        """
        try:
            async with self.engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.error("credit_guard storage error: %s", exc, exc_info=exc)
            raise StorageUnavailable(str(exc)) from exc

    # -- schema -------------------------------------------------------------------------

    async def create_schema(self) -> None:
        async with self._tx() as conn:
            await conn.run_sync(metadata.create_all, checkfirst=True)

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
        try:
            async with self._tx() as conn:
                row = (await conn.execute(insert(feature_pricing).values(**values).returning(feature_pricing))).one()
        except IntegrityError as exc:
            raise DuplicateFeature(str(fields["feature_key"])) from exc
        return pricing_from_row(row)

    async def update_pricing(self, pricing_id: str, changes: Mapping[str, Any]) -> tuple[FeaturePricing, str]:
        """Apply changes; returns the new row and the key it had before (for cache invalidation)."""
        try:
            async with self._tx() as conn:
                old_key = await conn.scalar(
                    select(feature_pricing.c.feature_key).where(feature_pricing.c.id == pricing_id)
                )
                if old_key is None:
                    raise PricingNotFound(pricing_id)
                row = (
                    await conn.execute(
                        update(feature_pricing)
                        .where(feature_pricing.c.id == pricing_id)
                        .values(**changes, updated_at=utcnow())
                        .returning(feature_pricing)
                    )
                ).one()
        except IntegrityError as exc:
            raise DuplicateFeature(str(changes.get("feature_key"))) from exc
        return pricing_from_row(row), old_key

    async def delete_pricing(self, pricing_id: str) -> FeaturePricing | None:
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    delete(feature_pricing).where(feature_pricing.c.id == pricing_id).returning(feature_pricing)
                )
            ).first()
        return pricing_from_row(row) if row is not None else None

    async def import_pricing(
        self, rows: Sequence[Mapping[str, Any]], *, update_existing: bool = False
    ) -> tuple[list[FeaturePricing], list[FeaturePricing]]:
        """Create many validated pricing rows in ONE transaction; returns (created, updated).

        Seeding an environment must land whole or not at all: an existing key (unless
        ``update_existing``, which overwrites the fields each row gives), a twin inserted
        concurrently, or a connection lost halfway rolls back every row.
        """
        now = utcnow()
        created: list[FeaturePricing] = []
        updated: list[FeaturePricing] = []
        keys = [str(row["feature_key"]) for row in rows]
        try:
            async with self._tx() as conn:
                existing: dict[str, str] = {
                    key: pricing_id
                    for key, pricing_id in await conn.execute(
                        select(feature_pricing.c.feature_key, feature_pricing.c.id).where(
                            feature_pricing.c.feature_key.in_(keys)
                        )
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
                        updated.append(pricing_from_row((await conn.execute(stmt)).one()))
                    else:
                        values = _new_pricing_row(fields, now)
                        stmt_insert = insert(feature_pricing).values(**values).returning(feature_pricing)
                        created.append(pricing_from_row((await conn.execute(stmt_insert)).one()))
        except IntegrityError as exc:
            raise DuplicateFeature(", ".join(keys)) from exc
        return created, updated

    # -- money ----------------------------------------------------------------------------

    async def grant(self, organization_id: str, amount: int, reason: str | None) -> tuple[int, int]:
        """Top up (creating the account on first use); returns (balance, ledger id)."""
        now = utcnow()
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
        values = upsert(accounts).values(
            organization_id=organization_id, balance=amount, created_at=now, updated_at=now
        )
        stmt = values.on_conflict_do_update(
            index_elements=[accounts.c.organization_id],
            set_={"balance": accounts.c.balance + values.excluded.balance, "updated_at": now},
        ).returning(accounts.c.balance)
        async with self._tx() as conn:
            balance = int((await conn.execute(stmt)).scalar_one())
            entry_id = (
                await conn.execute(
                    insert(ledger)
                    .values(
                        organization_id=organization_id,
                        kind="grant",
                        amount=amount,
                        balance_after=balance,
                        reason=reason,
                        created_at=now,
                    )
                    .returning(ledger.c.id)
                )
            ).scalar_one()
        return balance, int(entry_id)

    async def deduct(
        self,
        organization_id: str,
        credits: int,
        *,
        feature_key: str,
        user_id: str | None,
        request_method: str | None,
        request_path: str | None,
    ) -> tuple[int | None, int]:
        """Charge ``credits`` if the balance covers them.

        Returns ``(charge_id, balance_after)`` on success and ``(None, available)`` when
        the balance is short (0 for an organization that has no account yet).
        """
        now = utcnow()
        async with self._tx() as conn:
            balance = (
                await conn.execute(
                    update(accounts)
                    .where(and_(accounts.c.organization_id == organization_id, accounts.c.balance >= credits))
                    .values(balance=accounts.c.balance - credits, updated_at=now)
                    .returning(accounts.c.balance)
                )
            ).scalar_one_or_none()
            if balance is None:
                available = await conn.scalar(
                    select(accounts.c.balance).where(accounts.c.organization_id == organization_id)
                )
                return None, int(available or 0)
            charge_id = (
                await conn.execute(
                    insert(ledger)
                    .values(
                        organization_id=organization_id,
                        kind="charge",
                        amount=-credits,
                        balance_after=balance,
                        feature_key=feature_key,
                        user_id=user_id,
                        request_method=request_method,
                        request_path=request_path,
                        created_at=now,
                    )
                    .returning(ledger.c.id)
                )
            ).scalar_one()
        return int(charge_id), int(balance)

    async def refund(self, charge_id: int, reason: str | None = None) -> RefundResult:
        """Give a charge's credits back, at most once per charge, ever.

        The read of the charge only decides *how much*; *whether* is decided by the
        UNIQUE ``refund_of`` constraint, so two racing refunds cannot both commit.
        """
        try:
            async with self._tx() as conn:
                charge = (
                    await conn.execute(
                        select(
                            ledger.c.organization_id,
                            ledger.c.amount,
                            ledger.c.feature_key,
                            ledger.c.user_id,
                            ledger.c.request_method,
                            ledger.c.request_path,
                        ).where(ledger.c.id == charge_id, ledger.c.kind == "charge")
                    )
                ).first()
                if charge is None:
                    return RefundResult(refunded=False, error="charge not found")
                if await conn.scalar(select(ledger.c.id).where(ledger.c.refund_of == charge_id)) is not None:
                    return RefundResult(refunded=False, error="already refunded")
                credits = -int(charge.amount)
                if credits == 0:
                    return RefundResult(refunded=False, error="nothing to refund")
                now = utcnow()
                balance = (
                    await conn.execute(
                        update(accounts)
                        .where(accounts.c.organization_id == charge.organization_id)
                        .values(balance=accounts.c.balance + credits, updated_at=now)
                        .returning(accounts.c.balance)
                    )
                ).scalar_one()
                refund_id = (
                    await conn.execute(
                        insert(ledger)
                        .values(
                            organization_id=charge.organization_id,
                            kind="refund",
                            amount=credits,
                            balance_after=balance,
                            feature_key=charge.feature_key,
                            user_id=charge.user_id,
                            request_method=charge.request_method,
                            request_path=charge.request_path,
                            reason=reason,
                            refund_of=charge_id,
                            created_at=now,
                        )
                        .returning(ledger.c.id)
                    )
                ).scalar_one()
        except IntegrityError:
            # A twin refund committed between our check and our insert; ours rolled back whole.
            return RefundResult(refunded=False, error="already refunded")
        return RefundResult(
            refunded=True, credits_refunded=credits, remaining_credits=int(balance), refund_id=int(refund_id)
        )

    async def balance(self, organization_id: str) -> int:
        async with self._tx() as conn:
            value = await conn.scalar(select(accounts.c.balance).where(accounts.c.organization_id == organization_id))
        return int(value or 0)

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
                | (charge.c.amount != literal(0) - ledger.c.amount),
            )
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
        is_refund = ledger.c.kind == "refund"
        query = (
            select(
                key.label("key"),
                func.sum(case((is_charge, 1), else_=0)).label("charges"),
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

    async def close(self) -> None:
        await self.engine.dispose()
