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

from ._guard import CreditGuard
from ._rule import RequiresCredits, Rule
from .contrib.starlette import decorate_starlette, type_hints

F = TypeVar("F", bound=Callable[..., Any])


def _decorate(fn: Any, rule: Rule, guard: CreditGuard | None) -> Any:
    if _is_litestar(fn):
        from .contrib.litestar import decorate_litestar

        return decorate_litestar(fn, rule, guard)
    return decorate_starlette(fn, rule, guard)


#: ``@requires_credits(feature_key, ...)`` for Starlette, FastAPI and Litestar handlers alike.
requires_credits = RequiresCredits(_decorate)


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
