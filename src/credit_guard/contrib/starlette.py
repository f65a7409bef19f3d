"""``requires_credits`` for Starlette and FastAPI handlers, without framework detection.

Use it where a module imports both Litestar and Starlette/FastAPI and the top-level
``credit_guard.requires_credits`` cannot tell which one a handler belongs to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..asgi import Rule
from ..decorator import decorate_starlette
from ..guard import CreditGuard, IdempotencyMode, UnitsOf

F = TypeVar("F", bound=Callable[..., Any])


def requires_credits(
    feature_key: str,
    *,
    guard: CreditGuard | None = None,
    units: UnitsOf | None = None,
    idempotency: IdempotencyMode | None = None,
    max_overage: float | None = None,
    charge_client_errors: bool | None = None,
) -> Callable[[F], F]:
    """Charge ``feature_key``'s price before a Starlette/FastAPI handler runs; refund if it fails.

    Options as for ``credit_guard.requires_credits``.
    """
    rule = Rule(
        feature_key,
        units=units,
        idempotency=idempotency,
        max_overage=max_overage,
        charge_client_errors=charge_client_errors,
    )

    def decorate(fn: F) -> F:
        return decorate_starlette(fn, rule, guard)

    return decorate
