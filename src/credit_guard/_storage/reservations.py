"""Reservations: an async job's charge, held under the job's id until it is closed.

A reservation is a charge whose hold expires at the reservation's TTL and that no
process keeps alive, so it survives restarts; its row maps the job id to the charge.
Closing it is one conditional UPDATE (``state = 'open'``), so a capture and a release,
or two captures, racing from any processes, close it once: the loser moves nothing.
The sweeper's refund of an expired hold closes the reservation as ``expired``.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from sqlalchemy import Connection, select, update

from .._clock import utcnow
from ..models import RefundResult, Reservation
from ..schema import holds, reservations
from .base import ChargeRequest, UsageSettlement
from .charge import charge_in
from .writes import Abandon, refund_in, settle_usage_in, upsert

R = reservations.c


def reservation_from_row(row: Any, **moved: int) -> Reservation:
    return Reservation(
        job_id=row.job_id,
        organization_id=row.organization_id,
        feature_key=row.feature_key,
        charge_id=int(row.charge_id),
        credits=int(row.credits),
        state=row.state,
        expires_at=row.expires_at.replace(tzinfo=UTC) if row.expires_at.tzinfo is None else row.expires_at,
        unit_price=int(row.unit_price),
        max_overage_credits=int(row.max_overage_credits),
        **moved,
    )


def reserve_in(
    conn: Connection, dialect: str, request: ChargeRequest, job_id: str, unit_price: int, max_overage_credits: int
) -> tuple[Reservation | None, int, bool]:
    """Claim the job id, then charge (a hold until ``request.hold_until``): the
    reservation, the spendable balance, and whether it is new. An existing reservation
    is returned as it is, charging nothing. Raises Abandon when short."""
    assert request.hold_until is not None
    now = utcnow()
    claimed = conn.execute(
        upsert(dialect)(reservations)
        .values(
            job_id=job_id,
            organization_id=request.organization_id,
            feature_key=request.feature_key,
            charge_id=0,
            credits=request.credits,
            unit_price=unit_price,
            max_overage_credits=max_overage_credits,
            state="open",
            expires_at=request.hold_until,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[R.job_id])
        .returning(R.job_id)
    ).first()
    if claimed is None:
        row = conn.execute(select(reservations).where(R.job_id == job_id)).one()
        return reservation_from_row(row), 0, False
    outcome = charge_in(conn, request)
    if outcome.charge_id is None:
        raise Abandon(outcome.spendable)
    row = conn.execute(
        update(reservations).where(R.job_id == job_id).values(charge_id=outcome.charge_id).returning(reservations)
    ).one()
    return reservation_from_row(row), outcome.spendable, True


def adopt_in(
    conn: Connection,
    job_id: str,
    charge_id: int,
    request: ChargeRequest,
    unit_price: int,
    max_overage_credits: int,
) -> Reservation:
    """Turn a request's open hold into the reservation of ``job_id`` (its expiry becomes
    the reservation's). LookupError if the hold is gone, ValueError if the id is taken."""
    assert request.hold_until is not None
    moved = conn.execute(
        update(holds).where(holds.c.charge_id == charge_id).values(expires_at=request.hold_until)
    ).rowcount
    if not moved:
        raise LookupError(f"charge {charge_id} is no longer held")
    claimed = conn.execute(
        upsert(conn.dialect.name)(reservations)
        .values(
            job_id=job_id,
            organization_id=request.organization_id,
            feature_key=request.feature_key,
            charge_id=charge_id,
            credits=request.credits,
            unit_price=unit_price,
            max_overage_credits=max_overage_credits,
            state="open",
            expires_at=request.hold_until,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[R.job_id])
        .returning(reservations)
    ).first()
    if claimed is None:
        raise ValueError(f"job {job_id!r:.80} already has a reservation")
    return reservation_from_row(claimed)


def close_in(
    conn: Connection, job_id: str, *, capture: bool, used: int | None, reason: str
) -> tuple[Reservation, UsageSettlement | RefundResult | None]:
    """Capture (keep ``used`` credits, None: all reserved; refund the rest or take the
    overage) or release (refund all). A reservation already closed moves nothing and is
    returned as it is; an unknown job id raises LookupError."""
    now = utcnow()
    row = conn.execute(
        update(reservations)
        .where(R.job_id == job_id, R.state == "open")
        .values(state="captured" if capture else "released", closed_at=now)
        .returning(reservations)
    ).first()
    if row is None:
        existing = conn.execute(select(reservations).where(R.job_id == job_id)).first()
        if existing is None:
            raise LookupError(f"no reservation for job {job_id!r:.80}")
        return reservation_from_row(existing), None
    if not capture:
        refund = refund_in(conn, int(row.charge_id), reason)
        return reservation_from_row(row, refunded_credits=refund.credits_refunded), refund
    keep = int(row.credits) if used is None else used
    settled = settle_usage_in(conn, int(row.charge_id), keep, int(row.max_overage_credits), reason)
    if settled.organization_id is None:
        # The hold was already gone: the sweeper refunded it when the TTL ran out.
        row = conn.execute(
            update(reservations).where(R.job_id == job_id).values(state="expired").returning(reservations)
        ).one()
        return reservation_from_row(row), None
    captured = int(row.credits) - settled.refunded + settled.overage
    return reservation_from_row(row, captured_credits=captured, refunded_credits=settled.refunded), settled


def reservation_in(conn: Connection, job_id: str) -> Reservation | None:
    row = conn.execute(select(reservations).where(R.job_id == job_id)).first()
    return None if row is None else reservation_from_row(row)
