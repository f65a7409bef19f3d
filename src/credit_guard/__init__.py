"""credit_guard: pay-per-use credits in front of any ASGI app.

    guard = CreditGuard("sqlite+aiosqlite:///credit_guard.db")

    @app.post("/v1/images")
    @requires_credits("seedream_text_to_image")
    async def generate(...): ...

The public face, nothing defined here. Result and record types are in
``credit_guard.models``, hook events in ``credit_guard.events``, problem types in
``credit_guard.problems``, the tables in ``credit_guard.schema``; framework adapters in
``credit_guard.contrib``, the operator's app in ``credit_guard.admin``, the client side in
``credit_guard.client``. Every other module is private (``_name.py``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from ._decorator import requires_credits
from ._endpoints import credit_endpoints
from ._flow import Rule
from ._guard import CreditGuard
from ._ticket import Ticket, current_ticket
from .errors import (
    CreditGuardError,
    DuplicateFeature,
    IdempotencyKeyReused,
    InvalidPricing,
    PricingNotFound,
    SchemaMissing,
    StorageUnavailable,
)
from .middleware import CreditGuardMiddleware
from .problems import EXPOSE_HEADERS, Headers, Problem
from .schema import metadata

__all__ = [
    "EXPOSE_HEADERS",
    "CreditGuard",
    "CreditGuardError",
    "CreditGuardMiddleware",
    "DuplicateFeature",
    "Headers",
    "IdempotencyKeyReused",
    "InvalidPricing",
    "PricingNotFound",
    "Problem",
    "Rule",
    "SchemaMissing",
    "StorageUnavailable",
    "Ticket",
    "credit_endpoints",
    "current_ticket",
    "metadata",
    "requires_credits",
]

#: Names earlier versions exported from here, and where they live now. They keep working,
#: with a DeprecationWarning that says where to import them from.
_MOVED = {
    "HEADER_BODY_OMITTED": ("credit_guard.problems", "Headers.BODY_OMITTED"),
    "HEADER_CHARGED": ("credit_guard.problems", "Headers.CHARGED"),
    "HEADER_REFUNDED": ("credit_guard.problems", "Headers.REFUNDED"),
    "HEADER_REMAINING": ("credit_guard.problems", "Headers.REMAINING"),
    "HEADER_REPLAYED": ("credit_guard.problems", "Headers.REPLAYED"),
    "HEADER_REQUIRED": ("credit_guard.problems", "Headers.REQUIRED"),
    "IDEMPOTENCY_HEADER": ("credit_guard.problems", "Headers.IDEMPOTENCY_KEY"),
    "PROBLEM_CONTENT_TYPE": ("credit_guard.problems", "PROBLEM_CONTENT_TYPE"),
    "AuditIssue": ("credit_guard.models", "AuditIssue"),
    "CreditCheck": ("credit_guard.models", "CreditCheck"),
    "DeductionResult": ("credit_guard.models", "DeductionResult"),
    "FeaturePricing": ("credit_guard.models", "FeaturePricing"),
    "RefundResult": ("credit_guard.models", "RefundResult"),
    "UsageRow": ("credit_guard.models", "UsageRow"),
    "ChargeEvent": ("credit_guard.events", "ChargeEvent"),
    "InsufficientCreditsEvent": ("credit_guard.events", "InsufficientCreditsEvent"),
    "LowBalanceEvent": ("credit_guard.events", "LowBalanceEvent"),
    "RefundEvent": ("credit_guard.events", "RefundEvent"),
}


def __getattr__(name: str) -> Any:
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module 'credit_guard' has no attribute {name!r}")
    module_name, path = moved
    warnings.warn(f"credit_guard.{name} moved: use {module_name}.{path}", DeprecationWarning, stacklevel=2)
    value: Any = importlib.import_module(module_name)
    for part in path.split("."):
        value = getattr(value, part)
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_MOVED])
