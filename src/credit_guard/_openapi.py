"""What a paid route adds to its OpenAPI operation, for any framework.

A route that costs credits answers things its own code never mentions: a 402 when the
balance is short, 401/403/503 refusals, ``X-Credits-*`` headers on its successes, an
``Idempotency-Key`` it honours. Generated clients and API docs only know what the
document says, so the adapters (``contrib.fastapi.document_credits``, the Litestar plugin)
merge this module's fragments into the operations of guarded routes. The fragments are
plain dicts built from the same constants the request path uses (``problems``,
``_idempotency.KEY_MAX``), so the document cannot drift from the answers.

The ``x-credit-guard`` extension names the feature key and where its price comes from,
so a UI can show "costs N credits" (``priceCheck`` is the mounted ``credit_endpoints``'
check URL when the adapter found one).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from starlette.routing import compile_path

from . import problems
from ._flow import Rule
from ._idempotency import KEY_MAX
from .models import FEATURE_KEY_MAX, POOL_MAX, POOL_RE

if TYPE_CHECKING:
    from ._guard import CreditGuard

EXTENSION = "x-credit-guard"
PROBLEM_SCHEMA = "CreditGuardProblem"
_MARK = "__credit_guard_rule__"
_PROBLEM_REF = {"$ref": f"#/components/schemas/{PROBLEM_SCHEMA}"}
_COUNT = {"type": "integer", "minimum": 0}


def mark(wrapper: Callable[..., Any], rule: Rule, guard: CreditGuard | None) -> None:
    """Remember on a decorated handler what it charges, for the OpenAPI adapters."""
    setattr(wrapper, _MARK, (rule, guard))


def marked(endpoint: object) -> tuple[Rule, CreditGuard | None] | None:
    """The rule (and explicit guard) a ``@requires_credits`` handler charges, or None."""
    found = getattr(endpoint, _MARK, None)
    return found if isinstance(found, tuple) else None


def problem_schema() -> dict[str, Any]:
    """RFC 9457 problem details, with the members credit_guard's refusals add."""
    return {
        "type": "object",
        "description": "RFC 9457 problem details (application/problem+json).",
        "properties": {
            "type": {"type": "string", "format": "uri-reference", "examples": [problems.TYPE_INSUFFICIENT]},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "feature": {"type": "string", "maxLength": FEATURE_KEY_MAX, "description": "The feature key priced."},
            "required": {**_COUNT, "description": "402: the credits this request costs."},
            "available": {
                "type": "integer",
                "description": "402: the credits the organization has now for this feature (its pool's, if it has one).",
            },
            "pool": {
                "type": "string",
                "maxLength": POOL_MAX,
                "pattern": POOL_RE.pattern,
                "description": "402: the credit pool the feature draws from (absent: the general pool).",
            },
            "idempotency_key": {"type": "string", "description": "409/422: the Idempotency-Key concerned."},
            "limit": {
                "type": "string",
                "enum": ["member", "rate"],
                "description": "402 member-limit-reached / 429 rate-limited: which limit refused the request.",
            },
            "member": {"type": "string", "description": "402 member-limit-reached: the member (user or key id)."},
            "cap": {**_COUNT, "description": "402 member-limit-reached: the member's cap."},
            "per": {
                "type": ["string", "null"],
                "description": "The cap's period (day, month, null: in all); a rate's (organization, member).",
            },
            "resets_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "402 member-limit-reached: when the member's cap starts again (null: never).",
            },
            "allowed": {**_COUNT, "description": "429: the requests the rate allows in its window."},
            "window": {**_COUNT, "description": "429: the window, in seconds."},
            "retry_after": {**_COUNT, "description": "429: seconds until the window lets a request in."},
            "errors": {
                "type": "object",
                "description": "Each bad field or parameter, and what is wrong with it.",
                "additionalProperties": {"type": "string"},
            },
        },
        "required": ["type", "title", "status", "detail"],
    }


def _header(description: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema}


def success_headers(*, idempotent: bool) -> dict[str, Any]:
    """The headers a paid route's successful answers carry."""
    headers = {
        problems.HEADER_CHARGED: _header("Credits this request took.", _COUNT, required=True),
        problems.HEADER_REMAINING: _header(
            "What the organization can still spend on this feature (its credit pool's credits, and general ones"
            " if the pool falls back to them; absent when it is not known: fail-open, unpriced).",
            {"type": "integer"},
        ),
        problems.HEADER_REFUNDED: _header("Credits given back (unused units, or a failed request).", _COUNT),
        problems.Headers.POOL: _header(
            "The credit pool the feature draws from; absent for the general pool.", {"type": "string"}
        ),
    }
    if idempotent:
        headers[problems.HEADER_REPLAYED] = _header(
            "true when this is the stored answer to an earlier request with the same Idempotency-Key (not charged).",
            {"type": "string", "enum": ["true"]},
        )
    return headers


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {problems.PROBLEM_CONTENT_TYPE: {"schema": dict(_PROBLEM_REF)}},
    }
    if headers:
        response["headers"] = headers
    return response


def refusals(rule: Rule, *, idempotency: str) -> dict[str, dict[str, Any]]:
    """The problem responses a paid route can answer with, by status code."""
    retry_after = {"Retry-After": _header("Seconds to wait before retrying.", _COUNT, required=True)}
    found = {
        "401": _problem(
            "credit_guard: no organization to charge (a request the app's own auth let through without"
            " one; the app's own 401/403 come first)."
        ),
        "402": _problem(
            "Insufficient credits: `required` is the price, `available` what the organization can spend on"
            " this feature (for a feature of a credit pool, `pool` names it: its credits, and general ones if it"
            " falls back to them). Or (type member-limit-reached, `limit`: member) the member's cap for its"
            " period is spent: `cap`, `per`, `available` to that member and `resets_at`. Nothing was charged.",
            {
                problems.HEADER_REQUIRED: _header("The price of this request.", _COUNT, required=True),
                problems.HEADER_REMAINING: _header(
                    "What the organization can spend on this feature.", {"type": "integer"}, required=True
                ),
                problems.Headers.POOL: _header(
                    "The credit pool the feature draws from; absent for the general pool.", {"type": "string"}
                ),
            },
        ),
        "403": _problem("credit_guard: the feature this route charges for is switched off in the pricing table."),
        "503": _problem("The credit ledger cannot be reached; nothing was charged. Retry later.", retry_after),
    }
    if rule.rates is not None:
        found["429"] = _problem(
            f"Over this route's rate ({rule.rate} per {rule.rate_by}); nothing was charged.",
            {
                **retry_after,
                problems.Headers.RATELIMIT_LIMIT: _header("Requests the window allows.", _COUNT, required=True),
                problems.Headers.RATELIMIT_REMAINING: _header("Requests left in it (0).", {"type": "integer"}),
                problems.Headers.RATELIMIT_RESET: _header("Seconds until it lets one in.", _COUNT),
                problems.Headers.RATELIMIT_POLICY: _header("The limit and its window: `10;w=60`.", {"type": "string"}),
            },
        )
        found["503"] = _problem(
            "The credit ledger or the rate limit storage cannot be reached; nothing was charged. Retry later.",
            retry_after,
        )
    invalid = []
    if rule.units is not None:
        invalid.append("the request's units are not a number the price can be multiplied by")
    if idempotency != "off":
        found["400"] = _problem(
            "A malformed Idempotency-Key"
            + (", or none (this route requires one)." if idempotency == "required" else ".")
        )
        found["409"] = _problem("The first request with this Idempotency-Key is still running.", retry_after)
        invalid.append("the Idempotency-Key was used for a different request")
    if invalid:
        found["422"] = _problem("Refused, nothing charged: " + "; or ".join(invalid) + ".")
    return found


def idempotency_of(rule: Rule, guard: CreditGuard | None) -> str:
    """``off``, ``optional`` or ``required``: how the route treats Idempotency-Key."""
    mode = rule.idempotency if rule.idempotency is not None else (guard.idempotency if guard is not None else False)
    return "required" if mode == "required" else "optional" if mode else "off"


def extension(rule: Rule, *, idempotency: str, check_url: str | None) -> dict[str, Any]:
    """The ``x-credit-guard`` extension: what the route costs and where to look the price up."""
    found: dict[str, Any] = {
        "feature": rule.feature_key,
        "priceSource": "pricing-table",
        "units": "fixed" if rule.units is None else "variable",
        "idempotency": idempotency,
    }
    if rule.rate is not None:
        found["rate"] = {"limit": rule.rate, "per": rule.rate_by}
    if rule.on_disconnect != "refund":
        found["onDisconnect"] = rule.on_disconnect
    if check_url is not None:
        found["priceCheck"] = f"{check_url}?feature={rule.feature_key}"
    return found


def document_operation(
    document: dict[str, Any] | None,
    operation: dict[str, Any],
    rule: Rule,
    guard: CreditGuard | None,
    check_url: str | None,
) -> None:
    """Merge a paid route's responses, headers, parameter and extension into ``operation``
    (part of ``document``, whose components get the problem schema; with no document the
    schema is written inline in each response). Idempotent."""
    if document is not None:
        document.setdefault("components", {}).setdefault("schemas", {}).setdefault(PROBLEM_SCHEMA, problem_schema())
    idempotency = idempotency_of(rule, guard)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status, response in responses.items():
        if str(status).startswith("2") and isinstance(response, dict):
            response.setdefault("headers", {}).update(copy.deepcopy(success_headers(idempotent=idempotency != "off")))
    for status, refusal in refusals(rule, idempotency=idempotency).items():
        if document is None:
            refusal["content"][problems.PROBLEM_CONTENT_TYPE]["schema"] = problem_schema()
        existing = responses.get(status)
        if isinstance(existing, dict) and "$ref" not in existing:
            # FastAPI's own 422 (validation) stays; ours is another content type of it.
            existing.setdefault("content", {}).update(refusal["content"])
            if "headers" in refusal:
                existing.setdefault("headers", {}).update(refusal["headers"])
            if refusal["description"] not in existing.get("description", ""):
                existing["description"] = (
                    f"{existing.get('description', '')}; or (problem+json) {refusal['description']}"
                )
        else:
            responses[status] = refusal
    if idempotency != "off":
        parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
        if not any(p.get("in") == "header" and p.get("name", "").lower() == "idempotency-key" for p in parameters):
            parameters.append(
                {
                    "name": problems.Headers.IDEMPOTENCY_KEY,
                    "in": "header",
                    "required": idempotency == "required",
                    "description": "Retry safely: a request repeated with the same key is answered again, not charged again.",
                    "schema": {"type": "string", "minLength": 1, "maxLength": KEY_MAX, "pattern": "^[!-~]+$"},
                }
            )
    operation[EXTENSION] = extension(rule, idempotency=idempotency, check_url=check_url)


def rule_specs(rules: Iterable[tuple[str, str | Rule]]) -> dict[tuple[str, str], Rule]:
    """Middleware rules (``"POST /v1/images"`` -> key or Rule) by (method, OpenAPI path)."""
    found: dict[tuple[str, str], Rule] = {}
    for spec, target in rules:
        method, _, path = spec.strip().partition(" ")
        rule = target if isinstance(target, Rule) else Rule(target)
        # Starlette's own path_format: "{id:int}" -> "{id}", as OpenAPI writes it.
        _, path_format, _ = compile_path(path.strip())
        found[(method.lower(), path_format)] = rule
        if method.upper() == "GET":
            found.setdefault(("head", path_format), rule)
    return found


__all__ = [
    "EXTENSION",
    "PROBLEM_SCHEMA",
    "document_operation",
    "extension",
    "idempotency_of",
    "mark",
    "marked",
    "problem_schema",
    "refusals",
    "rule_specs",
    "success_headers",
]
