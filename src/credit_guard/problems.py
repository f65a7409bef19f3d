"""Header names, problem types and the problem+json bodies (RFC 9457), in one place.

Everything a client can see from credit_guard is defined here, so the middleware, the
decorator, the framework adapters and the README cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send


class Headers:
    """Every header credit_guard reads or writes, by role (one place for each name)."""

    CHARGED: Final = "X-Credits-Charged"
    REMAINING: Final = "X-Credits-Remaining"
    REFUNDED: Final = "X-Credits-Refunded"
    REQUIRED: Final = "X-Credits-Required"
    #: The credit pool a feature draws from, when it is not the general one: then
    #: ``X-Credits-Remaining`` is what that feature can spend (its pool, and general
    #: credits if the pool falls back to them).
    POOL: Final = "X-Credits-Pool"
    #: Set on an idempotent replay, and when its body was too large to keep.
    REPLAYED: Final = "Idempotent-Replayed"
    BODY_OMITTED: Final = "Idempotent-Body-Omitted"
    #: The request header a client retries with (the IETF httpapi draft).
    IDEMPOTENCY_KEY: Final = "Idempotency-Key"
    RETRY_AFTER: Final = "Retry-After"
    #: On a 429 (the IETF httpapi RateLimit header fields draft): the limit, what is left
    #: of it (0), seconds until the window lets a request in, and the policy (``10;w=60``).
    RATELIMIT_LIMIT: Final = "RateLimit-Limit"
    RATELIMIT_REMAINING: Final = "RateLimit-Remaining"
    RATELIMIT_RESET: Final = "RateLimit-Reset"
    RATELIMIT_POLICY: Final = "RateLimit-Policy"
    #: What browsers must be allowed to read: pass to CORSMiddleware(expose_headers=...).
    EXPOSE: Final = (
        REMAINING,
        CHARGED,
        REFUNDED,
        REQUIRED,
        POOL,
        REPLAYED,
        BODY_OMITTED,
        RETRY_AFTER,
        RATELIMIT_LIMIT,
        RATELIMIT_REMAINING,
        RATELIMIT_RESET,
        RATELIMIT_POLICY,
    )


# The module-level names earlier versions exported, kept as aliases of the one place above.
HEADER_REMAINING = Headers.REMAINING
HEADER_CHARGED = Headers.CHARGED
HEADER_REFUNDED = Headers.REFUNDED
HEADER_REQUIRED = Headers.REQUIRED
HEADER_REPLAYED = Headers.REPLAYED
HEADER_BODY_OMITTED = Headers.BODY_OMITTED
EXPOSE_HEADERS = Headers.EXPOSE

PROBLEM_CONTENT_TYPE = "application/problem+json"
_TYPE_BASE = "urn:credit-guard:problem:"
TYPE_INSUFFICIENT = _TYPE_BASE + "insufficient-credits"
TYPE_NO_ORGANIZATION = _TYPE_BASE + "no-organization"
TYPE_FEATURE_NOT_FOUND = _TYPE_BASE + "feature-not-found"
TYPE_FEATURE_INACTIVE = _TYPE_BASE + "feature-inactive"
TYPE_UNAVAILABLE = _TYPE_BASE + "credits-unavailable"
TYPE_INVALID_REQUEST = _TYPE_BASE + "invalid-request"
TYPE_NOT_AUTHENTICATED = _TYPE_BASE + "not-authenticated"
TYPE_ADMIN_REQUIRED = _TYPE_BASE + "admin-required"
TYPE_PRICING_NOT_FOUND = _TYPE_BASE + "pricing-not-found"
TYPE_DUPLICATE_FEATURE = _TYPE_BASE + "duplicate-feature"
TYPE_IDEMPOTENCY_CONFLICT = _TYPE_BASE + "idempotency-key-in-use"
TYPE_IDEMPOTENCY_MISMATCH = _TYPE_BASE + "idempotency-key-reused"
TYPE_NOT_STARTED = _TYPE_BASE + "guard-not-started"
TYPE_CHARGE_REFUSED = _TYPE_BASE + "charge-refused-by-database"
TYPE_SCHEMA_MISSING = _TYPE_BASE + "schema-missing"
TYPE_RATE_LIMITED = _TYPE_BASE + "rate-limited"
TYPE_MEMBER_LIMIT = _TYPE_BASE + "member-limit-reached"


@dataclass(frozen=True, slots=True)
class Problem:
    """A refusal the guard answers with instead of running the handler."""

    status: int
    type: str
    title: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail, **self.extra}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()

    def raw_headers(self, content_length: int) -> list[tuple[bytes, bytes]]:
        raw = [
            (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
            (b"content-length", str(content_length).encode()),
        ]
        raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.items()]
        return raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A problem is its own ASGI response: every adapter sends it this one way."""
        body = self.body_bytes()
        await send({"type": "http.response.start", "status": self.status, "headers": self.raw_headers(len(body))})
        await send({"type": "http.response.body", "body": body})


def insufficient_credits(feature_key: str, required: int, available: int, *, pool: str | None = None) -> Problem:
    """The organization cannot cover the charge. For a feature of a credit pool, the body's
    ``pool`` and ``X-Credits-Pool`` name it and ``available`` is what the feature can spend."""
    extra: dict[str, Any] = {"feature": feature_key, "required": required, "available": available}
    headers = {Headers.REQUIRED: str(required), Headers.REMAINING: str(available)}
    of = ""
    if pool is not None:
        extra["pool"], headers[Headers.POOL], of = pool, pool, f" of pool {pool!r}"
    return Problem(
        status=402,
        type=TYPE_INSUFFICIENT,
        title="Insufficient credits",
        detail=f"{feature_key!r} costs {required} credits{of}; the organization has {available}.",
        extra=extra,
        headers=headers,
    )


def member_limit(
    feature_key: str, *, required: int, member: str, cap: int, left: int, per: str | None, resets_at: str | None
) -> Problem:
    """A charge the member's cap refused (the organization had the credits): 402, saying
    which limit, the cap, what is left of it and when it starts again (None: never)."""
    period = "in all" if per is None else f"a {per}"
    again = "" if resets_at is None else f" It resets at {resets_at}."
    return Problem(
        status=402,
        type=TYPE_MEMBER_LIMIT,
        title="Member limit reached",
        detail=(
            f"{feature_key!r} costs {required} credits; this member may spend {cap} {period} and has {left} left."
            f"{again} Nothing was charged."
        ),
        extra={
            "feature": feature_key,
            "limit": "member",
            "member": member,
            "required": required,
            "cap": cap,
            "per": per,
            "available": left,
            "resets_at": resets_at,
        },
        headers={Headers.REQUIRED: str(required), Headers.REMAINING: str(left)},
    )


def rate_limited(feature_key: str, *, amount: int, window: int, per: str, rate: str, retry_after: int) -> Problem:
    """A request over its route's rate: 429, nothing charged. ``per`` is "organization"
    or "member"; ``rate`` the limit as ``limits`` says it ("10 per 1 minute")."""
    return Problem(
        status=429,
        type=TYPE_RATE_LIMITED,
        title="Too many requests",
        detail=f"{feature_key!r} allows {rate} per {per}; nothing was charged. Retry in {retry_after} s.",
        extra={
            "feature": feature_key,
            "limit": "rate",
            "allowed": amount,
            "window": window,
            "per": per,
            "retry_after": retry_after,
        },
        headers={
            Headers.RETRY_AFTER: str(retry_after),
            Headers.RATELIMIT_LIMIT: str(amount),
            Headers.RATELIMIT_REMAINING: "0",
            Headers.RATELIMIT_RESET: str(retry_after),
            Headers.RATELIMIT_POLICY: f"{amount};w={window}",
        },
    )


def rate_limit_unavailable(retry_after: int) -> Problem:
    """The rate limit storage (Redis) did not answer: 503, as for the database."""
    return Problem(
        status=503,
        type=TYPE_UNAVAILABLE,
        title="Credits unavailable",
        detail="The rate limit storage cannot be reached right now; nothing was charged. Retry later.",
        headers={Headers.RETRY_AFTER: str(retry_after)},
    )


def no_organization(detail: str | None = None) -> Problem:
    return Problem(
        status=401,
        type=TYPE_NO_ORGANIZATION,
        title="No organization",
        detail=detail or "This route is paid for in credits, and the request is not signed in to an organization.",
    )


def feature_not_found(feature_key: str) -> Problem:
    # A guarded route whose key has no pricing is a server misconfiguration, not the
    # client's fault: 500 alerts the operator, and nothing was charged.
    return Problem(
        status=500,
        type=TYPE_FEATURE_NOT_FOUND,
        title="Feature not priced",
        detail=f"No pricing exists for feature {feature_key!r}; nothing was charged.",
        extra={"feature": feature_key},
    )


def not_started(detail: str | None = None) -> Problem:
    """The app serves a paid route without a running guard (no lifespan): a wiring mistake
    the operator must fix, so 500, and nothing was charged: a charge it could not settle
    would be lost or refunded behind a delivered response."""
    return Problem(
        status=500,
        type=TYPE_NOT_STARTED,
        title="Credit guard not started",
        detail=detail
        or (
            "This route is paid for in credits, but the app's CreditGuard is not running on this event loop,"
            " so nothing was charged and the handler did not run. Start it in the app's lifespan"
            " (`await guard.start()`, or `async with guard:`); in tests, use `with TestClient(app) as client:`"
            " (an httpx ASGITransport runs no lifespan: start the guard in the test, `async with guard:`)."
        ),
    )


def charge_refused() -> Problem:
    """The database refused the charge's write (a constraint): a bug, not an outage, so the
    request is neither served nor charged, whatever ``fail_open`` says."""
    return Problem(
        status=500,
        type=TYPE_CHARGE_REFUSED,
        title="Charge refused by the database",
        detail=(
            "The database refused to record this request's charge (one of the constraints that keep the"
            " credits exact). Nothing was charged and the handler did not run; the server's log says why."
        ),
    )


def schema_missing(retry_after: int, *, nothing_was: str = "charged") -> Problem:
    """credit_guard's tables are not in its database: a deployment step was missed, so the
    answer says which (a 503: the service is not ready, and will be once they exist)."""
    return Problem(
        status=503,
        type=TYPE_SCHEMA_MISSING,
        title="Credit tables missing",
        detail=(
            f"credit_guard's tables do not exist in its database; nothing was {nothing_was}. Create them with"
            " `await guard.create_schema()` at startup or `credit-guard init` (see the server's log)."
        ),
        headers={Headers.RETRY_AFTER: str(retry_after)},
    )


def feature_inactive(feature_key: str) -> Problem:
    return Problem(
        status=403,
        type=TYPE_FEATURE_INACTIVE,
        title="Feature unavailable",
        detail=f"Feature {feature_key!r} is currently disabled; nothing was charged.",
        extra={"feature": feature_key},
    )


def unavailable(retry_after: int, *, nothing_was: str = "charged") -> Problem:
    """The database did not answer: 503 with ``Retry-After``. ``nothing_was`` says what
    the refused request did not do ("charged" for a paid route, "changed" for an admin write)."""
    return Problem(
        status=503,
        type=TYPE_UNAVAILABLE,
        title="Credits unavailable",
        detail=f"The credit ledger cannot be reached right now; nothing was {nothing_was}. Retry later.",
        headers={Headers.RETRY_AFTER: str(retry_after)},
    )


def invalid_request(errors: dict[str, str], *, status: int = 400) -> Problem:
    """A request credit_guard's own endpoints cannot answer; ``errors`` maps each bad parameter to why."""
    return Problem(
        status=status,
        type=TYPE_INVALID_REQUEST,
        title="Invalid request",
        detail="; ".join(f"{name}: {reason}" for name, reason in errors.items()),
        extra={"errors": dict(errors)},
    )


def unknown_feature(feature_key: str) -> Problem:
    """A client asked about a feature that has no active price (404: the key is the client's choice)."""
    return Problem(
        status=404,
        type=TYPE_FEATURE_NOT_FOUND,
        title="Feature not found",
        detail=f"No active pricing exists for feature {feature_key!r}.",
        extra={"feature": feature_key},
    )


def not_authenticated() -> Problem:
    """An admin route was asked for by a request that carries no signed-in user."""
    return Problem(
        status=401,
        type=TYPE_NOT_AUTHENTICATED,
        title="Not authenticated",
        detail="This route is for administrators, and the request is not signed in.",
    )


def admin_required() -> Problem:
    return Problem(
        status=403,
        type=TYPE_ADMIN_REQUIRED,
        title="Administrator required",
        detail="This route is for administrators, and the signed-in user is not one.",
    )


def pricing_not_found(pricing_id: str) -> Problem:
    return Problem(
        status=404,
        type=TYPE_PRICING_NOT_FOUND,
        title="Pricing not found",
        detail=f"No pricing exists with id {pricing_id!r}.",
        extra={"id": pricing_id},
    )


def duplicate_feature(feature_key: str) -> Problem:
    return Problem(
        status=409,
        type=TYPE_DUPLICATE_FEATURE,
        title="Duplicate feature",
        detail=f"A pricing with feature_key {feature_key!r} already exists; nothing was changed.",
        extra={"errors": {"feature_key": "already exists"}, "feature": feature_key},
    )


def idempotency_conflict(key: str, *, retry_after: int) -> Problem:
    """The first request with this key is still running (the draft's 409)."""
    return Problem(
        status=409,
        type=TYPE_IDEMPOTENCY_CONFLICT,
        title="Request in progress",
        detail=f"A request with Idempotency-Key {key!r} is still being processed; nothing was charged. Retry later.",
        extra={"idempotency_key": key},
        headers={Headers.RETRY_AFTER: str(retry_after)},
    )


def idempotency_mismatch(key: str) -> Problem:
    """The key was first used for another request (the draft's 422)."""
    return Problem(
        status=422,
        type=TYPE_IDEMPOTENCY_MISMATCH,
        title="Idempotency key reused",
        detail=(
            f"Idempotency-Key {key!r} was already used for a different request (method, path, query or body);"
            " nothing was charged. Use a new key for a new request."
        ),
        extra={"idempotency_key": key},
    )


def request_too_large(limit: int) -> Problem:
    """An idempotent request whose body is too large to hold in memory for its fingerprint."""
    return Problem(
        status=413,
        type=TYPE_INVALID_REQUEST,
        title="Request body too large",
        detail=(
            f"Requests with an Idempotency-Key are fingerprinted with their body, which may be at most"
            f" {limit} bytes here; nothing was charged."
        ),
        extra={"limit": limit},
    )
