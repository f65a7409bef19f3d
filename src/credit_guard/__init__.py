"""credit_guard: pay-per-use credits in front of any ASGI app.

guard = CreditGuard("sqlite+aiosqlite:///credit_guard.db")

@app.post("/v1/images")
@requires_credits("seedream_text_to_image")
async def generate(...): ...
"""

from .asgi import CreditGuardMiddleware, Rule
from .decorator import requires_credits
from .endpoints import credit_endpoints
from .errors import (
    CreditGuardError,
    DuplicateFeature,
    IdempotencyKeyReused,
    InvalidPricing,
    PricingNotFound,
    StorageUnavailable,
)
from .events import ChargeEvent, InsufficientCreditsEvent, LowBalanceEvent, RefundEvent
from .guard import CreditGuard, Ticket, current_ticket
from .idempotency import IDEMPOTENCY_HEADER
from .models import AuditIssue, CreditCheck, DeductionResult, FeaturePricing, RefundResult, UsageRow
from .problems import (
    EXPOSE_HEADERS,
    HEADER_BODY_OMITTED,
    HEADER_CHARGED,
    HEADER_REFUNDED,
    HEADER_REMAINING,
    HEADER_REPLAYED,
    HEADER_REQUIRED,
    PROBLEM_CONTENT_TYPE,
    Problem,
)
from .schema import metadata

__all__ = [
    "EXPOSE_HEADERS",
    "HEADER_BODY_OMITTED",
    "HEADER_CHARGED",
    "HEADER_REFUNDED",
    "HEADER_REMAINING",
    "HEADER_REPLAYED",
    "HEADER_REQUIRED",
    "IDEMPOTENCY_HEADER",
    "PROBLEM_CONTENT_TYPE",
    "AuditIssue",
    "ChargeEvent",
    "CreditCheck",
    "CreditGuard",
    "CreditGuardError",
    "CreditGuardMiddleware",
    "DeductionResult",
    "DuplicateFeature",
    "FeaturePricing",
    "IdempotencyKeyReused",
    "InsufficientCreditsEvent",
    "InvalidPricing",
    "LowBalanceEvent",
    "PricingNotFound",
    "Problem",
    "RefundEvent",
    "RefundResult",
    "Rule",
    "StorageUnavailable",
    "Ticket",
    "UsageRow",
    "credit_endpoints",
    "current_ticket",
    "metadata",
    "requires_credits",
]
