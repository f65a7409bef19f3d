"""The plans' part of the admin OpenAPI document (``plans.py``'s routes): the same limits
the code validates with."""

from __future__ import annotations

from typing import Any

from .._periods import PERIOD_UNITS
from ..models import FEATURE_KEY_MAX, FEATURE_KEY_RE, FEATURE_NAME_MAX
from ..schema import MAX_BALANCE
from ._openapi_common import NO_NUL, REF, TEXT, error_refs, json_response, problem_response, query_param

_KEY = {
    "type": "string",
    "maxLength": FEATURE_KEY_MAX,
    "pattern": FEATURE_KEY_RE.pattern,
    "description": "The plan's key: lowercase letters and digits joined by underscores.",
    "examples": ["pro"],
}
_WHEN = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC."}
_ON_CHANGE = {"type": "string", "enum": ["expire", "keep"]}


def _plan_fields() -> dict[str, Any]:
    return {
        "name": {
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": FEATURE_NAME_MAX,
            "pattern": TEXT,
            "description": "Shown to people (surrounding whitespace is trimmed); null: the key.",
        },
        "credits": {"type": "integer", "minimum": 1, "maximum": MAX_BALANCE, "description": "Granted each period."},
        "period": {"type": "string", "enum": list(PERIOD_UNITS), "description": "Default month."},
        "rollover": {
            "type": ["integer", "null"],
            "minimum": 0,
            "maximum": MAX_BALANCE,
            "description": "Unused credits carried into the next period: 0 (the default) none, null all.",
        },
    }


def _plan_properties() -> dict[str, Any]:
    fields = _plan_fields()
    return {
        "plan_key": _KEY,
        "name": {"type": "string"},
        "credits": fields["credits"],
        "period": fields["period"],
        "rollover": {"type": ["integer", "null"], "minimum": 0, "description": fields["rollover"]["description"]},
    }


PLAN_SCHEMAS: dict[str, Any] = {
    "Plan": {
        "type": "object",
        "description": "Credits by subscription: `credits` every `period`, as a grant that expires at the "
        "period's end.",
        "properties": {
            **_plan_properties(),
            "subscribers": {"type": "integer", "minimum": 0, "description": "Organizations on this plan."},
        },
        "required": [*_plan_properties(), "subscribers"],
    },
    "PlanCreate": {
        "type": "object",
        "properties": {"plan_key": _KEY, **_plan_fields()},
        "required": ["plan_key", "credits"],
        "additionalProperties": False,
    },
    "PlanUpdate": {
        "type": "object",
        "description": "Only the fields given change, from each subscriber's next period on (never the one under "
        "way). The key cannot change; nor can the period while the plan has subscribers (409).",
        "properties": _plan_fields(),
        "additionalProperties": False,
    },
    "Subscription": {
        "type": "object",
        "description": "An organization's plan. `period` counts the periods granted since `anchor` (0 the first); "
        "`renews_at` is the next renewal, when the next period starts and its allowance is granted. "
        "`grant_id` is the current period's allowance, `rollover_grant_id` what rolled into it (null: nothing).",
        "properties": {
            "organization_id": {"type": "string"},
            "plan_key": {"type": "string"},
            "plan": {
                "type": ["object", "null"],
                "properties": _plan_properties(),
                "required": list(_plan_properties()),
            },
            "anchor": _WHEN,
            "period": {"type": "integer", "minimum": -1},
            "period_start": {**_WHEN, "type": ["string", "null"]},
            "renews_at": _WHEN,
            "grant_id": {"type": ["integer", "null"]},
            "rollover_grant_id": {"type": ["integer", "null"]},
        },
        "required": [
            "organization_id",
            "plan_key",
            "plan",
            "anchor",
            "period",
            "period_start",
            "renews_at",
            "grant_id",
            "rollover_grant_id",
        ],
    },
    "SubscriptionChange": {
        "type": "object",
        "properties": {
            "plan_key": _KEY,
            "on_change": {
                **_ON_CHANGE,
                "description": "From another plan: expire (the default) writes its unused credits off now, "
                "keep lets them last to their own end.",
            },
        },
        "required": ["plan_key"],
        "additionalProperties": False,
    },
}


def plan_paths(admin: list[str], org_id: dict[str, Any]) -> dict[str, Any]:
    plan_key = {"name": "plan_key", "in": "path", "required": True, "schema": {"type": "string", "pattern": NO_NUL}}
    org_param = {"name": "organization_id", "in": "path", "required": True, "schema": org_id}
    no_plan = problem_response("No plan has this key.")
    no_subscription = problem_response("The organization is on no plan.")
    return {
        "/api/admin/plans": {
            "get": {
                "operationId": "listPlans",
                "summary": "Every plan, by key, with its subscribers",
                "tags": admin,
                "responses": {
                    "200": {
                        "description": "The plans.",
                        "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": REF + "Plan"}}}},
                    },
                    **error_refs("401", "403", "503"),
                },
            },
            "post": {
                "operationId": "createPlan",
                "summary": "Create a plan",
                "tags": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF + "PlanCreate"}}},
                },
                "responses": {
                    "201": json_response(
                        "Plan",
                        "Created.",
                        headers={"Location": {"description": "URL of the new plan.", "schema": {"type": "string"}}},
                    ),
                    "409": problem_response("A plan already has this key; nothing was changed."),
                    **error_refs("400", "401", "403", "415", "422", "503"),
                },
            },
        },
        "/api/admin/plans/{plan_key}": {
            "parameters": [plan_key],
            "get": {
                "operationId": "getPlan",
                "summary": "One plan",
                "tags": admin,
                "responses": {
                    "200": json_response("Plan", "The plan."),
                    "404": no_plan,
                    **error_refs("401", "403", "422", "503"),
                },
            },
            "patch": {
                "operationId": "updatePlan",
                "summary": "Change some fields of a plan (from each subscriber's next period)",
                "tags": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF + "PlanUpdate"}}},
                },
                "responses": {
                    "200": json_response("Plan", "The plan as it is now."),
                    "404": no_plan,
                    "409": problem_response("The period cannot change while the plan has subscribers."),
                    **error_refs("400", "401", "403", "415", "422", "503"),
                },
            },
            "delete": {
                "operationId": "deletePlan",
                "summary": "Delete a plan nobody subscribes to",
                "tags": admin,
                "responses": {
                    "204": {"description": "Deleted."},
                    "404": no_plan,
                    "409": problem_response("Organizations subscribe to the plan; nothing was changed."),
                    **error_refs("401", "403", "422", "503"),
                },
            },
        },
        "/api/admin/organizations/{organization_id}/subscription": {
            "parameters": [org_param],
            "get": {
                "operationId": "getSubscription",
                "summary": "An organization's plan, its period and next renewal",
                "tags": admin,
                "responses": {
                    "200": json_response("Subscription", "The subscription."),
                    "404": no_subscription,
                    **error_refs("401", "403", "422", "503"),
                },
            },
            "put": {
                "operationId": "subscribe",
                "summary": "Put an organization on a plan; the period under way is granted at once (moves credits)",
                "tags": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF + "SubscriptionChange"}}},
                },
                "responses": {
                    "200": json_response("Subscription", "Moved to the plan (or on it already: nothing changed)."),
                    "201": json_response("Subscription", "Subscribed (the organization was on no plan)."),
                    "404": no_plan,
                    **error_refs("400", "401", "403", "415", "422", "503"),
                },
            },
            "delete": {
                "operationId": "unsubscribe",
                "summary": "End an organization's plan: no period is granted after",
                "tags": admin,
                "parameters": [
                    query_param(
                        "on_change",
                        "keep (the default): the period under way keeps its credits to its end; expire: they end now.",
                        _ON_CHANGE,
                    )
                ],
                "responses": {
                    "204": {"description": "Ended."},
                    "404": no_subscription,
                    **error_refs("401", "403", "422", "503"),
                },
            },
        },
    }


__all__ = ["PLAN_SCHEMAS", "plan_paths"]
