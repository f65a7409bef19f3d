"""OpenAPI for Litestar routes that cost credits, added by ``CreditGuardPlugin``.

Litestar builds each operation with the handler's ``operation_class``; the plugin gives a
paid handler a subclass of it whose ``to_schema()`` merges the same fragments FastAPI's
``document_credits`` adds (``credit_guard._openapi``): the problem responses, the
``X-Credits-*`` headers, ``Idempotency-Key`` where honoured and ``x-credit-guard``. The
problem schema is written inline here, since an operation cannot reach the document's
components.
"""

from __future__ import annotations

from typing import Any

from litestar.openapi.spec import Operation

from .._flow import Rule
from .._guard import CreditGuard
from .._openapi import document_operation


def credit_operation(base: type[Operation], rule: Rule, guard: CreditGuard | None) -> type[Operation]:
    """``base`` (the handler's operation class), documenting what ``rule`` charges."""
    if getattr(base, "credit_rule", None) is not None:
        base = base.__mro__[1]  # documented already (a handler registered twice): replace, not stack

    def to_schema(self: Operation) -> dict[str, Any]:
        schema = base.to_schema(self)
        document_operation(None, schema, rule, guard, None)
        return schema

    return type(f"Credit{base.__name__}", (base,), {"to_schema": to_schema, "credit_rule": rule})


__all__ = ["credit_operation"]
