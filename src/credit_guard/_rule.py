"""A paid route's options (``Rule``) and the ``requires_credits`` factory every adapter makes.

The options are checked here, once, whichever way they arrive (a decorator, a middleware
rule, a Litestar ``opt``), so a bad value fails when the route is declared.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._config import IdempotencyMode, check_idempotency, check_max_overage
from ._ratelimit import RATE_BY, RateBy, parse_rate
from ._units import UnitsOf, units_value
from .models import FEATURE_KEY_MAX, FEATURE_KEY_RE

if TYPE_CHECKING:
    from limits import RateLimitItem

    from ._guard import CreditGuard

OnDisconnect = Literal["refund", "charge_usage"]
ON_DISCONNECT: tuple[OnDisconnect, ...] = ("refund", "charge_usage")


@dataclass(frozen=True, slots=True)
class Rule:
    """A paid route's options, checked here once, whichever way they arrive (the
    decorator, a middleware rule, a Litestar ``opt``): a bad value fails when the route is
    declared, never on its first request.

    ``units``: how many of the price one request takes: a number, or a callable of the
    request (sync or async) returning one (seconds of video...); under the middleware it
    gets a Starlette ``HTTPConnection`` (the app has not read the body yet).
    ``idempotency``: True, "required" or False for this route (None: the guard's default).
    ``max_overage``: how far above its reserve reported usage may be charged, as a share
    (0 to 100). ``charge_client_errors``: keep the charge when the app answers 4xx (None:
    the guard's choice). ``rate``: at most this many requests (``"10/minute"``, slowapi's
    syntax, ``;`` between several), counted per organization or, with ``rate_by="member"``,
    per member (the request's user id); over it, 429 and nothing charged
    (``_ratelimit.py``). ``on_disconnect``: what a client that hangs up before the last
    byte pays: nothing (``"refund"``), or what the handler reported it had produced
    (``"charge_usage"``, for metered streams).
    """

    feature_key: str
    units: UnitsOf | int | float | Decimal | str | None = None
    idempotency: IdempotencyMode | None = None
    max_overage: float | None = None
    charge_client_errors: bool | None = None
    rate: str | None = None
    rate_by: RateBy = "organization"
    on_disconnect: OnDisconnect = "refund"
    #: ``rate`` parsed, once, when the rule is made.
    rates: tuple[RateLimitItem, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.feature_key
        if not isinstance(key, str):
            raise TypeError(f"the feature key must be a str, got {type(key).__name__}")
        if len(key) > FEATURE_KEY_MAX or not FEATURE_KEY_RE.fullmatch(key):
            raise ValueError(f"not a feature key (lowercase snake_case, at most {FEATURE_KEY_MAX}): {key!r:.80}")
        if self.units is not None and not callable(self.units):
            try:
                count = units_value(self.units)
            except ValueError as exc:
                raise ValueError(f"units must be a number or a callable of the request: {exc}") from None
            object.__setattr__(self, "units", _fixed_units(count))
        check_idempotency(self.idempotency, optional=True)
        if self.max_overage is not None:
            check_max_overage(self.max_overage)
        if self.charge_client_errors is not None and not isinstance(self.charge_client_errors, bool):
            raise TypeError(f"charge_client_errors must be a bool or None, got {self.charge_client_errors!r:.40}")
        if self.rate is not None:
            object.__setattr__(self, "rates", parse_rate(self.rate))
        if self.rate_by not in RATE_BY:
            raise ValueError(f"rate_by must be one of {', '.join(RATE_BY)}, got {self.rate_by!r:.40}")
        if self.on_disconnect not in ON_DISCONNECT:
            raise ValueError(f"on_disconnect must be one of {', '.join(ON_DISCONNECT)}, got {self.on_disconnect!r:.40}")

    def units_of(self) -> UnitsOf | None:
        """The units callable (a fixed number became one when the rule was made)."""
        return typing.cast("UnitsOf | None", self.units)


def _fixed_units(count: Decimal) -> UnitsOf:
    def units(request: Any) -> Decimal:
        return count

    return units


F = TypeVar("F", bound=Callable[..., Any])
Decorate = Callable[[Any, Rule, "CreditGuard | None"], Any]


class RequiresCredits:
    """``requires_credits``: one decorator factory, whichever framework applies the rule.

    Each framework adapter makes one with its own ``decorate(fn, rule, guard)``; the
    options, their checks (``Rule``) and their documentation are here once.
    """

    def __init__(self, decorate: Decorate) -> None:
        self._decorate = decorate

    def __call__(
        self,
        feature_key: str,
        *,
        guard: CreditGuard | None = None,
        units: UnitsOf | int | float | Decimal | str | None = None,
        idempotency: IdempotencyMode | None = None,
        max_overage: float | None = None,
        charge_client_errors: bool | None = None,
        rate: str | None = None,
        rate_by: RateBy = "organization",
        on_disconnect: OnDisconnect = "refund",
    ) -> Callable[[F], F]:
        """Charge ``feature_key``'s price before the handler runs; refund if it fails.

        The guard is ``guard=`` or ``request.app.state.credit_guard``. Put the decorator
        *below* the framework's route decorator (``@app.post(...)`` / ``@post(...)``).

        ``units``: a number, or a callable of the request returning how many units this
        call reserves (seconds of video...): the price is multiplied by it, rounded up, and
        charged before the handler runs; the handler may
        ``current_ticket(request).report_usage(n)``. ``idempotency``: honour
        ``Idempotency-Key`` here (True / "required"; None follows the guard).
        ``max_overage``: how far above the reserve reported usage may be charged.
        ``charge_client_errors``: keep the charge when the handler answers 4xx (None
        follows the guard, which refunds them by default). ``rate``: at most this many
        requests (``"10/minute"``) per organization, or per member with
        ``rate_by="member"``; over it, 429 with ``Retry-After``, nothing charged.
        ``on_disconnect="charge_usage"``: a client that hangs up mid-stream pays for what
        was reported produced (``report_usage``), not nothing. Bad values raise here.

        A request an outer guard already charged (a ``CreditGuardMiddleware`` rule, another
        decorator) is not charged again: the handler runs under that charge.
        """
        rule = Rule(feature_key, units, idempotency, max_overage, charge_client_errors, rate, rate_by, on_disconnect)

        def decorate(fn: F) -> F:
            return typing.cast(F, self._decorate(fn, rule, guard))

        return decorate
