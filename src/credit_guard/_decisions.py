"""What a charge decided: one closed type, matched once by each caller.

``Ledger.charge`` answers every charge (the Python API's, a request's) with exactly one of
these; the Python API turns it into a ``DeductionResult``, the request flow into a ticket,
a problem or a replay, the metrics into an outcome label. Nothing decodes a tuple of
(result, claim) three ways any more, and a new outcome is a new class the type checker
makes every caller handle.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._storage.base import MemberCapHit


@dataclass(frozen=True, slots=True)
class Charged:
    """The credits were taken (a hold when the caller asked for one)."""

    #: None only for a free feature and an organization without an account: nothing taken.
    charge_id: int | None
    credits: int
    #: What the organization can spend after the charge, in the feature's lane (its credit
    #: pool, and general credits if the pool falls back to them).
    spendable: int
    #: The price of one unit (``credits`` is it times the units, rounded up).
    unit_price: int
    #: The credit pool the feature draws from (None: general).
    pool: str | None = None


class Refusal(enum.Enum):
    """Why a charge was refused (the values are ``DeductionResult.error_code``'s)."""

    INSUFFICIENT = "insufficient_credits"
    #: The organization had the credits; the member's cap for the period did not.
    MEMBER_LIMIT = "member_limit_reached"
    FEATURE_NOT_FOUND = "feature_not_found"
    FEATURE_INACTIVE = "feature_inactive"


@dataclass(frozen=True, slots=True)
class Refused:
    """Nothing was taken, and nothing was claimed (a key stays free for the retry)."""

    reason: Refusal
    feature_key: str
    #: What the charge would have cost, and what the organization could spend at its turn
    #: (both 0 unless the reason is INSUFFICIENT).
    required: int = 0
    available: int = 0
    #: MEMBER_LIMIT: the cap that refused it, as it stood at the charge's turn.
    capped: MemberCapHit | None = None
    #: The credit pool the feature draws from (None: general): ``available`` is its lane's.
    pool: str | None = None

    @property
    def message(self) -> str:
        if self.reason is Refusal.INSUFFICIENT:
            where = "" if self.pool is None else f" in pool {self.pool!r}"
            return f"Insufficient credits{where}. Required: {self.required}, Available: {self.available}"
        if self.reason is Refusal.MEMBER_LIMIT and self.capped is not None:
            cap = self.capped
            return (
                f"Member limit reached: {cap.member!r} may spend {cap.credits} credits {_per(cap.per)};"
                f" {cap.left} left, this costs {self.required}"
            )
        if self.reason is Refusal.FEATURE_INACTIVE:
            return f"Feature is inactive: {self.feature_key}"
        return f"Feature pricing not found: {self.feature_key}"


def _per(per: str | None) -> str:
    return "in all" if per is None else f"a {per}"


@dataclass(frozen=True, slots=True)
class Replayed:
    """The idempotency key's request finished: answer with its stored response (its row)."""

    stored: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class InFlight:
    """The idempotency key's request is still running (its row)."""

    stored: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class KeyReused:
    """The idempotency key was used for another request (its row): nothing was charged."""

    stored: Mapping[str, Any]


#: Every way a charge ends.
Decision = Charged | Refused | Replayed | InFlight | KeyReused
