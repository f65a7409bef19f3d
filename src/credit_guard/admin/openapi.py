"""The OpenAPI 3.1 document of the admin app, written by hand from the same constants
the code validates with, so the limits a client reads are the limits it meets.

Hand-written rather than generated: the app is plain Starlette (no pydantic models to
introspect), and the document is small enough to read and review as data.
"""

from __future__ import annotations

from typing import Any, get_args

from ..models import (
    CATEGORY_MAX,
    CREDITS_MAX,
    DESCRIPTION_MAX,
    FEATURE_KEY_MAX,
    FEATURE_KEY_RE,
    FEATURE_NAME_MAX,
    POOL_MAX,
    POOL_RE,
    UsageGroup,
)
from ._openapi_common import FILTER as _FILTER
from ._openapi_common import NO_NUL as _NO_NUL
from ._openapi_common import REF as _REF
from ._openapi_common import TEXT as _TEXT
from ._openapi_common import WHEN as _WHEN
from ._openapi_common import error_refs as _errors
from ._openapi_common import json_response as _json
from ._openapi_common import problem_response as _problem_response
from ._openapi_common import query_param as _query
from ._openapi_members import MEMBER_SCHEMAS, member_paths
from ._openapi_plans import PLAN_SCHEMAS, plan_paths
from ._openapi_topups import TOPUP_SCHEMAS, topup_paths


def _fields() -> dict[str, dict[str, Any]]:
    return {
        "feature_key": {
            "type": "string",
            "maxLength": FEATURE_KEY_MAX,
            "pattern": FEATURE_KEY_RE.pattern,
            "description": "Unique key the code charges by: lowercase letters and digits joined by underscores.",
            "examples": ["seedream_text_to_image"],
        },
        "feature_name": {
            "type": "string",
            "minLength": 1,
            "maxLength": FEATURE_NAME_MAX,
            "pattern": _TEXT,
            "description": "Display name (surrounding whitespace is trimmed).",
        },
        "category": {
            "type": "string",
            "minLength": 1,
            "maxLength": CATEGORY_MAX,
            "pattern": _TEXT,
            "description": "Group shown on pricing pages, e.g. Image Generation.",
        },
        "credits": {"type": "integer", "minimum": 0, "maximum": CREDITS_MAX, "description": "Cost of one use."},
        "description": {"type": ["string", "null"], "maxLength": DESCRIPTION_MAX, "pattern": _NO_NUL},
        "is_active": {"type": "boolean", "description": "Inactive features cannot be charged for or seen publicly."},
        "pool": {
            "type": ["string", "null"],
            "maxLength": POOL_MAX,
            "pattern": POOL_RE.pattern,
            "description": "The credit pool its charges draw from (grants given to that pool); null: general.",
        },
        "pool_fallback": {
            "type": "boolean",
            "description": "Once the pool's grants are spent, draw from general credits (and the overdraft line).",
        },
    }


def openapi_document(*, server_url: str = "/", include_page: bool = True) -> dict[str, Any]:
    """The document; ``server_url`` is where the admin app is mounted (``/acme``)."""
    fields = _fields()
    pricing_properties = {
        "id": {"type": "string"},
        **fields,
        # ISO 8601 in UTC; not "format: date-time", since SQLite hands timestamps back without an offset.
        "created_at": {"type": ["string", "null"], "description": "ISO 8601, UTC."},
        "updated_at": {"type": ["string", "null"], "description": "ISO 8601, UTC."},
    }
    public_fields = ("feature_key", "feature_name", "category", "credits", "description")
    schemas: dict[str, Any] = {
        "FeaturePricing": {
            "type": "object",
            "properties": pricing_properties,
            "required": list(pricing_properties),
        },
        "FeaturePricingCreate": {
            "type": "object",
            "properties": fields,
            "required": ["feature_key", "feature_name", "category", "credits"],
            "additionalProperties": False,
        },
        "FeaturePricingUpdate": {
            "type": "object",
            "description": "Only the fields given change; the rest stay as they are.",
            "properties": fields,
            "additionalProperties": False,
        },
        "PublicFeaturePricing": {
            "type": "object",
            "properties": {name: fields[name] for name in public_fields},
            "required": list(public_fields),
        },
        "PublicPricingCatalog": {
            "type": "object",
            "properties": {
                "categories": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "category": {"type": "string"},
                            "features": {"type": "array", "items": {"$ref": _REF + "PublicFeaturePricing"}},
                        },
                        "required": ["category", "features"],
                    },
                }
            },
            "required": ["categories"],
        },
        "UsageRow": {
            "type": "object",
            "description": "One group of the usage report, read from the ledger.",
            "properties": {
                "key": {"type": "string", "description": "The day (YYYY-MM-DD), feature key or organization id."},
                "split": {
                    "type": "string",
                    "description": "With split_by only: the second grouping's value (a feature key, organization "
                    "id or day); one row per (key, split) that has charges or refunds.",
                },
                "charges": {"type": "integer", "minimum": 0},
                "credits_charged": {"type": "integer", "minimum": 0},
                "refunds": {"type": "integer", "minimum": 0},
                "credits_refunded": {"type": "integer", "minimum": 0},
                "net_credits": {"type": "integer"},
            },
            "required": ["key", "charges", "credits_charged", "refunds", "credits_refunded", "net_credits"],
        },
        "UsageReport": {
            "type": "object",
            "properties": {
                "group_by": {"type": "string", "enum": list(get_args(UsageGroup))},
                "split_by": {"type": ["string", "null"], "enum": [*get_args(UsageGroup), None]},
                "rows": {"type": "array", "items": {"$ref": _REF + "UsageRow"}},
            },
            "required": ["group_by", "split_by", "rows"],
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details.",
            "properties": {
                "type": {"type": "string", "format": "uri-reference"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {
                    "type": "object",
                    "description": "Each bad field or parameter, and what is wrong with it.",
                    "additionalProperties": {"type": "string"},
                },
            },
            "required": ["type", "title", "status", "detail"],
        },
    }
    responses = {
        "400": _problem_response("The body is not a JSON object."),
        "401": _problem_response("Nobody is signed in."),
        "403": _problem_response("The signed-in user is not an administrator."),
        "404": _problem_response("No such pricing."),
        "409": _problem_response("Another pricing already has this feature_key; nothing was changed."),
        "415": _problem_response("The body is not sent as application/json."),
        "422": _problem_response("Invalid fields or parameters; `errors` names each one. Nothing was changed."),
        "503": _problem_response("The database cannot be reached; nothing was changed.", retry_after=True),
    }
    pricing_id = {
        "name": "pricing_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": _NO_NUL},
    }
    admin = ["admin"]
    paths: dict[str, Any] = {
        "/api/admin/feature-pricing": {
            "get": {
                "operationId": "listFeaturePricing",
                "summary": "List pricing, active or not",
                "tags": admin,
                "parameters": [
                    _query("category", "Only this category.", {"type": "string", "minLength": 1, "pattern": _FILTER}),
                    _query(
                        "active",
                        "Only active (true) or inactive (false) pricing.",
                        {"type": "string", "enum": ["true", "false"]},
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "The pricing, by category then name.",
                        "content": {
                            "application/json": {
                                "schema": {"type": "array", "items": {"$ref": _REF + "FeaturePricing"}}
                            }
                        },
                    },
                    **_errors("401", "403", "422", "503"),
                },
            },
            "post": {
                "operationId": "createFeaturePricing",
                "summary": "Add a feature's price",
                "tags": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF + "FeaturePricingCreate"}}},
                },
                "responses": {
                    "201": _json(
                        "FeaturePricing",
                        "Created.",
                        headers={"Location": {"description": "URL of the new pricing.", "schema": {"type": "string"}}},
                    ),
                    **_errors("400", "401", "403", "409", "415", "422", "503"),
                },
            },
        },
        "/api/admin/feature-pricing/{pricing_id}": {
            "parameters": [pricing_id],
            "get": {
                "operationId": "getFeaturePricing",
                "summary": "One pricing, active or not",
                "tags": admin,
                "responses": {
                    "200": _json("FeaturePricing", "The pricing."),
                    **_errors("401", "403", "404", "422", "503"),
                },
            },
            "patch": {
                "operationId": "updateFeaturePricing",
                "summary": "Change some fields of a pricing",
                "tags": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF + "FeaturePricingUpdate"}}},
                },
                "responses": {
                    "200": _json("FeaturePricing", "The pricing as it is now."),
                    **_errors("400", "401", "403", "404", "409", "415", "422", "503"),
                },
            },
            "delete": {
                "operationId": "deleteFeaturePricing",
                "summary": "Delete a pricing (past ledger rows keep their feature key)",
                "tags": admin,
                "responses": {"204": {"description": "Deleted."}, **_errors("401", "403", "404", "422", "503")},
            },
        },
        "/api/admin/usage": {
            "get": {
                "operationId": "usageReport",
                "summary": "Charges and refunds from the ledger, grouped",
                "tags": admin,
                "parameters": [
                    _query("org", "Only this organization.", {"type": "string", "pattern": _NO_NUL}),
                    _query("feature", "Only this feature key.", {"type": "string", "pattern": _NO_NUL}),
                    _query("since", "From (inclusive); UTC unless it has an offset.", _WHEN),
                    _query("until", "Until (exclusive); UTC unless it has an offset.", _WHEN),
                    _query(
                        "group_by",
                        "How to group (default day).",
                        {"type": "string", "enum": list(get_args(UsageGroup))},
                    ),
                    _query(
                        "split_by",
                        "Split each group again (a chart's series: group_by=day&split_by=feature gives a row "
                        "per day and feature, with the feature in `split`). Must differ from group_by (422).",
                        {"type": "string", "enum": list(get_args(UsageGroup))},
                    ),
                ],
                "responses": {"200": _json("UsageReport", "The report."), **_errors("401", "403", "422", "503")},
            },
        },
        "/api/features/pricing": {
            "get": {
                "operationId": "publicPricing",
                "summary": "Active prices, for anyone (one feature with ?key=, else all by category)",
                "tags": ["public"],
                "parameters": [
                    _query("key", "One feature's key.", {"type": "string", "minLength": 1, "pattern": _NO_NUL})
                ],
                "responses": {
                    "200": {
                        "description": "The feature (with key), or every active feature grouped by category.",
                        "headers": {"Cache-Control": {"schema": {"type": "string"}}},
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": _REF + "PublicFeaturePricing"},
                                        {"$ref": _REF + "PublicPricingCatalog"},
                                    ]
                                }
                            }
                        },
                    },
                    "404": _problem_response("No active pricing has this key."),
                    **_errors("422", "503"),
                },
            },
        },
    }
    paths.update(_organization_paths(admin))
    paths.update(plan_paths(admin, _ORG_ID))
    paths.update(topup_paths(admin, _ORG_ID))
    paths.update(member_paths(admin, _ORG_ID))
    schemas.update(_ORGANIZATION_SCHEMAS)
    schemas.update(PLAN_SCHEMAS)
    schemas.update(TOPUP_SCHEMAS)
    schemas.update(MEMBER_SCHEMAS)
    if include_page:
        paths["/admin/plans"] = {
            "get": {
                "operationId": "plansPage",
                "summary": "The plans admin page (HTML)",
                "tags": admin,
                "responses": {
                    "200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                    **_errors("401", "403"),
                },
            }
        }
        paths["/admin/organizations"] = {
            "get": {
                "operationId": "organizationsPage",
                "summary": "The organizations view (HTML)",
                "tags": admin,
                "responses": {
                    "200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                    **_errors("401", "403"),
                },
            }
        }
        paths["/admin/feature-pricing"] = {
            "get": {
                "operationId": "featurePricingPage",
                "summary": "The pricing admin page (HTML)",
                "tags": admin,
                "responses": {
                    "200": {"description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}},
                    **_errors("401", "403"),
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "credit_guard pricing administration",
            "version": "1",
            "description": (
                "Manage feature pricing, plans, and organizations' credits, plans, auto top-ups and member caps, and read "
                "usage (admin routes: the host app decides who is an administrator), and show active prices "
                "to anyone. Errors are RFC 9457 problem+json."
            ),
        },
        "servers": [{"url": server_url}],
        "tags": [
            {"name": "admin", "description": "Administrators only (401 without a user, 403 for others)."},
            {"name": "public", "description": "No sign-in needed."},
        ],
        "paths": paths,
        "components": {"schemas": schemas, "responses": responses},
    }


_ORG_ID = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": _NO_NUL}
_ORGANIZATION_SCHEMAS: dict[str, Any] = {
    "OrganizationList": {
        "type": "object",
        "properties": {
            "organizations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"organization_id": {"type": "string"}, "balance": {"type": "integer"}},
                    "required": ["organization_id", "balance"],
                },
            }
        },
        "required": ["organizations"],
    },
    "Organization": {
        "type": "object",
        "description": "Spendable balance, overdraft, grants (live first, in spending order), open "
        "reservations and the latest ledger rows (newest first).",
        "properties": {
            "organization_id": {"type": "string"},
            "balance": {"type": "integer"},
            "overdraft": {"type": "object"},
            "pools": {
                "type": "array",
                "description": "What each credit pool's live grants hold (pool null: general); they sum to balance.",
                "items": {
                    "type": "object",
                    "properties": {"pool": {"type": ["string", "null"]}, "balance": {"type": "integer"}},
                    "required": ["pool", "balance"],
                },
            },
            "grants": {"type": "array", "items": {"type": "object"}},
            "reservations": {"type": "array", "items": {"type": "object"}},
            "ledger": {"type": "array", "items": {"type": "object"}},
        },
        "required": ["organization_id", "balance", "overdraft", "pools", "grants", "reservations", "ledger"],
    },
    "BalanceHistory": {
        "type": "object",
        "description": "The balance at the end of each UTC day the organization's credits moved, oldest "
        "first (between two points it did not change). No points: no movement in the range.",
        "properties": {
            "organization_id": {"type": "string"},
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"day": {"type": "string", "format": "date"}, "balance": {"type": "integer"}},
                    "required": ["day", "balance"],
                },
            },
        },
        "required": ["organization_id", "points"],
    },
    "GrantCreate": {
        "type": "object",
        "properties": {
            "amount": {"type": "integer", "minimum": 1, "maximum": 2**53 - 1},
            "expires_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "RFC 3339 (with its offset), in the future; null: never expires.",
            },
            "priority": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
            "reason": {"type": ["string", "null"], "maxLength": 500},
            "pool": {
                "type": ["string", "null"],
                "maxLength": POOL_MAX,
                "pattern": POOL_RE.pattern,
                "description": "Credits only that pool's features draw from; null: general.",
            },
        },
        "required": ["amount"],
        "additionalProperties": False,
    },
    "Granted": {
        "type": "object",
        "properties": {"organization_id": {"type": "string"}, "balance": {"type": "integer"}},
        "required": ["organization_id", "balance"],
    },
}


def _organization_paths(admin: list[str]) -> dict[str, Any]:
    org_param = {"name": "organization_id", "in": "path", "required": True, "schema": _ORG_ID}
    return {
        "/api/admin/organizations": {
            "get": {
                "operationId": "findOrganizations",
                "summary": "Organizations whose id starts with q (at most 50)",
                "tags": admin,
                "parameters": [
                    _query("q", "The id's beginning.", {"type": "string", "maxLength": 255, "pattern": _NO_NUL})
                ],
                "responses": {"200": _json("OrganizationList", "The matches."), **_errors("401", "403", "422", "503")},
            }
        },
        "/api/admin/organizations/{organization_id}": {
            "get": {
                "operationId": "getOrganization",
                "summary": "An organization's credits: balance, grants, reservations, ledger",
                "tags": admin,
                "parameters": [org_param],
                "responses": {
                    "200": _json("Organization", "The organization."),
                    "404": _problem_response("No organization with credits has this id."),
                    **_errors("401", "403", "422", "503"),
                },
            }
        },
        "/api/admin/organizations/{organization_id}/balance-history": {
            "get": {
                "operationId": "organizationBalanceHistory",
                "summary": "An organization's balance at the end of each day it moved (for a chart)",
                "tags": admin,
                "parameters": [
                    org_param,
                    _query("since", "From (inclusive); UTC unless it has an offset.", _WHEN),
                    _query("until", "Until (exclusive); UTC unless it has an offset.", _WHEN),
                ],
                "responses": {
                    "200": _json("BalanceHistory", "The points, oldest first."),
                    **_errors("401", "403", "422", "503"),
                },
            }
        },
        "/api/admin/organizations/{organization_id}/grants": {
            "post": {
                "operationId": "grantCredits",
                "summary": "Grant credits (an Idempotency-Key header grants once per key)",
                "tags": admin,
                "parameters": [
                    org_param,
                    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": _REF + "GrantCreate"}}},
                },
                "responses": {
                    "201": _json("Granted", "Granted; the new spendable balance."),
                    **_errors("400", "401", "403", "415", "422", "503"),
                },
            }
        },
    }


__all__ = ["openapi_document"]
