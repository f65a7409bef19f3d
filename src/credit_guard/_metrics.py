"""The seam metrics plug into: what the request flow and the services report as it happens.

Off by default, and then free: each place that reports holds a ``metrics`` attribute that is
None, and pays one ``is not None`` check (no clock read, no call, no event built). An
implementation (``credit_guard.contrib.opentelemetry``, the only module that imports
OpenTelemetry) is plugged in by ``instrument(guard)``; its methods run on the request path,
so they must be quick and must never raise or wait (counter increments are).

Attributes stay few: a feature key (routes and pricing rows, a handful) and small fixed
sets of outcomes; never an organization, a user or a charge id.
"""

from __future__ import annotations

from typing import Literal, Protocol

from ._decisions import Charged, Decision, InFlight, KeyReused, Refused, Replayed

#: How a request's charge was decided (``Metrics.decided``). ``insufficient_credits`` is a
#: 402, ``member_limit_reached`` a 402 of a member's cap; ``unavailable`` a 503 (the database could not be reached, fail closed);
#: ``served_free`` the same outage under ``fail_open``; ``replayed`` an idempotent retry
#: answered from its first response; ``idempotency_conflict`` a 409 or 422 for a key in use;
#: ``rate_limited`` a 429 (the route's ``rate``), decided before any charge.
Outcome = Literal[
    "charged",
    "insufficient_credits",
    "member_limit_reached",
    "unavailable",
    "served_free",
    "feature_not_found",
    "feature_inactive",
    "replayed",
    "idempotency_conflict",
    "rate_limited",
]


class Metrics(Protocol):
    """What credit_guard reports. Called on the event loop, on the request path: be quick."""

    def charged(self, feature_key: str, credits: int, *, overage: bool) -> None:
        """Credits were taken: a new charge (a request's, ``deduct_credits``, a reservation),
        or, with ``overage``, usage beyond a charge's reserve taken when it was settled."""

    def refunded(self, feature_key: str | None, credits: int) -> None:
        """Credits went back: a failed request, an expired hold, a released job or the
        unused part of a reserve."""

    def decided(self, feature_key: str, outcome: Outcome, seconds: float) -> None:
        """A paid request's charge was decided (pricing lookup and charge statement) in ``seconds``."""

    def swept(self, released: int) -> None:
        """The sweeper released ``released`` expired holds (a dead process's, an expired job's)."""

    def priced(self, hit: bool) -> None:
        """A price was looked up: found in the cache (``hit``) or loaded from the database."""


def outcome_of(decision: Decision) -> Outcome:
    """The outcome of a charge the ledger decided (an outage raises instead)."""
    match decision:
        case Charged():
            return "charged"
        case Refused():
            return decision.reason.value
        case Replayed():
            return "replayed"
        case InFlight() | KeyReused():
            return "idempotency_conflict"
