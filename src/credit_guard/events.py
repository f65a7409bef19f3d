"""Events the guard reports to the app's hooks (``guard.on_charge`` and friends).

They are plain frozen dataclasses; ``_hooks.py`` delivers them off the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar


@dataclass(frozen=True, slots=True)
class ChargeEvent:
    """Credits were taken (``overage`` when usage beyond the reserve was charged after the fact)."""

    organization_id: str
    feature_key: str
    credits: int
    balance: int
    charge_id: int | None
    user_id: str | None = None
    overage: bool = False

    @property
    def surcharge(self) -> bool:
        """The old name of ``overage`` (kept working)."""
        return self.overage


@dataclass(frozen=True, slots=True)
class RefundEvent:
    """Credits went back: a failed request, an expired hold, or the unused part of a reserve."""

    organization_id: str
    feature_key: str | None
    credits: int
    balance: int | None
    charge_id: int
    refund_id: int | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class InsufficientCreditsEvent:
    """A request was refused with 402."""

    organization_id: str
    feature_key: str
    required: int
    available: int


@dataclass(frozen=True, slots=True)
class LowBalanceEvent:
    """A charge (or an expiry: ``feature_key`` None) took the balance from at or above
    ``threshold`` to below it.

    Fired by the one charge that crossed the line (its balance before and after come from
    the same atomic statement), so once per crossing even across processes; a top-up
    above the threshold re-arms it.
    """

    organization_id: str
    balance: int
    threshold: int
    feature_key: str | None


@dataclass(frozen=True, slots=True)
class GrantExpiredEvent:
    """A grant expired with ``credits`` unspent; they were written off (an expiry row)."""

    organization_id: str
    grant_id: int
    credits: int
    balance: int


@dataclass(frozen=True, slots=True)
class AllowanceIssuedEvent:
    """A subscription's period began: its plan's ``credits`` were granted, with
    ``rollover`` credits carried from the period before (``expired``: what did not carry)."""

    organization_id: str
    plan_key: str
    period: int
    period_start: datetime
    credits: int
    rollover: int
    expired: int


Event = (
    ChargeEvent | RefundEvent | InsufficientCreditsEvent | LowBalanceEvent | GrantExpiredEvent | AllowanceIssuedEvent
)
Hook = Callable[[Any], Awaitable[None]]
H = TypeVar("H", bound=Hook)


def crossed_below(threshold: int | None, balance_after: int, credits: int) -> bool:
    """Whether a charge of ``credits`` leaving ``balance_after`` crossed ``threshold`` downwards."""
    return threshold is not None and credits > 0 and balance_after < threshold <= balance_after + credits
