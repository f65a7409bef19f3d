"""The OpenAPI 3.1 document of the credit endpoints (``_endpoints.py``), and the names and
limits both share: the paths, the query parameters and their bounds.

Written by hand from the constants the code checks with, like the admin app's, and
sharing its ``Problem`` schema. ``/openapi.json`` and ``/widget.js`` are served but not
listed: one is this document, the other a static, public, cacheable script.
"""

from __future__ import annotations

from typing import Any

from . import problems
from .models import FEATURE_KEY_MAX, FEATURE_KEY_RE

FEATURE_PARAM = "feature"
DAYS_PARAM = "days"
#: ``/usage?days=N``: how many UTC days, today included, when not given; and the bounds.
DAYS_DEFAULT = 30
DAYS_MAX = 366
BALANCE_PATH = "/balance"
CHECK_PATH = "/check"
GRANTS_PATH = "/grants"
USAGE_PATH = "/usage"
OPENAPI_PATH = "/openapi.json"
WIDGET_PATH = "/widget.js"

_SCHEMAS = "#/components/schemas/"
_RESPONSES = "#/components/responses/"
_CREDITS = {"type": "integer", "minimum": 0}
_DAY = {"type": "string", "format": "date", "description": "A UTC calendar day, YYYY-MM-DD."}


def openapi_document(*, server_url: str = "/") -> dict[str, Any]:
    """The OpenAPI 3.1 document of :func:`credit_endpoints`; ``server_url`` is where the
    app is mounted (``/api/credits``)."""
    # Imported here, not at the top: the admin package is not needed to serve credits.
    from .admin.openapi import openapi_document as admin_document

    problem_schema = admin_document(include_page=False)["components"]["schemas"]["Problem"]
    private = {
        "Cache-Control": {
            "description": "Private and changing with every charge: never cached.",
            "required": True,
            "schema": {"type": "string", "const": "no-store"},
        }
    }
    remaining = {
        problems.HEADER_REMAINING: {
            "description": "The organization's balance now (what /balance would say).",
            "required": True,
            "schema": _CREDITS,
        }
    }
    retry_after = {
        "Retry-After": {"description": "Seconds to wait before retrying.", "required": True, "schema": _CREDITS}
    }
    refusals = {
        "400": ("`feature` is missing, given more than once, or not a feature key; `errors` says which.", {}),
        "401": ("The request is not signed in to an organization (the host app's sign-in decides).", {}),
        "404": ("No active pricing has this feature key (unknown and disabled features alike).", {}),
        "422": (
            f"`{DAYS_PARAM}` is not a whole number from 1 to {DAYS_MAX}, or given more than once; `errors` says so.",
            {},
        ),
        "503": ("The credit ledger cannot be reached; retry later.", retry_after),
    }
    responses: dict[str, Any] = {}
    for status, (description, headers) in refusals.items():
        responses[status] = {
            "description": description,
            "headers": {**private, **headers},
            "content": {problems.PROBLEM_CONTENT_TYPE: {"schema": {"$ref": _SCHEMAS + "Problem"}}},
        }
        # HEAD: the same status and headers, no body.
        responses["Head" + status] = {"description": description, "headers": {**private, **headers}}

    def operation(
        operation_id: str,
        summary: str,
        schema: str,
        description: str,
        statuses: tuple[str, ...],
        parameters: list[dict[str, Any]] | None = None,
        note: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The GET operation and its HEAD twin (same status and headers, no body)."""
        common: dict[str, Any] = {"tags": ["credits"]}
        if note:
            common["description"] = note
        if parameters:
            common["parameters"] = parameters
        get = {
            "operationId": operation_id,
            "summary": summary,
            **common,
            "responses": {
                "200": {
                    "description": description,
                    "headers": {**private, **remaining},
                    "content": {"application/json": {"schema": {"$ref": _SCHEMAS + schema}}},
                },
                **{status: {"$ref": _RESPONSES + status} for status in statuses},
            },
        }
        head = {
            "operationId": "head" + operation_id[0].upper() + operation_id[1:],
            "summary": summary + " (headers only)",
            **common,
            "responses": {
                "200": {"description": "As GET, without the body.", "headers": {**private, **remaining}},
                **{status: {"$ref": _RESPONSES + "Head" + status} for status in statuses},
            },
        }
        return {"get": get, "head": head}

    feature: dict[str, Any] = {
        "name": FEATURE_PARAM,
        "in": "query",
        "required": True,
        "description": "The feature key to check, once.",
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": FEATURE_KEY_MAX,
            "pattern": FEATURE_KEY_RE.pattern,
            "examples": ["seedream_text_to_image"],
        },
    }
    days = {
        "name": DAYS_PARAM,
        "in": "query",
        "required": False,
        "description": f"How many UTC days, today included, once; {DAYS_DEFAULT} when not given.",
        "schema": {"type": "integer", "minimum": 1, "maximum": DAYS_MAX, "default": DAYS_DEFAULT},
    }
    paths = {
        BALANCE_PATH: operation(
            "getBalance",
            "The signed-in organization's balance",
            "Balance",
            "The balance (0 for an organization that never had credits).",
            ("401", "503"),
        ),
        CHECK_PATH: operation(
            "checkCredits",
            "Whether the signed-in organization can afford one use of a feature now",
            "CreditCheck",
            "The price and the balance.",
            ("400", "401", "404", "503"),
            [feature],
            "Advice for a UI, not a reservation: only a charge holds credits.",
        ),
        GRANTS_PATH: operation(
            "listGrants",
            "The signed-in organization's live grants, in spending order",
            "GrantList",
            "Its grants with credits left and not expired; spent and expired ones are left out.",
            ("401", "503"),
            note=(
                "Spending order: charges draw from the lowest `priority` first, then the soonest "
                "`expires_at`, grants that never expire last, then the oldest."
            ),
        ),
        USAGE_PATH: operation(
            "getUsage",
            "The signed-in organization's usage per UTC day and feature",
            "Usage",
            "Every day of the window (zero-filled, oldest first) and its features, biggest first.",
            ("401", "422", "503"),
            [days],
            (
                "Read from the ledger: `net_credits` is what was charged minus what was refunded, each "
                "on the day it happened (a refund the day after its charge nets out in the totals, "
                "not on the charge's day)."
            ),
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "credit_guard credit endpoints",
            "version": "1",
            "description": (
                "The balance, grants and usage of the organization the request is signed in to, and "
                "whether it can afford a feature. The organization comes from the host app's sign-in, "
                "never from a parameter. Every answer has `Cache-Control: no-store`. Errors are RFC 9457 "
                "problem+json; a path not listed here is a 404 and a method other than GET or HEAD a 405 "
                "with `Allow: GET, HEAD`, both of type `about:blank`. Also served, unlisted: this document "
                f"(`{OPENAPI_PATH}`) and the billing-page widget (`{WIDGET_PATH}`, public and cacheable)."
            ),
        },
        "servers": [{"url": server_url}],
        "tags": [{"name": "credits", "description": "For the signed-in organization only."}],
        "paths": paths,
        "components": {"schemas": {**_schemas(feature["schema"]), "Problem": problem_schema}, "responses": responses},
    }


def _schemas(feature_key: dict[str, Any]) -> dict[str, Any]:
    organization = {"type": "string", "minLength": 1}
    net = {"type": "integer", "description": "Credits charged minus credits refunded (negative when refunds win)."}
    count = {"type": "integer", "minimum": 0}
    return {
        "Balance": {
            "type": "object",
            "properties": {"organization_id": organization, "credits": _CREDITS},
            "required": ["organization_id", "credits"],
        },
        "CreditCheck": {
            "type": "object",
            "properties": {
                "feature": feature_key,
                "has_enough": {"type": "boolean", "description": "available >= required"},
                "required": {**_CREDITS, "description": "Cost of one use."},
                "available": {**_CREDITS, "description": "The balance now."},
            },
            "required": ["feature", "has_enough", "required", "available"],
        },
        "Grant": {
            "type": "object",
            "properties": {
                "amount": {"type": "integer", "minimum": 1, "description": "Credits granted."},
                "remaining": {"type": "integer", "minimum": 1, "description": "Credits still spendable."},
                "expires_at": {
                    "type": ["string", "null"],
                    "format": "date-time",
                    "description": "When what remains stops being spendable; null: never.",
                },
                "reason": {"type": ["string", "null"], "description": "Why it was granted, as the operator wrote it."},
                "priority": {"type": "integer", "description": "Lower is spent first."},
            },
            "required": ["amount", "remaining", "expires_at", "reason", "priority"],
        },
        "GrantList": {
            "type": "object",
            "properties": {
                "organization_id": organization,
                "grants": {"type": "array", "items": {"$ref": _SCHEMAS + "Grant"}},
            },
            "required": ["organization_id", "grants"],
        },
        "UsageDay": {
            "type": "object",
            "properties": {
                "day": _DAY,
                "net_credits": net,
                "charges": {**count, "description": "Uses charged that day."},
                "features": {
                    "type": "object",
                    "description": "Feature key -> its net credits that day; only features that moved.",
                    "additionalProperties": {"type": "integer"},
                },
            },
            "required": ["day", "net_credits", "charges", "features"],
        },
        "FeatureUsage": {
            "type": "object",
            "properties": {
                "feature": {"type": "string"},
                "name": {
                    "type": ["string", "null"],
                    "description": "The feature's name in the pricing table; null once its pricing is deleted.",
                },
                "net_credits": net,
                "credits_charged": count,
                "credits_refunded": count,
                "charges": count,
                "refunds": count,
            },
            "required": ["feature", "name", "net_credits", "credits_charged", "credits_refunded", "charges", "refunds"],
        },
        "Usage": {
            "type": "object",
            "properties": {
                "organization_id": organization,
                "first_day": _DAY,
                "last_day": {**_DAY, "description": "Today (UTC), included."},
                "net_credits": net,
                "charges": count,
                "days": {"type": "array", "minItems": 1, "items": {"$ref": _SCHEMAS + "UsageDay"}},
                "features": {"type": "array", "items": {"$ref": _SCHEMAS + "FeatureUsage"}},
                "balance_history": {
                    "type": "array",
                    "description": "The balance at the end of each day of the window on which it moved, oldest first.",
                    "items": {
                        "type": "object",
                        "properties": {"day": _DAY, "balance": {"type": "integer"}},
                        "required": ["day", "balance"],
                    },
                },
            },
            "required": [
                "organization_id",
                "first_day",
                "last_day",
                "net_credits",
                "charges",
                "days",
                "features",
                "balance_history",
            ],
        },
    }
