"""The Python API for an organization's credits: grants, overdraft, async-job reservations,
its balance over time.

A mixin of ``CreditGuard`` (kept apart so the facade stays small); each method is one
call into the ``grants`` or ``reservations`` service.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from ._grants import Grants
from ._ledger import check_org
from ._pricing import Pricing
from ._reservations import Reservations
from ._storage.base import Lane, Store, lane_for
from ._topups import AutoTopups, Charge
from .models import (
    AutoTopup,
    BalancePoint,
    CreditCheck,
    DeductionResult,
    Grant,
    Reservation,
    check_pool,
    is_storable_text,
)


class AccountsApi:
    grants: Grants
    topups: AutoTopups
    reservations: Reservations
    store: Store
    pricing: Pricing

    async def check_credits(self, organization_id: str, feature_key: str) -> CreditCheck:
        """Would the organization afford this feature now? Advice only: it reserves nothing.
        ``available`` is what the feature's charge could draw from (its credit pool's
        credits, and general ones if it falls back to them), the number a 402 would say."""
        check_org(organization_id)
        pricing = await self.pricing.active(feature_key)
        if pricing is None:
            available = await self.store.spendable(organization_id)
            return CreditCheck(False, 0, available, error=f"Feature pricing not found: {feature_key}")
        available = await self.store.spendable(organization_id, lane_for(pricing.pool, pricing.pool_fallback))
        return CreditCheck(available >= pricing.credits, pricing.credits, available)

    async def get_balance(self, organization_id: str, *, pool: str | None = None) -> int:
        """The organization's balance (0 when it has no account): what it can spend, every
        credit pool counted; with ``pool``, what that pool's own grants hold. ValueError
        for a malformed id or pool name."""
        check_org(organization_id)
        check_pool(pool)
        return await self.store.spendable(organization_id, None if pool is None else Lane(pool))

    async def get_pool_balances(self, organization_id: str) -> dict[str | None, int]:
        """What the organization can spend in each credit pool its live grants belong to
        (None: general; the overdraft line's debt counts there). Their sum is ``get_balance``."""
        check_org(organization_id)
        return await self.store.pool_balances(organization_id)

    async def grant_credits(
        self,
        organization_id: str,
        amount: int,
        *,
        reason: str | None = None,
        expires_at: datetime | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
        pool: str | None = None,
    ) -> int:
        """Grant credits (creating the account); returns the new spendable balance.

        ``expires_at`` (timezone-aware): the credits stop being spendable at that instant,
        whether or not ``expire_grants`` has run. ``priority``: charges draw from lower
        priorities first, then the soonest expiry, never-expiring last, then the oldest.
        A grant first repays what the organization owes on its overdraft line.
        ``pool``: credits only the features priced in that credit pool draw from (they are
        never spent on other features, and never repay the overdraft line); None: general.
        ``idempotency_key`` (a payment's or webhook event's id): the same key grants once
        per organization, whatever the concurrency or the number of processes, and every
        later call grants nothing and returns the current balance; reusing a key for
        another amount raises IdempotencyKeyReused. ValueError for a bad argument, or when
        the balance would pass ``MAX_BALANCE`` (nothing is written then).
        """
        return await self.grants.grant(
            organization_id,
            amount,
            reason=reason,
            expires_at=expires_at,
            priority=priority,
            idempotency_key=idempotency_key,
            pool=pool,
        )

    async def expire_grants(self, now: datetime | None = None) -> int:
        """Write off what expired grants still hold (an 'expiry' ledger row each, so the
        balance stays the sum of the ledger); returns how many grants it closed. The
        guard's keeper and ``credit-guard sweep`` run it; expired credits are never
        spendable meanwhile (charges and balances leave them out from the instant of expiry)."""
        return await self.grants.expire(now)

    async def list_grants(self, organization_id: str) -> list[Grant]:
        """The organization's grants: live ones first, in spending order, then spent and expired ones."""
        return await self.grants.list(organization_id)

    async def set_overdraft_limit(self, organization_id: str, credits: int) -> None:
        """Let charges take the balance down to ``-credits`` (a 402 only beyond); 0 (the
        default) allows none. The database enforces the floor. ValueError when the
        organization already owes more than ``credits``."""
        await self.grants.set_overdraft(organization_id, credits)

    async def get_overdraft(self, organization_id: str) -> tuple[int, int]:
        """``(limit, owed)``: the organization's overdraft limit and what it owes on it."""
        return await self.grants.overdraft(organization_id)

    async def reserve(
        self,
        organization_id: str,
        feature_key: str,
        *,
        job_id: str,
        units: int | float | Decimal | str = 1,
        ttl: float,
        user_id: str | None = None,
        max_overage: float | None = None,
    ) -> DeductionResult:
        """Take price x ``units`` now and hold it under ``job_id`` for up to ``ttl`` seconds,
        whatever happens to this process (the price is fixed now). Reserving a ``job_id``
        again charges nothing and returns the reservation (``replayed=True``). Close it
        with ``capture`` or ``release``; after ``ttl`` the sweeper releases it.
        ``max_overage`` (default: the guard's): how far above the reserve, as a share of
        it, a capture may still charge."""
        return await self.reservations.reserve(
            organization_id,
            feature_key,
            job_id=job_id,
            units=units,
            ttl=ttl,
            user_id=user_id,
            max_overage=max_overage,
        )

    async def capture(self, job_id: str, *, units: int | float | Decimal | str | None = None) -> Reservation:
        """Keep the job's charge for ``units`` (default: all reserved), refund the rest.
        Idempotent, from any process: a second call moves nothing and returns the
        reservation as closed. LookupError for an unknown ``job_id``."""
        return await self.reservations.capture(job_id, units=units)

    async def release(self, job_id: str) -> Reservation:
        """Refund the job's whole reservation. Idempotent; LookupError for an unknown ``job_id``."""
        return await self.reservations.release(job_id)

    async def find_organizations(self, prefix: str = "", *, limit: int = 50) -> list[tuple[str, int]]:
        """``(organization_id, balance)`` of the accounts whose id starts with ``prefix``."""
        if not isinstance(prefix, str) or not is_storable_text(prefix) or not 0 < limit <= 1000:
            raise ValueError("prefix must be storable text and limit from 1 to 1000")
        return await self.store.organizations(prefix, limit)

    async def organization_activity(
        self, organization_id: str, *, limit: int = 50
    ) -> tuple[list[dict[str, Any]], list[Reservation]]:
        """An organization's latest ledger rows (newest first) and its open reservations."""
        check_org(organization_id)
        return await self.store.activity(organization_id, limit)

    async def balance_history(
        self, organization_id: str, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[BalancePoint]:
        """The organization's balance at the end of each UTC day its credits moved, oldest
        first (``until`` exclusive): a chart's line, read from the ledger's ``balance_after``."""
        check_org(organization_id)
        return await self.store.balance_history(organization_id, since=since, until=until)

    async def set_auto_topup(
        self, organization_id: str, *, below: int, credits: int, charge: Charge | None = None
    ) -> AutoTopup:
        """Buy ``credits`` whenever the spendable balance falls below ``below``: once per
        crossing, outside the request, by ``await charge(organization_id, credits)`` (which
        pays and grants; see ``_topups.py``). ``charge`` is one callable for every
        organization: register it in every process (here, or for all at once with no
        organization's line changed, ``guard.topups.register(charge)``)."""
        check_org(organization_id)
        if charge is not None:
            self.topups.register(charge)
        return await self.topups.set(organization_id, below, credits)

    async def auto_topup(self, organization_id: str) -> AutoTopup | None:
        """The organization's auto top-up and how its last run went (None: none set)."""
        check_org(organization_id)
        return await self.store.topup(organization_id)

    async def remove_auto_topup(self, organization_id: str) -> bool:
        check_org(organization_id)
        return await self.topups.remove(organization_id)
