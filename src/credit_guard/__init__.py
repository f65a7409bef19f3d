"""credit_guard: pay-per-use credits in front of any ASGI app.

guard = CreditGuard("sqlite+aiosqlite:///credit_guard.db")

@app.post("/v1/images")
@requires_credits("seedream_text_to_image")
async def generate(...): ...
"""

from .asgi import CreditGuardMiddleware
from .decorator import requires_credits
from .endpoints import credit_endpoints
from .errors import CreditGuardError, DuplicateFeature, InvalidPricing, PricingNotFound, StorageUnavailable
from .guard import CreditGuard, Ticket
from .models import AuditIssue, CreditCheck, DeductionResult, FeaturePricing, RefundResult, UsageRow
from .problems import (
    EXPOSE_HEADERS,
    HEADER_CHARGED,
    HEADER_REFUNDED,
    HEADER_REMAINING,
    HEADER_REQUIRED,
    PROBLEM_CONTENT_TYPE,
    Problem,
)
from .schema import metadata

__all__ = [
    "EXPOSE_HEADERS",
    "HEADER_CHARGED",
    "HEADER_REFUNDED",
    "HEADER_REMAINING",
    "HEADER_REQUIRED",
    "PROBLEM_CONTENT_TYPE",
    "AuditIssue",
    "CreditCheck",
    "CreditGuard",
    "CreditGuardError",
    "CreditGuardMiddleware",
    "DeductionResult",
    "DuplicateFeature",
    "FeaturePricing",
    "InvalidPricing",
    "PricingNotFound",
    "Problem",
    "RefundResult",
    "StorageUnavailable",
    "Ticket",
    "UsageRow",
    "credit_endpoints",
    "metadata",
    "requires_credits",
]
