"""Reservations: credits held for an async job until its completion says what it used.

An image-to-video request answers 202 with a task id; the provider finishes minutes
later and calls a webhook. The credits are taken when the job starts (a hold that no
process keeps alive, so a restart does not release it), held under the job's id, and
closed from whichever process gets the completion: ``capture`` keeps what was used
(refunding the rest, or taking overage within the reserved limit), ``release`` gives all
back. Closing is one conditional UPDATE, so it happens once whoever calls it how often.
A reservation still open after its TTL is released by the sweeper.
"""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal

from ._clock import utcnow
from ._ledger import Ledger, check_org
from ._storage.base import ChargeRequest, UsageSettlement
from ._units import cost_of, units_value
from .events import InsufficientCreditsEvent
from .models import DeductionResult, RefundResult, Reservation, is_storable_text

#: Column width of a job id.
JOB_ID_MAX = 255


class Reservations:
    def __init__(self, ledger: Ledger, *, max_overage: float) -> None:
        self.ledger, self.store = ledger, ledger.store
        self.max_overage = max_overage
        ledger.reservations = self

    async def reserve(
        self,
        organization_id: str,
        feature_key: str,
        *,
        job_id: str,
        units: int | float | Decimal | str,
        ttl: float,
        user_id: str | None,
        max_overage: float | None,
    ) -> DeductionResult:
        check_org(organization_id)
        check_job(job_id)
        check_ttl(ttl)
        count = units_value(units)
        pricing = await self.ledger.pricing.active(feature_key)
        if pricing is None:
            return DeductionResult(
                success=False, error=f"Feature pricing not found: {feature_key}", error_code="feature_not_found"
            )
        credits = cost_of(pricing.credits, count)
        request = ChargeRequest(
            organization_id, credits, feature_key, user_id, None, None, utcnow() + timedelta(seconds=ttl)
        )
        share = self.max_overage if max_overage is None else max_overage
        reservation, balance, new = await self.store.reserve(
            request, job_id, unit_price=pricing.credits, max_overage_credits=math.floor(credits * share)
        )
        if reservation is None:
            self.ledger.hooks.emit(InsufficientCreditsEvent(organization_id, feature_key, credits, balance))
            return DeductionResult(
                success=False,
                remaining_credits=balance,
                error=f"Insufficient credits. Required: {credits}, Available: {balance}",
                required=credits,
                error_code="insufficient_credits",
            )
        if reservation.organization_id != organization_id:
            raise ValueError(f"job {job_id!r:.80} is reserved by another organization")
        replayed = not new
        if new:
            self.ledger.charged(organization_id, feature_key, credits, balance, reservation.charge_id, user_id)
        return DeductionResult(
            success=True,
            remaining_credits=None if replayed else balance,
            credits_deducted=reservation.credits,
            charge_id=reservation.charge_id,
            required=reservation.credits,
            replayed=replayed,
            unit_price=reservation.unit_price,
        )

    async def adopt(
        self,
        job_id: str,
        ticket_charge: ChargeRequest,
        charge_id: int,
        *,
        ttl: float,
        unit_price: int,
        max_overage: float,
    ) -> Reservation:
        """A paid request's charge becomes the reservation of the job it started."""
        check_job(job_id)
        check_ttl(ttl)
        request = ChargeRequest(
            ticket_charge.organization_id,
            ticket_charge.credits,
            ticket_charge.feature_key,
            hold_until=utcnow() + timedelta(seconds=ttl),
        )
        reservation = await self.store.adopt_reservation(
            job_id,
            charge_id,
            request,
            unit_price=unit_price,
            max_overage_credits=math.floor(ticket_charge.credits * max_overage),
        )
        self.ledger.holds.forget(charge_id)
        return reservation

    async def capture(self, job_id: str, *, units: int | float | Decimal | str | None) -> Reservation:
        """Keep ``units`` at the reserved price (None: all reserved); refund the rest, or
        take what goes beyond within the reservation's overage limit."""
        check_job(job_id)
        used: int | None = None
        if units is not None:
            count = units_value(units, allow_zero=True)
            found = await self.store.reservation(job_id)
            if found is None:
                raise LookupError(f"no reservation for job {job_id!r:.80}")
            used = cost_of(found.unit_price, count)
        return await self._close(job_id, used=used, capture=True)

    async def release(self, job_id: str) -> Reservation:
        check_job(job_id)
        return await self._close(job_id, used=None, capture=False)

    async def _close(self, job_id: str, *, used: int | None, capture: bool) -> Reservation:
        reason = f"job {job_id} {'captured' if capture else 'released'}"
        reservation, moved = await self.store.close_reservation(job_id, used=used, reason=reason, capture=capture)
        if isinstance(moved, RefundResult) and moved.refunded:
            self.ledger.refunded(moved, reservation.charge_id, reason)
        elif isinstance(moved, UsageSettlement):
            self.ledger.usage_settled(reservation.charge_id, moved, None)
        return reservation


def check_job(job_id: object) -> None:
    if not isinstance(job_id, str) or not job_id or len(job_id) > JOB_ID_MAX or not is_storable_text(job_id):
        raise ValueError(f"job_id must be 1 to {JOB_ID_MAX} characters of text, got {job_id!r:.80}")


def check_ttl(ttl: object) -> None:
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= 366 * 86400 or math.isnan(ttl):
        raise ValueError(f"ttl must be a number of seconds from 0 to a year, got {ttl!r:.40}")
