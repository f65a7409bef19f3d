"""``requires_credits``: one decorator for Starlette, FastAPI and Litestar handlers.

It tells the frameworks apart by the handler's annotations, else its module's imports,
and hands the handler to ``credit_guard.contrib.starlette`` or ``credit_guard.contrib.litestar``
(import from there to be explicit). A module that imports both frameworks and whose
handler says nothing is refused, not guessed at.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ._config import IdempotencyMode
from ._flow import Rule
from ._guard import CreditGuard
from ._units import UnitsOf
from .contrib.starlette import decorate_starlette, type_hints

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
    """Charge ``feature_key``'s price before the handler runs; refund if it fails.

    The guard is ``guard=`` or ``request.app.state.credit_guard``. Put the decorator
    *below* the framework's route decorator (``@app.post(...)`` / ``@post(...)``).

    ``units``: a callable of the request returning how many units this call reserves
    (seconds of video...): the price is multiplied by it, rounded up, and charged before
    the handler runs; the handler may ``current_ticket(request).report_usage(n)``.
    ``idempotency``: honour ``Idempotency-Key`` here (True / "required"; None follows
    the guard). ``max_overage``: how far above the reserve reported usage may be charged.
    ``charge_client_errors``: keep the charge when the handler answers 4xx (None follows
    the guard, which refunds them by default).

    A request an outer guard already charged (a ``CreditGuardMiddleware`` rule, another
    decorator) is not charged again: the handler runs under that charge.
    """
    rule = Rule(
        feature_key,
        units=units,
        idempotency=idempotency,
        max_overage=max_overage,
        charge_client_errors=charge_client_errors,
    )

    def decorate(fn: F) -> F:
        if _is_litestar(fn):
            from .contrib.litestar import decorate_litestar

            return decorate_litestar(fn, rule, guard)
        return decorate_starlette(fn, rule, guard)

    return decorate


def _from_litestar(obj: Any) -> bool:
    return isinstance(getattr(obj, "__module__", None), str) and obj.__module__.split(".")[0] == "litestar"


def _is_litestar(fn: Callable[..., Any]) -> bool:
    """Tell a Litestar handler from a Starlette/FastAPI one: by its annotations, else its module.

    A module that imports both frameworks and whose handler's annotations do not tell is
    refused with a clear error rather than guessed at.
    """
    if "litestar" not in sys.modules:
        return False
    if _from_litestar(type(fn)):
        raise TypeError("put @requires_credits below Litestar's route decorator (@post(...)), not above it")
    hints = type_hints(fn).values()
    if any(_from_litestar(hint) for hint in hints):
        return True
    if any(_from_starlette(hint) for hint in hints):
        return False
    module = sys.modules.get(fn.__module__)
    names = list(vars(module).values()) if module is not None else []
    uses_litestar = any(_from_litestar(value) for value in names)
    if uses_litestar and any(_from_starlette(value) for value in names):
        raise TypeError(
            f"cannot tell whether {fn.__qualname__} is a Litestar or a Starlette/FastAPI handler (its module "
            "imports both): import requires_credits from credit_guard.contrib.litestar or credit_guard.contrib.starlette"
        )
    return uses_litestar


def _from_starlette(obj: Any) -> bool:
    module = getattr(obj, "__module__", None)
    return isinstance(module, str) and module.split(".")[0] in ("starlette", "fastapi")
