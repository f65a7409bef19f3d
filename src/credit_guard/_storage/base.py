"""The storage interface the money services talk to, and the typed results it returns.

One ``Store`` protocol, implemented by the SQLAlchemy store (``sql.py``) for every
dialect; SQLite sends its writes through one writer thread per process (``sqlite.py``),
PostgreSQL overrides only its hot statements with asyncpg (``postgres.py``). Nothing
here knows a web framework, and nothing above it writes SQL.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from ..models import (
    AuditIssue,
    AutoTopup,
    BalancePoint,
    FeaturePricing,
    Grant,
    MemberLimit,
    Plan,
    RefundResult,
    Reservation,
    Subscription,
    UsageGroup,
    UsageRow,
)


@dataclass(frozen=True, slots=True)
class Lane:
    """The grants a charge may draw from: those of credit pool ``pool`` (None: the general
    pool), and general ones too once they are spent if ``fallback`` (``spending.in_lane``)."""

    pool: str | None = None
    fallback: bool = False

    def params(self) -> dict[str, Any]:
        """The ``:pool`` and ``:fallback`` parameters of the statements that judge a lane."""
        return {"pool": self.pool, "fallback": self.fallback}


#: The general pool's lane: every charge of a feature without a pool.
GENERAL = Lane()


def lane_for(pool: str | None, fallback: bool | None) -> Lane:
    """The lane of a charge of pool ``pool`` (a pricing row's, a ledger row's): a general
    charge has nothing to fall back to, whatever ``fallback`` says."""
    return Lane(pool, bool(fallback)) if pool is not None else GENERAL


@dataclass(slots=True)  # not frozen: built on every paid request, and frozen __init__ costs more
class ChargeRequest:
    """One charge to decide: ``credits`` taken only if the live grants cover them."""

    organization_id: str
    credits: int
    feature_key: str
    user_id: str | None = None
    request_method: str | None = None
    request_path: str | None = None
    #: The charge is a hold until then (the sweeper refunds it after, unless settled first).
    hold_until: datetime | None = None
    #: A surcharge: the charge whose reported usage went beyond its reserve (``extra_of``).
    extra_of: int | None = None
    reason: str | None = None
    #: The credit pool its feature draws from (None: general), and whether it may fall back
    #: to general grants (the pricing row's ``pool`` and ``pool_fallback``).
    pool: str | None = None
    fallback: bool = False

    @property
    def lane(self) -> Lane:
        return lane_for(self.pool, self.fallback)


@dataclass(frozen=True, slots=True)
class MemberCapHit:
    """A charge its member's cap refused, and the cap as it stood at the charge's turn:
    ``credits`` per ``per`` ('day', 'month' or None: in all), ``left`` of it this period."""

    member: str
    credits: int
    left: int
    per: str | None


@dataclass(frozen=True, slots=True)
class ChargeOutcome:
    """``charge_id`` is None when the live grants could not cover it. ``spendable``: what
    the organization can spend after the charge in the charge's lane (its pool, and general
    grants if it falls back to them), or, refused, what it could spend there at its turn
    (0 for an organization without an account). Never the book balance, which also
    counts expired credits not yet written off. ``capped``: refused by its member's cap
    (the organization had the credits)."""

    charge_id: int | None
    spendable: int
    capped: MemberCapHit | None = None


@dataclass(frozen=True, slots=True)
class KeyClaim:
    """An idempotency key to claim in the same transaction as its charge."""

    key: str
    fingerprint: str
    now: datetime
    #: A running key whose lock ran out belonged to a process that died: it may be taken over.
    locked_until: datetime
    expires_at: datetime
    #: Complete the key at once with the charge as its stored answer (the Python API).
    finish_now: bool = False


class ClaimKind(enum.Enum):
    #: The key is ours: charged (or free).
    CLAIMED = "claimed"
    #: The balance was short: nothing written, the key stays free.
    INSUFFICIENT = "insufficient"
    #: The key's request finished: answer with its stored response.
    REPLAY = "replay"
    #: The key's request is still running.
    RUNNING = "running"
    #: The key was used for another request.
    MISMATCH = "mismatch"


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """What claiming an idempotency key led to; ``stored`` is the key's row when it was taken;
    ``spendable`` as for ``ChargeOutcome``."""

    kind: ClaimKind
    charge_id: int | None = None
    spendable: int = 0
    stored: Mapping[str, Any] | None = None
    capped: MemberCapHit | None = None

    @classmethod
    def for_taken(cls, row: Mapping[Any, Any], fingerprint: str) -> ClaimOutcome:
        """What a key someone else holds means for this request."""
        stored = dict(row)
        if stored["fingerprint"] != fingerprint:
            return cls(ClaimKind.MISMATCH, stored=stored)
        return cls(ClaimKind.REPLAY if stored["state"] == "done" else ClaimKind.RUNNING, stored=stored)


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished idempotent request's response, stored for replays with its hold's settlement."""

    organization_id: str
    idempotency_key: str
    status_code: int
    response_headers: str
    response_body: bytes | None
    body_stored: bool
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ExpiredGrant:
    """A grant whose unspent credits an expiry row wrote off."""

    organization_id: str
    grant_id: int
    credits: int
    #: What the organization can spend once its expired grants are written off.
    spendable: int


class GrantStatus(enum.Enum):
    GRANTED = "granted"
    #: The idempotency key was used before: nothing was written this time.
    ALREADY_GRANTED = "already_granted"
    #: The grant would take the balance past ``MAX_BALANCE``: nothing was written.
    OVER_LIMIT = "over_limit"


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    """What a grant did; ``amount`` is what the key's grant gave (this call's or the first one's);
    ``spendable``: what the organization can spend after it."""

    status: GrantStatus
    spendable: int
    entry_id: int | None = None
    amount: int | None = None


@dataclass(frozen=True, slots=True)
class Issued:
    """One period granted: the allowance and the rollover that came with it (0: none)."""

    organization_id: str
    plan_key: str
    period: int
    period_start: datetime
    credits: int
    rollover: int
    expired: int


@dataclass(frozen=True, slots=True)
class UsageSettlement:
    """What settling a hold at its reported usage moved."""

    refunded: int = 0
    overage: int = 0
    spendable: int | None = None
    organization_id: str | None = None
    feature_key: str | None = None
    user_id: str | None = None
    refund_id: int | None = None
    #: The charge's credit pool (None: general); ``spendable`` is then its lane's.
    pool: str | None = None


class Store(Protocol):
    """Every read and write of credit_guard's tables. Writes are atomic, and each money
    decision is made by the database (a conditional statement), never by a value read
    into Python first. Connectivity failures raise ``StorageUnavailable``."""

    engine: AsyncEngine
    dialect: str

    async def create_schema(self) -> None: ...
    async def close(self) -> None: ...

    async def pricing_by_key(self, feature_key: str) -> FeaturePricing | None: ...
    async def pricing_by_id(self, pricing_id: str) -> FeaturePricing | None: ...
    async def list_pricing(
        self, *, category: str | None = None, is_active: bool | None = None
    ) -> list[FeaturePricing]: ...
    async def create_pricing(self, fields: Mapping[str, Any]) -> FeaturePricing: ...
    async def update_pricing(self, pricing_id: str, changes: Mapping[str, Any]) -> tuple[FeaturePricing, str]: ...
    async def delete_pricing(self, pricing_id: str) -> FeaturePricing | None: ...
    async def import_pricing(
        self, rows: Sequence[Mapping[str, Any]], *, update_existing: bool = False
    ) -> tuple[list[FeaturePricing], list[FeaturePricing]]: ...

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
    ) -> GrantOutcome: ...
    async def expire_grants(self, now: datetime) -> list[ExpiredGrant]: ...
    async def list_grants(self, organization_id: str, now: datetime) -> list[Grant]: ...
    async def set_overdraft(self, organization_id: str, limit: int) -> None: ...
    async def overdraft(self, organization_id: str) -> tuple[int, int]: ...
    async def reserve(
        self, request: ChargeRequest, job_id: str, *, unit_price: int, max_overage_credits: int
    ) -> tuple[Reservation | None, int, bool]: ...
    async def adopt_reservation(
        self, job_id: str, charge_id: int, request: ChargeRequest, *, unit_price: int, max_overage_credits: int
    ) -> Reservation: ...
    async def reservation(self, job_id: str) -> Reservation | None: ...
    async def organizations(self, prefix: str, limit: int) -> list[tuple[str, int]]: ...
    async def activity(self, organization_id: str, limit: int) -> tuple[list[dict[str, Any]], list[Reservation]]: ...
    async def close_reservation(
        self, job_id: str, *, used: int | None, reason: str, capture: bool = True
    ) -> tuple[Reservation, UsageSettlement | RefundResult | None]: ...
    async def charge(self, request: ChargeRequest) -> ChargeOutcome: ...
    async def claim_and_charge(self, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome: ...
    async def refund(
        self,
        charge_id: int,
        reason: str | None = None,
        *,
        credits: int | None = None,
        expired_before: datetime | None = None,
    ) -> RefundResult: ...
    async def settle_holds(self, charge_ids: Sequence[int], completions: Sequence[Completion] = ()) -> set[int]: ...
    async def settle_usage(
        self, charge_id: int, used: int, max_overage_credits: int, reason: str
    ) -> UsageSettlement: ...
    async def extend_holds(self, charge_ids: Sequence[int], until: datetime) -> set[int]: ...
    async def expired_holds(self, now: datetime, limit: int) -> list[int]: ...
    async def open_holds(self, organization_id: str | None = None) -> list[int]: ...
    async def release_key(self, organization_id: str, idempotency_key: str) -> None: ...
    async def delete_expired_keys(self, now: datetime) -> int: ...

    async def spendable(self, organization_id: str, lane: Lane | None = None) -> int: ...
    async def pool_balances(self, organization_id: str) -> dict[str | None, int]: ...
    async def audit(self) -> list[AuditIssue]: ...
    async def usage(
        self,
        *,
        group_by: UsageGroup = "day",
        organization_id: str | None = None,
        feature_key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        split_by: UsageGroup | None = None,
    ) -> list[UsageRow]: ...
    async def balance_history(
        self, organization_id: str, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[BalancePoint]: ...

    async def define_plan(self, plan: Plan, now: datetime) -> tuple[Plan, bool]: ...
    async def plan(self, plan_key: str) -> Plan | None: ...
    async def list_plans(self) -> list[tuple[Plan, int]]: ...
    async def delete_plan(self, plan_key: str) -> bool | None: ...
    async def subscription(self, organization_id: str) -> Subscription | None: ...
    async def subscribe(
        self, organization_id: str, plan_key: str, *, anchor: datetime | None, keep: bool, now: datetime
    ) -> tuple[Subscription, list[Issued]] | None: ...
    async def unsubscribe(self, organization_id: str, *, keep: bool, now: datetime) -> Subscription | None: ...
    async def renew_if_due(self, organization_id: str, now: datetime) -> list[Issued]: ...
    async def renew_due(self, now: datetime, limit: int = 500) -> list[Issued]: ...

    notify: bool

    async def claim_events(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> list[tuple[int, str, str, int]]: ...
    async def event_delivered(self, row_id: int, now: datetime) -> None: ...
    async def event_failed(self, row_id: int, retry_at: datetime | None, error: str) -> None: ...
    async def watch_balance(self, organization_id: str, low: int, now: datetime, falling: bool) -> str | None: ...

    async def set_topup(self, organization_id: str, below: int, credits: int, now: datetime) -> AutoTopup: ...
    async def topup(self, organization_id: str) -> AutoTopup | None: ...
    async def remove_topup(self, organization_id: str) -> bool: ...
    async def topup_lines(self) -> dict[str, int]: ...
    async def claim_topup(
        self, organization_id: str, now: datetime, lease_until: datetime
    ) -> tuple[int, int, str] | None: ...
    async def finish_topup(
        self, organization_id: str, crossing: int, result: str | None, error: str | None, now: datetime
    ) -> None: ...

    async def set_member_limit(
        self, organization_id: str, member: str, credits: int, per: str | None, now: datetime
    ) -> MemberLimit: ...
    async def remove_member_limit(self, organization_id: str, member: str, now: datetime) -> bool: ...
    async def member_limits(
        self, organization_id: str, now: datetime, member: str | None = None
    ) -> list[MemberLimit]: ...
