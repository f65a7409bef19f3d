"""The write bodies: each one transaction's work, a function of a sync SQLAlchemy Connection.

One body serves both ways of running it: ``SqlStore._write`` runs it through the async
engine (``run_sync``), and on SQLite the process's one writer thread runs many of them in
one transaction (``sqlite.py``). Each money decision is a conditional statement here,
never a value read into Python first.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Row,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    select,
    text,
    update,
)

from .._clock import utcnow
from ..errors import DuplicateFeature, PricingNotFound
from ..models import FeaturePricing, RefundResult
from ..schema import (
    MAX_BALANCE,
    accounts,
    feature_pricing,
    grants,
    holds,
    idempotency_keys,
    ledger,
    metadata,
    reservations,
)
from . import charge, members
from .base import (
    ChargeRequest,
    ClaimKind,
    ClaimOutcome,
    Completion,
    GrantOutcome,
    GrantStatus,
    KeyClaim,
    Lane,
    UsageSettlement,
    lane_for,
)
from .charge import charge_in, complete_keys_sqlite
from .grants import add_grant_in, give_back_in, lock_account, room_in, spendable_in

#: The PostgreSQL advisory lock ``create_schema`` holds (a constant: ``credit_g`` in ASCII).
SCHEMA_LOCK_ID = 0x6372656469745F67

#: What a refund or a settlement copies from the charge it answers.
CHARGE_COLUMNS = (
    ledger.c.organization_id,
    ledger.c.amount,
    ledger.c.feature_key,
    ledger.c.user_id,
    ledger.c.request_method,
    ledger.c.request_path,
    ledger.c.pool,
    ledger.c.pool_fallback,
)


def lane_of(charge: Any) -> Lane:
    """The lane a charge (a row with ``CHARGE_COLUMNS``) was decided in."""
    return lane_for(charge.pool, charge.pool_fallback)


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
        pool=m.get("pool"),
        pool_fallback=bool(m.get("pool_fallback")),
    )


def new_pricing_row(fields: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A pricing row to insert: validated fields plus the id and stamps the store owns."""
    return {
        "id": str(uuid.uuid4()),
        "description": None,
        "is_active": True,
        "pool": None,
        "pool_fallback": False,
        **fields,
        "created_at": now,
        "updated_at": now,
    }


def upsert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


class Abandon(Exception):
    """Rolls back a claim (of an idempotency key, of a job id) whose charge the live grants
    could not cover: the key or id stays free for the retry after a top-up."""

    def __init__(self, spendable: int) -> None:
        self.spendable = spendable


# -- the write bodies: one transaction each, on a sync connection ---------------------------


def spendable_now_in(conn: Connection, organization_id: str, lane: Lane | None = None) -> int:
    """What the organization can spend now: its live grants (expired ones left out), every
    pool's or ``lane``'s."""
    return spendable_in(conn, organization_id, utcnow(), lane)


def granted_in(conn: Connection, organization_id: str, idempotency_key: str) -> GrantOutcome | None:
    row = conn.execute(
        select(ledger.c.id, ledger.c.amount).where(
            ledger.c.organization_id == organization_id,
            ledger.c.idempotency_key == idempotency_key,
            ledger.c.kind == "grant",
        )
    ).first()
    if row is None:
        return None
    return GrantOutcome(
        GrantStatus.ALREADY_GRANTED, spendable_now_in(conn, organization_id), int(row.id), int(row.amount)
    )


def grant_in(
    conn: Connection,
    dialect: str,
    organization_id: str,
    amount: int,
    reason: str | None,
    idempotency_key: str | None,
    expires_at: datetime | None = None,
    priority: int = 0,
    now: datetime | None = None,
    pool: str | None = None,
) -> GrantOutcome:
    if idempotency_key is not None:
        done = granted_in(conn, organization_id, idempotency_key)
        if done is not None:
            return done
    now = now or utcnow()
    values = upsert(dialect)(accounts).values(
        organization_id=organization_id, balance=amount, created_at=now, updated_at=now
    )
    stmt = values.on_conflict_do_update(
        index_elements=[accounts.c.organization_id],
        set_={"balance": accounts.c.balance + values.excluded.balance, "updated_at": now},
        where=accounts.c.balance <= MAX_BALANCE - values.excluded.balance,
    ).returning(accounts.c.balance)
    balance = conn.execute(stmt).scalar_one_or_none()  # the account row is locked from here
    if balance is None:
        return GrantOutcome(GrantStatus.OVER_LIMIT, spendable_now_in(conn, organization_id))
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
            pool=pool,
        )
        .returning(ledger.c.id)
    ).scalar_one()
    add_grant_in(
        conn,
        organization_id,
        amount,
        ledger_id=int(entry_id),
        now=now,
        priority=priority,
        expires_at=expires_at,
        reason=reason,
        pool=pool,
    )
    return GrantOutcome(GrantStatus.GRANTED, spendable_in(conn, organization_id, now), int(entry_id), amount)


def keyed_charge_in(conn: Connection, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
    """A keyed charge in a write body (``charge.claim_and_charge_in``); with ``finish_now``
    (the Python API) the key is completed at once, the charge's answer stored for replays."""
    outcome = charge.claim_and_charge_in(conn, request, claim)
    if claim.finish_now and outcome.kind is ClaimKind.CLAIMED:
        answer = {
            "charge_id": outcome.charge_id,
            "remaining_credits": outcome.spendable,
            "credits_deducted": request.credits,
        }
        keys = idempotency_keys.c
        conn.execute(
            update(idempotency_keys)
            .where(keys.organization_id == request.organization_id, keys.idempotency_key == claim.key)
            .values(state="done", status_code=200, response_body=json.dumps(answer).encode())
        )
    return outcome


def refund_row_in(conn: Connection, charge: Any, charge_id: int, amount: int, book: int, reason: str | None) -> int:
    """The refund's ledger row, copying what its charge recorded; returns its id."""
    row = {column.name: getattr(charge, column.name) for column in CHARGE_COLUMNS if column.name != "amount"}
    values = {**row, "kind": "refund", "amount": amount, "balance_after": book, "created_at": utcnow()}
    values["reason"] = reason[:500] if reason else reason
    return int(conn.execute(insert(ledger).values(**values, refund_of=charge_id).returning(ledger.c.id)).scalar_one())


def refund_in(
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
        select(*CHARGE_COLUMNS, ledger.c.extra_of).where(ledger.c.id == charge_id, ledger.c.kind == "charge")
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
    # The account's lock first (this UPDATE): every grant read after it is as committed.
    book = conn.execute(
        update(accounts)
        .where(accounts.c.organization_id == charge.organization_id)
        .values(balance=accounts.c.balance + amount, updated_at=utcnow())
        .returning(accounts.c.balance)
    ).scalar_one()
    refund_id = refund_row_in(conn, charge, charge_id, amount, book, reason)
    now = utcnow()
    give_back_in(conn, charge.organization_id, charge_id, amount, refund_id, now)
    if charge.user_id is not None:  # a charge without a member counted in no cap
        members.give_back_in(conn, charge.organization_id, charge_id, amount, now)
    spendable = spendable_in(conn, charge.organization_id, now, lane_of(charge))
    if credits is None:
        # A full refund means the request did not happen: its idempotency key is free
        # again, a reservation it paid for is closed, and a surcharge goes back with it.
        conn.execute(delete(idempotency_keys).where(idempotency_keys.c.charge_id == charge_id))
        conn.execute(
            update(reservations)
            .where(reservations.c.charge_id == charge_id, reservations.c.state == "open")
            .values(state="expired" if expired_before is not None else "released", closed_at=now)
        )
        surcharge = conn.execute(
            select(ledger.c.id).where(ledger.c.extra_of == charge_id, ledger.c.kind == "charge")
        ).scalar_one_or_none()
        if surcharge is not None:
            extra = refund_in(conn, int(surcharge), reason)
            if extra.refunded:
                amount += extra.credits_refunded
                if extra.remaining_credits is not None:  # 0 is a true remainder too
                    spendable = extra.remaining_credits
    return RefundResult(
        refunded=True,
        credits_refunded=amount,
        remaining_credits=int(spendable),
        refund_id=int(refund_id),
        organization_id=charge.organization_id,
        feature_key=charge.feature_key,
        pool=charge.pool,
    )


def settle_holds_in(conn: Connection, charge_ids: Sequence[int], completions: Sequence[Completion]) -> set[int]:
    settled: set[int] = set()
    if charge_ids:
        result = conn.execute(delete(holds).where(holds.c.charge_id.in_(list(charge_ids))).returning(holds.c.charge_id))
        settled = {int(row[0]) for row in result}
    if completions:  # only SQLite comes here (PostgreSQL settles in its own one statement)
        complete_keys_sqlite(conn.exec_driver_sql, completions)
    return settled


def settle_usage_in(
    conn: Connection, charge_id: int, used: int, max_overage_credits: int, reason: str
) -> UsageSettlement:
    closed = conn.scalar(delete(holds).where(holds.c.charge_id == charge_id).returning(holds.c.charge_id))
    charge = conn.execute(select(*CHARGE_COLUMNS).where(ledger.c.id == charge_id, ledger.c.kind == "charge")).first()
    if closed is None or charge is None:
        return UsageSettlement()
    moved = UsageSettlement(
        organization_id=charge.organization_id,
        feature_key=charge.feature_key,
        user_id=charge.user_id,
        pool=charge.pool,
    )
    held = -int(charge.amount)
    if used < held:
        refund = refund_in(conn, charge_id, reason, credits=held - used)
        return replace(
            moved, refunded=refund.credits_refunded, spendable=refund.remaining_credits, refund_id=refund.refund_id
        )
    extra = min(used - held, max_overage_credits)
    if extra <= 0:
        return moved
    # What the live grants can still give, read under the account's lock (taken first):
    # the surcharge is the charge of that much, by the database's one charge, so a grant
    # that expires in between only makes it refuse (then nothing is taken).
    org = charge.organization_id
    lock_account(conn, org, utcnow())
    lane = lane_of(charge)
    taken = min(extra, room_in(conn, org, utcnow(), lane))
    left = members.left_in(conn, org, charge.user_id, utcnow())
    if left is not None:  # a member's cap bounds its surcharge as it bounds its charges
        taken = min(taken, left)
    if taken <= 0:
        return moved
    surcharge = ChargeRequest(
        org,
        taken,
        charge.feature_key,
        charge.user_id,
        charge.request_method,
        charge.request_path,
        extra_of=charge_id,
        reason=reason[:500],
        pool=lane.pool,
        fallback=lane.fallback,
    )
    outcome = charge_in(conn, surcharge)
    if outcome.charge_id is None:
        return moved
    return replace(moved, overage=taken, spendable=outcome.spendable)


def extend_holds_in(conn: Connection, charge_ids: Sequence[int], until: datetime) -> set[int]:
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


def delete_expired_keys_in(conn: Connection, now: datetime) -> int:
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


def create_schema_in(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_ID)))
        if conn.execute(select(func.current_schema())).scalar() is None:
            # ``?schema=NAME`` names a schema that does not exist yet (checked an identifier).
            first = str(conn.execute(text("SHOW search_path")).scalar()).split(",")[0].strip().strip('"')
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{first}"'))
    metadata.create_all(conn, checkfirst=True)
    conn.execute(opening_grants(utcnow()))


def opening_grants(now: datetime) -> Any:
    """Accounts from before grants keep their balance as one never-expiring grant (an
    account of this version always has grants, so this finds nothing twice)."""
    has_grants = exists(select(grants.c.id).where(grants.c.organization_id == accounts.c.organization_id))
    opening = select(
        accounts.c.organization_id,
        accounts.c.balance,
        accounts.c.balance,
        literal(0),
        false(),
        literal(0),
        literal("balance before grants"),
        literal(now, DateTime(timezone=True)),
    ).where(accounts.c.balance > 0, ~has_grants)
    columns = ["organization_id", "amount", "remaining", "floor", "overdraft", "priority", "reason", "created_at"]
    return insert(grants).from_select(columns, opening)


def update_pricing_in(conn: Connection, pricing_id: str, changes: Mapping[str, Any]) -> tuple[FeaturePricing, str]:
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


def import_pricing_in(
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
            values = new_pricing_row(fields, now)
            created.append(
                pricing_from_row(
                    conn.execute(insert(feature_pricing).values(**values).returning(feature_pricing)).one()
                )
            )
    return created, updated
