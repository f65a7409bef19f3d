"""Grants: topping an organization up, its overdraft line, and expiring what ran out.

The money rules live in the store (``_storage/grants.py``); this service checks the
arguments (a precise ValueError, never a database error) and reports what happened to
the hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from ._clock import utcnow
from ._hooks import HookDispatcher
from ._ledger import check_key, check_org
from ._storage.base import GrantStatus, Store
from .errors import IdempotencyKeyReused
from .events import GrantExpiredEvent, LowBalanceEvent, crossed_below
from .models import Grant, check_pool, is_storable_text
from .schema import MAX_BALANCE

log = logging.getLogger("credit_guard")

#: Priorities are 32-bit integers in the table.
PRIORITY_RANGE = range(-(2**31), 2**31)


class Grants:
    def __init__(self, store: Store, hooks: HookDispatcher, *, low_balance_threshold: int | None) -> None:
        self.store, self.hooks = store, hooks
        self.low_balance_threshold = low_balance_threshold
        #: Told of every balance a grant or an expiry moved: ``(org, balance, delta)`` (webhook alerts).
        self.watch: Callable[[str, int | None, int], None] | None = None

    async def grant(
        self,
        organization_id: str,
        amount: int,
        *,
        reason: str | None,
        expires_at: datetime | None,
        priority: int,
        idempotency_key: str | None,
        pool: str | None = None,
    ) -> int:
        check_org(organization_id)
        check_pool(pool)
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_BALANCE:
            raise ValueError(f"amount must be a positive integer up to {MAX_BALANCE}, got {amount!r:.40}")
        if reason is not None and (not isinstance(reason, str) or not is_storable_text(reason)):
            raise ValueError(f"reason must be text without NUL characters or unpaired surrogates, got {reason!r:.80}")
        if not isinstance(priority, int) or isinstance(priority, bool) or priority not in PRIORITY_RANGE:
            raise ValueError(f"priority must be a 32-bit integer, got {priority!r:.40}")
        expires_at = aware_utc(expires_at, "expires_at")
        if expires_at is not None and expires_at <= utcnow():
            raise ValueError(f"expires_at {expires_at.isoformat()} has passed: such a grant could never be spent")
        check_key(idempotency_key)
        outcome = await self.store.grant(
            organization_id,
            amount,
            reason[:500] if reason else reason,
            idempotency_key,
            expires_at=expires_at,
            priority=priority,
            pool=pool,
        )
        if outcome.status is GrantStatus.OVER_LIMIT:
            raise ValueError(
                f"granting {amount} would take {organization_id!r:.80}'s balance past the maximum of"
                f" {MAX_BALANCE} credits (it can spend {outcome.spendable} now); nothing was granted"
            )
        if outcome.status is GrantStatus.ALREADY_GRANTED:
            if outcome.amount != amount:
                raise IdempotencyKeyReused(idempotency_key or "")
            log.info(
                "credit_guard: grant %r to %s was already made; not granted again", idempotency_key, organization_id
            )
        if self.watch is not None and outcome.status is GrantStatus.GRANTED and pool is None:
            # ``spendable`` counts every pool; the watchers judge general credits: they look.
            self.watch(organization_id, None, amount)
        return outcome.spendable

    async def expire(self, now: datetime | None = None) -> int:
        """Write off what expired grants still hold; how many grants were closed."""
        when = aware_utc(now, "now") or utcnow()
        closed = await self.store.expire_grants(when)
        by_org: dict[str, int] = {}
        for grant in closed:
            log.info(
                "credit_guard: grant %s of %s expired with %s credits unspent",
                grant.grant_id,
                grant.organization_id,
                grant.credits,
            )
            self.hooks.emit(GrantExpiredEvent(grant.organization_id, grant.grant_id, grant.credits, grant.spendable))
            by_org[grant.organization_id] = by_org.get(grant.organization_id, 0) + grant.credits
        threshold = self.low_balance_threshold
        for grant in {g.organization_id: g for g in closed}.values():
            if self.watch is not None:  # (every pool counted in ``spendable``: the watchers look themselves)
                self.watch(grant.organization_id, None, -by_org[grant.organization_id])
            if crossed_below(threshold, grant.spendable, by_org[grant.organization_id]):
                assert threshold is not None
                self.hooks.emit(LowBalanceEvent(grant.organization_id, grant.spendable, threshold, None))
        return len(closed)

    async def list(self, organization_id: str) -> list[Grant]:
        check_org(organization_id)
        return await self.store.list_grants(organization_id, utcnow())

    async def set_overdraft(self, organization_id: str, credits: int) -> None:
        check_org(organization_id)
        if not isinstance(credits, int) or isinstance(credits, bool) or not 0 <= credits <= MAX_BALANCE:
            raise ValueError(f"the overdraft limit must be an integer from 0 to {MAX_BALANCE}, got {credits!r:.40}")
        await self.store.set_overdraft(organization_id, credits)

    async def overdraft(self, organization_id: str) -> tuple[int, int]:
        check_org(organization_id)
        return await self.store.overdraft(organization_id)


def aware_utc(value: datetime | None, name: str) -> datetime | None:
    """``value`` in UTC (the ledger keeps UTC); a naive datetime is refused, not guessed."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r:.80}")
    return value.astimezone(UTC)
