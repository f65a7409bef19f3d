"""The ledger: every rule about moving credits, over the store.

    grant -> charge (one atomic statement, maybe a hold, maybe an idempotency key)
          -> refund (exactly once) | settle (the hold kept, at the reported usage)

Every method is the Python API's (``CreditGuard`` delegates here) or a step the request
flow takes (``_ticket.py``). Nothing here knows HTTP: ids arrive checked or are checked
here, and answers are results (``DeductionResult``...) or precise exceptions.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from decimal import Decimal

import anyio

from ._clock import utcnow
from ._decisions import Charged, Decision, InFlight, KeyReused, Refusal, Refused, Replayed
from ._holds import HoldKeeper
from ._hooks import HookDispatcher
from ._idempotency import call_fingerprint, validate_key
from ._metrics import Metrics
from ._pricing import Pricing
from ._storage.base import (
    ChargeRequest,
    ClaimKind,
    Completion,
    KeyClaim,
    Store,
    UsageSettlement,
)
from ._units import ONE, cost_of, units_value
from .errors import IdempotencyKeyReused, StorageUnavailable
from .events import ChargeEvent, InsufficientCreditsEvent, LowBalanceEvent, RefundEvent, crossed_below
from .models import (
    FEATURE_KEY_MAX,
    FEATURE_KEY_RE,
    AuditIssue,
    DeductionResult,
    RefundResult,
    Reservation,
    UsageGroup,
    UsageRow,
    is_storable_text,
)

log = logging.getLogger("credit_guard")

#: Column widths of the ledger (schema.py); longer values are refused or clipped up front.
ORGANIZATION_ID_MAX = 255
USER_ID_MAX = 255
REQUEST_PATH_MAX = 2048
#: A keyed charge: (key, fingerprint, finish_now: store the answer at once, as the Python API does).
Idempotency = tuple[str, str, bool]


class Ledger:
    """Grants, charges, refunds and settlements, with the hooks they fire."""

    def __init__(
        self,
        store: Store,
        pricing: Pricing,
        holds: HoldKeeper,
        hooks: HookDispatcher,
        *,
        idempotency_ttl: float,
        refund_attempts: int,
        low_balance_threshold: int | None,
    ) -> None:
        self.store, self.pricing, self.holds, self.hooks = store, pricing, holds, hooks
        self.idempotency_ttl = idempotency_ttl
        self.refund_attempts = max(1, refund_attempts)
        self.low_balance_threshold = low_balance_threshold
        holds.on_refund = self.refunded
        #: What this process reports (``_metrics.py``); None (the default) reports nothing.
        self.metrics: Metrics | None = None
        #: Grants an organization's plan period that has begun, if one has (True: granted);
        #: a refused charge asks it once before it answers 402 (``PlansApi.renew_now``).
        self.renew: Callable[[str], Awaitable[bool]] | None = None
        #: Told of every balance a charge or refund moved: ``(org, balance, delta)`` (webhook alerts).
        self.watch: Callable[[str, int | None, int], None] | None = None

    # -- charges --------------------------------------------------------------------------

    async def deduct(
        self,
        organization_id: str,
        feature_key: str,
        user_id: str | None,
        *,
        units: int | float | Decimal | str,
        idempotency_key: str | None,
        hold: bool,
        request_method: str | None,
        request_path: str | None,
    ) -> DeductionResult:
        """The Python API's charge (``CreditGuard.deduct_credits``)."""
        check_key(idempotency_key)
        count = units_value(units)
        keyed = (idempotency_key, call_fingerprint(feature_key, count.normalize()), True) if idempotency_key else None
        decision = await self.charge(
            organization_id,
            feature_key,
            user_id,
            units=count,
            idempotency=keyed,
            hold=hold,
            request_method=request_method,
            request_path=request_path,
        )
        match decision:
            case Charged():
                return DeductionResult(
                    success=True,
                    remaining_credits=decision.spendable,
                    credits_deducted=decision.credits,
                    charge_id=decision.charge_id,
                    required=decision.credits,
                    unit_price=decision.unit_price,
                    pool=decision.pool,
                )
            case Refused():
                return refusal_result(decision)
            case KeyReused():
                raise IdempotencyKeyReused(idempotency_key or "")
            case Replayed() | InFlight():
                # The first call's answer when it has one; a call still running has only its charge.
                body = decision.stored.get("response_body") if isinstance(decision, Replayed) else None
                stored = json.loads(bytes(body or b"{}"))
                return DeductionResult(
                    success=True,
                    remaining_credits=stored.get("remaining_credits"),
                    credits_deducted=stored.get("credits_deducted"),
                    charge_id=stored.get("charge_id") or decision.stored.get("charge_id"),
                    required=stored.get("credits_deducted"),
                    replayed=True,
                )

    def refused(
        self, organization_id: str, feature_key: str, credits: int, spendable: int, pool: str | None = None
    ) -> Refused:
        """A charge (or a reservation) the live grants cannot cover, its hook told."""
        self.hooks.emit(InsufficientCreditsEvent(organization_id, feature_key, credits, spendable))
        return Refused(Refusal.INSUFFICIENT, feature_key, credits, spendable, pool=pool)

    async def charge(
        self,
        organization_id: str,
        feature_key: str,
        user_id: str | None,
        *,
        units: Decimal,
        idempotency: Idempotency | None,
        hold: bool,
        request_method: str | None,
        request_path: str | None,
        checked: bool = False,
    ) -> Decision:
        """The one charge every path takes, decided by the database in one statement.

        ``checked``: the web path has already refused ids the ledger cannot hold (as 401s).
        A keyed charge whose key is taken charges nothing: Replayed, InFlight or KeyReused.
        """
        if not checked:
            check_org(organization_id)
            if user_id is not None and (not isinstance(user_id, str) or not is_storable_text(user_id)):
                raise ValueError(
                    f"user_id must be text without NUL characters or unpaired surrogates, got {user_id!r:.80}"
                )
        # A key no pricing row can have (NUL, a URL's junk) is answered without a query:
        # the database would fail on some of them, and that must not read as an outage.
        valid = isinstance(feature_key, str) and _valid_feature_key(feature_key)
        pricing = await self.pricing.cache.get(feature_key) if valid else None
        if pricing is None:
            return Refused(Refusal.FEATURE_NOT_FOUND, feature_key)
        if not pricing.is_active:
            return Refused(Refusal.FEATURE_INACTIVE, feature_key)
        credits = pricing.credits if units is ONE else cost_of(pricing.credits, units)
        # Clipped to their columns: a long URL must be charged, not mistaken for an outage.
        user_id = user_id[:USER_ID_MAX] if user_id else user_id
        request_path = storable(request_path[:REQUEST_PATH_MAX]) if request_path else request_path
        hold_until = self.holds.hold_until() if hold else None
        request = ChargeRequest(
            organization_id,
            credits,
            feature_key,
            user_id,
            request_method,
            request_path,
            hold_until,
            pool=pricing.pool,
            fallback=pricing.pool_fallback,
        )
        for attempt in range(2):
            if idempotency is None:
                charged = await self.store.charge(request)
                charge_id, spendable, capped = charged.charge_id, charged.spendable, charged.capped
            else:
                key, fingerprint, finish_now = idempotency
                now = utcnow()
                claim = KeyClaim(
                    key,
                    fingerprint,
                    now,
                    locked_until=hold_until or self.holds.hold_until(),
                    expires_at=now + timedelta(seconds=self.idempotency_ttl),
                    finish_now=finish_now,
                )
                outcome = await self.store.claim_and_charge(request, claim)
                if outcome.kind is ClaimKind.REPLAY:
                    return Replayed(outcome.stored or {})
                if outcome.kind is ClaimKind.RUNNING:
                    return InFlight(outcome.stored or {})
                if outcome.kind is ClaimKind.MISMATCH:
                    return KeyReused(outcome.stored or {})
                charge_id, spendable, capped = outcome.charge_id, outcome.spendable, outcome.capped
            # Short, maybe because a plan's new period began moments ago and no keeper has
            # granted it yet: grant it now and try once more (only a refusal pays for the look).
            if charge_id is not None or credits == 0 or capped is not None or attempt or self.renew is None:
                break
            if not await self.renew(organization_id):
                break
        if charge_id is None and credits > 0:
            if capped is not None:
                return Refused(Refusal.MEMBER_LIMIT, feature_key, credits, spendable, capped, pricing.pool)
            return self.refused(organization_id, feature_key, credits, spendable, pricing.pool)
        if charge_id is not None:
            if hold:
                self.holds.track(charge_id)
            self.charged(organization_id, feature_key, credits, spendable, charge_id, user_id, pool=pricing.pool)
        # charge_id None: a free feature for an organization without an account.
        return Charged(charge_id, credits, spendable, pricing.credits, pricing.pool)

    def charged(
        self,
        organization_id: str,
        feature_key: str,
        credits: int,
        balance: int,
        charge_id: int | None,
        user_id: str | None,
        *,
        overage: bool = False,
        pool: str | None = None,
    ) -> None:
        if self.metrics is not None:
            self.metrics.charged(feature_key, credits, overage=overage)
        if self.hooks.wants(ChargeEvent):
            self.hooks.emit(ChargeEvent(organization_id, feature_key, credits, balance, charge_id, user_id, overage))
        # A pool's lane is not the general balance the alerts and auto top-ups judge (a
        # falling-back charge may have moved it): they look themselves (None).
        if self.watch is not None:
            self.watch(organization_id, balance if pool is None else None, -credits)
        threshold = self.low_balance_threshold
        if threshold is not None and pool is None and crossed_below(threshold, balance, credits):
            self.hooks.emit(LowBalanceEvent(organization_id, balance, threshold, feature_key))

    # -- refunds --------------------------------------------------------------------------

    def refunded(self, result: RefundResult, charge_id: int, reason: str | None) -> None:
        self.holds.forget(charge_id)
        if result.refunded and self.metrics is not None:
            self.metrics.refunded(result.feature_key, result.credits_refunded)
        if result.refunded and result.organization_id is not None and self.watch is not None:
            # A pool's lane is not the general balance the watchers judge: they look themselves.
            balance = result.remaining_credits if result.pool is None else None
            self.watch(result.organization_id, balance, result.credits_refunded)
        if result.refunded and result.organization_id is not None:
            self.hooks.emit(
                RefundEvent(
                    result.organization_id,
                    result.feature_key,
                    result.credits_refunded,
                    result.remaining_credits,
                    charge_id,
                    result.refund_id,
                    reason,
                )
            )

    async def refund(self, charge_id: int, *, reason: str | None = None) -> RefundResult:
        result = await self.store.refund(charge_id, reason)
        self.refunded(result, charge_id, reason)
        return result

    async def refund_retrying(self, charge_id: int, *, reason: str | None, about: str) -> RefundResult | None:
        """A failed request's refund, retried while the database is away (4 tries over
        about a second by default); None when it still failed. Then the charge is a hold
        no process keeps alive: the sweeper gives it back after ``hold_timeout``."""
        delay = 0.05
        for attempt in range(1, self.refund_attempts + 1):
            try:
                result = await self.refund(charge_id, reason=reason)
                log.info("credit_guard: refunded charge %s (%s): %s", charge_id, about, reason)
                return result
            except StorageUnavailable:
                if attempt == self.refund_attempts:
                    self.holds.forget(charge_id)  # not this process's to keep alive any more
                    log.error(
                        "credit_guard: REFUND FAILED for charge %s (%s); the sweeper releases it after "
                        "hold_timeout, or run guard.refund_credits(%s)",
                        charge_id,
                        about,
                        charge_id,
                    )
                    return None
                await anyio.sleep(delay)
                delay *= 4
        return None

    async def release_key(self, organization_id: str, idempotency_key: str) -> None:
        """Free the key of a request that failed with nothing to refund (a free feature)."""
        try:
            await self.store.release_key(organization_id, idempotency_key)
        except StorageUnavailable:
            pass  # the key's lock runs out and it is reclaimed then

    # -- settlements ----------------------------------------------------------------------

    def keep_later(self, charge_id: int | None, completion: Completion | None) -> None:
        """Settle a hold as kept (and store a finished idempotent response) in the next batch."""
        self.holds.settle_later(charge_id, completion)

    def completion(self, organization_id: str, idempotency_key: str, stored: dict[str, object]) -> Completion:
        # The key's TTL runs from the answer, so a long request's key does not die young.
        expires_at = utcnow() + timedelta(seconds=self.idempotency_ttl)
        return Completion(organization_id, idempotency_key, expires_at=expires_at, **stored)  # type: ignore[arg-type]

    async def settle(
        self, charge_id: int, *, used_credits: int | None, max_overage_credits: int, reason: str | None
    ) -> tuple[int, int]:
        """``CreditGuard.settle_charge``: (refunded, overage charged)."""
        if used_credits is not None and (used_credits < 0 or max_overage_credits < 0):
            raise ValueError("used_credits and max_overage_credits must not be negative")
        self.holds.forget(charge_id)
        if used_credits is None:
            await self.store.settle_holds([charge_id])
            return 0, 0
        moved = await self.store.settle_usage(
            charge_id, used_credits, max_overage_credits, reason or "settled at reported usage"
        )
        self.usage_settled(charge_id, moved, None)
        return moved.refunded, moved.overage

    async def settle_usage(
        self, charge_id: int, *, charged: int, used: int, overage_share: float, reason: str, user_id: str | None
    ) -> UsageSettlement | None:
        """Settle a request's hold at its reported usage, now; None when the database could
        not be reached (the hold then goes to the batch and is kept at its reserve)."""
        max_overage_credits = math.floor(charged * overage_share)
        try:
            moved = await self.store.settle_usage(charge_id, used, max_overage_credits, reason)
        except StorageUnavailable:
            log.error(
                "credit_guard: could not settle charge %s at its usage (%s credits); it stays charged at %s",
                charge_id,
                used,
                charged,
            )
            return None
        self.usage_settled(charge_id, moved, user_id)
        if used > charged + moved.overage:
            log.warning(
                "credit_guard: charge %s used %s credits, %s reserved; %s beyond max_overage went unpaid",
                charge_id,
                used,
                charged,
                used - charged - moved.overage,
            )
        return moved

    def usage_settled(self, charge_id: int, moved: UsageSettlement, user_id: str | None) -> None:
        if moved.organization_id is None or moved.spendable is None:
            return
        if moved.refunded:
            if self.metrics is not None:
                self.metrics.refunded(moved.feature_key, moved.refunded)
            self.hooks.emit(
                RefundEvent(
                    moved.organization_id,
                    moved.feature_key,
                    moved.refunded,
                    moved.spendable,
                    charge_id,
                    moved.refund_id,
                    "unused reserve",
                )
            )
        if moved.overage:
            self.charged(
                moved.organization_id,
                moved.feature_key or "",
                moved.overage,
                moved.spendable,
                charge_id,
                user_id or moved.user_id,
                overage=True,
                pool=moved.pool,
            )

    # -- holds and reads ------------------------------------------------------------------

    # -- async jobs (``_reservations.py`` holds the rest) -------------------------------------

    async def hand_to_job(
        self, job_id: str, request: ChargeRequest, charge_id: int, *, unit_price: int, max_overage_credits: int
    ) -> Reservation:
        """A request's open hold becomes the reservation of the job it started: the hold's
        expiry becomes the reservation's, and this process stops keeping it alive."""
        reservation = await self.store.adopt_reservation(
            job_id, charge_id, request, unit_price=unit_price, max_overage_credits=max_overage_credits
        )
        self.holds.forget(charge_id)
        return reservation

    async def close_job(self, job_id: str, *, used: int | None, capture: bool) -> Reservation:
        """Capture (``used`` credits, None: all reserved) or release a job's reservation, once."""
        reason = f"job {job_id} {'captured' if capture else 'released'}"
        reservation, moved = await self.store.close_reservation(job_id, used=used, reason=reason, capture=capture)
        if isinstance(moved, RefundResult) and moved.refunded:
            self.refunded(moved, reservation.charge_id, reason)
        elif isinstance(moved, UsageSettlement):
            self.usage_settled(reservation.charge_id, moved, None)
        return reservation

    async def release_expired_holds(self, now: datetime | None) -> int:
        return await self.holds.sweep(now)

    async def open_holds(self, organization_id: str | None) -> list[int]:
        return await self.store.open_holds(organization_id)

    async def usage(
        self,
        *,
        group_by: UsageGroup,
        organization_id: str | None,
        feature_key: str | None,
        since: datetime | None,
        until: datetime | None,
        split_by: UsageGroup | None = None,
    ) -> list[UsageRow]:
        return await self.store.usage(
            group_by=group_by,
            organization_id=organization_id,
            feature_key=feature_key,
            since=since,
            until=until,
            split_by=split_by,
        )

    async def audit(self) -> list[AuditIssue]:
        return await self.store.audit()


def refusal_result(refused: Refused) -> DeductionResult:
    """A refusal as the Python API answers it."""
    insufficient = refused.reason in (Refusal.INSUFFICIENT, Refusal.MEMBER_LIMIT)
    return DeductionResult(
        success=False,
        remaining_credits=refused.available if insufficient else None,
        error=refused.message,
        required=refused.required if insufficient else None,
        error_code=refused.reason.value,
        pool=refused.pool,
    )


# -- checks of what arrives -------------------------------------------------------------------


def check_org(organization_id: object) -> None:
    if (
        not isinstance(organization_id, str)
        or not organization_id
        or len(organization_id) > ORGANIZATION_ID_MAX
        or not is_storable_text(organization_id)
    ):
        raise ValueError(
            f"organization_id must be a non-empty string of at most {ORGANIZATION_ID_MAX} characters,"
            f" without NUL characters or unpaired surrogates, got {organization_id!r:.80}"
        )


def check_key(idempotency_key: object) -> None:
    if idempotency_key is not None and (
        not isinstance(idempotency_key, str) or validate_key(idempotency_key.encode("utf-8")) != idempotency_key
    ):
        raise ValueError(f"idempotency_key must be 1 to 255 visible ASCII characters, got {idempotency_key!r:.80}")


def storable(text: str) -> str:
    """``text`` as the database can store it: a percent-decoded path may hold NUL or a lone
    surrogate, which must be charged and recorded (escaped), not mistaken for an outage."""
    if is_storable_text(text):
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


@functools.lru_cache(maxsize=4096)
def _valid_feature_key(feature_key: str) -> bool:
    """Whether a pricing row could have this key (routes use a handful: cached)."""
    return len(feature_key) <= FEATURE_KEY_MAX and FEATURE_KEY_RE.fullmatch(feature_key) is not None
