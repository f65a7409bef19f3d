"""The Python API for plans: credits by subscription, a period at a time.

A mixin of ``CreditGuard`` (kept apart so the facade stays small). It checks arguments
(a precise ValueError or ``PlanNotFound``, never a database error), hands each change to
the store in one transaction (``_storage/plans.py`` holds the rules) and tells the hooks
what was granted. Periods are granted by ``subscribe`` (the current one, at once) and by
every process's keeper (``renew_and_expire``, also ``credit-guard sweep``): each period
once, whoever runs it, catching up in order after a keeper that was down.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Literal

from ._clock import utcnow
from ._grants import Grants, aware_utc
from ._hooks import HookDispatcher
from ._ledger import check_org
from ._periods import check_unit
from ._storage.base import Issued, Store
from ._topups import AutoTopups
from ._webhooks import Webhooks
from .errors import PlanInUse, PlanNotFound
from .events import AllowanceIssuedEvent, H
from .models import FEATURE_KEY_MAX, FEATURE_KEY_RE, FEATURE_NAME_MAX, Plan, Subscription, is_storable_text
from .schema import MAX_BALANCE

log = logging.getLogger("credit_guard")

OnChange = Literal["expire", "keep"]


class PlansApi:
    grants: Grants
    hooks: HookDispatcher
    store: Store
    webhooks: Webhooks
    topups: AutoTopups

    async def define_plan(
        self,
        plan_key: str,
        *,
        credits: int,
        period: str = "month",
        rollover: int | None = 0,
        name: str | None = None,
    ) -> Plan:
        """Create plan ``plan_key``, or change it: ``credits`` every ``period`` (``day``,
        ``week``, ``month`` or ``year``), ``rollover`` of each period's unused credits
        carried into the next (0: they reset; None: all carry). A change reaches each
        subscriber at its next period, never the one under way."""
        key = check_plan_key(plan_key)
        plan = Plan(key, check_name(name, key), check_credits(credits), check_unit(period), check_rollover(rollover))
        saved, created = await self.store.define_plan(plan, utcnow())
        log.info("credit_guard: plan %s %s: %r", plan.plan_key, "created" if created else "changed", saved)
        return saved

    async def get_plan(self, plan_key: str) -> Plan | None:
        return await self.store.plan(check_plan_key(plan_key))

    async def list_plans(self) -> list[Plan]:
        return [plan for plan, _ in await self.store.list_plans()]

    async def delete_plan(self, plan_key: str) -> None:
        """Delete a plan nobody subscribes to (``PlanInUse`` otherwise, ``PlanNotFound``)."""
        deleted = await self.store.delete_plan(check_plan_key(plan_key))
        if deleted is None:
            raise PlanNotFound(plan_key)
        if not deleted:
            raise PlanInUse(plan_key)

    async def subscribe(
        self,
        organization_id: str,
        plan_key: str,
        *,
        anchor: datetime | None = None,
        on_change: OnChange = "expire",
    ) -> Subscription:
        """Put the organization on plan ``plan_key`` from ``anchor`` (a period start; now
        by default) and grant the period under way at once; one plan at a time.

        Already on this plan: nothing changes (so it is safe to call on every login or
        webhook). On another plan: that one ends now, its unused allowance and rollover
        written off (``on_change="keep"``: they last to their own end), and the new plan's
        first period starts now (or at ``anchor``)."""
        check_org(organization_id)
        keep = check_on_change(on_change)
        result = await self.store.subscribe(
            organization_id,
            check_plan_key(plan_key),
            anchor=aware_utc(anchor, "anchor"),
            keep=keep,
            now=utcnow(),
        )
        if result is None:
            raise PlanNotFound(plan_key)
        subscription, issued = result
        self._announce(issued)
        return subscription

    async def unsubscribe(self, organization_id: str, *, on_change: OnChange = "keep") -> Subscription | None:
        """End the organization's subscription (returns it; None if it had none). The
        period under way keeps its credits to its end unless ``on_change="expire"``."""
        check_org(organization_id)
        return await self.store.unsubscribe(organization_id, keep=check_on_change(on_change), now=utcnow())

    async def subscription(self, organization_id: str) -> Subscription | None:
        check_org(organization_id)
        return await self.store.subscription(organization_id)

    async def renew_and_expire(self, now: datetime | None = None) -> int:
        """One keeper round for accounts: grant every period that has begun, then write
        off expired grants (a period's renewal first, so its rollover is carried before
        anything could write the ending allowance off). How many periods were granted."""
        when = aware_utc(now, "now") or utcnow()
        issued = await self.store.renew_due(when)
        self._announce(issued)
        await self.grants.expire(when)
        await self.topups.refresh()  # lines set by other processes
        return len(issued)

    async def renew_now(self, organization_id: str) -> bool:
        """Grant the organization's plan period if one has begun that no keeper has granted
        yet: a charge refused at a period's first moments asks this once before its 402.
        Never raises: a failure here leaves the refusal as it was (logged)."""
        try:
            issued = await self.store.renew_if_due(organization_id, utcnow())
        except Exception as exc:
            log.error("credit_guard: renewing %s's plan before a refusal failed: %s", organization_id, exc)
            return False
        self._announce(issued)
        return bool(issued)

    def on_allowance_issued(self, hook: H) -> H:
        """Register ``async def hook(event: AllowanceIssuedEvent)`` (each period granted)."""
        return self.hooks.add(AllowanceIssuedEvent, hook)

    def _announce(self, issued: list[Issued]) -> None:
        for item in issued:
            self.webhooks.moved(item.organization_id, None, item.credits)
            log.info(
                "credit_guard: %s's plan %s: period %s from %s granted %s credits (%s rolled over, %s expired)",
                item.organization_id,
                item.plan_key,
                item.period,
                item.period_start.isoformat(),
                item.credits,
                item.rollover,
                item.expired,
            )
            self.hooks.emit(
                AllowanceIssuedEvent(
                    item.organization_id,
                    item.plan_key,
                    item.period,
                    item.period_start,
                    item.credits,
                    item.rollover,
                    item.expired,
                )
            )


def check_plan_key(plan_key: object) -> str:
    if not isinstance(plan_key, str) or len(plan_key) > FEATURE_KEY_MAX or not FEATURE_KEY_RE.match(plan_key):
        raise ValueError(
            f"plan_key must be lowercase snake_case (a-z, 0-9, _), at most {FEATURE_KEY_MAX} characters,"
            f" got {plan_key!r:.80}"
        )
    return plan_key


def check_name(name: object, plan_key: str) -> str:
    if name is None:
        return plan_key
    if not isinstance(name, str) or not name.strip() or len(name) > FEATURE_NAME_MAX or not is_storable_text(name):
        raise ValueError(f"name must be 1 to {FEATURE_NAME_MAX} characters of text, got {name!r:.80}")
    return name


def check_credits(credits: object) -> int:
    if not isinstance(credits, int) or isinstance(credits, bool) or not 0 < credits <= MAX_BALANCE:
        raise ValueError(f"credits must be a positive integer up to {MAX_BALANCE}, got {credits!r:.40}")
    return credits


def check_rollover(rollover: object) -> int | None:
    if rollover is None:
        return None
    if not isinstance(rollover, int) or isinstance(rollover, bool) or not 0 <= rollover <= MAX_BALANCE:
        raise ValueError(f"rollover must be None (all) or an integer from 0 to {MAX_BALANCE}, got {rollover!r:.40}")
    return rollover


def check_on_change(on_change: object) -> bool:
    """Whether the old plan's credits are kept."""
    if on_change not in ("expire", "keep"):
        raise ValueError(f"on_change must be 'expire' or 'keep', got {on_change!r:.40}")
    return on_change == "keep"
