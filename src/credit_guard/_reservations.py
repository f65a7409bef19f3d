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
from ._decisions import Refusal, Refused
from ._jobs import check_job, check_ttl
from ._ledger import Ledger, check_org, refusal_result
from ._storage.base import ChargeRequest
from ._units import cost_of, units_value
from .models import DeductionResult, Reservation


class Reservations:
    def __init__(self, ledger: Ledger, *, max_overage: float) -> None:
        self.ledger, self.store = ledger, ledger.store
        self.max_overage = max_overage

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
            return refusal_result(Refused(Refusal.FEATURE_NOT_FOUND, feature_key))
        credits = cost_of(pricing.credits, count)
        request = ChargeRequest(
            organization_id,
            credits,
            feature_key,
            user_id,
            None,
            None,
            utcnow() + timedelta(seconds=ttl),
            pool=pricing.pool,
            fallback=pricing.pool_fallback,
        )
        share = self.max_overage if max_overage is None else max_overage
        reservation, balance, new = await self.store.reserve(
            request, job_id, unit_price=pricing.credits, max_overage_credits=math.floor(credits * share)
        )
        if reservation is None:
            return refusal_result(self.ledger.refused(organization_id, feature_key, credits, balance, pricing.pool))
        if reservation.organization_id != organization_id:
            raise ValueError(f"job {job_id!r:.80} is reserved by another organization")
        replayed = not new
        if new:
            self.ledger.charged(
                organization_id, feature_key, credits, balance, reservation.charge_id, user_id, pool=pricing.pool
            )
        return DeductionResult(
            success=True,
            remaining_credits=None if replayed else balance,
            credits_deducted=reservation.credits,
            charge_id=reservation.charge_id,
            required=reservation.credits,
            replayed=replayed,
            unit_price=reservation.unit_price,
            pool=pricing.pool,
        )

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
        return await self.ledger.close_job(job_id, used=used, capture=capture)
