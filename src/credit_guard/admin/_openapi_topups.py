"""The auto top-ups' part of the admin OpenAPI document (``topups.py``'s routes): the same
limits the code validates with."""

from __future__ import annotations

from typing import Any

from .. import problems
from ..schema import MAX_BALANCE
from ._openapi_common import REF, error_refs, json_response

_CREDITS = {"type": "integer", "minimum": 1, "maximum": MAX_BALANCE}
_CHARGE_REGISTERED = {
    "type": "boolean",
    "description": "Whether the process that answered has the app's charge callable registered "
    "(`guard.topups.register`). False: a balance falling below the line there buys nothing and "
    "records nothing (`state` and `crossings` do not change) until the app registers one.",
}
_LINE = {
    "below": {**_CREDITS, "description": "Buy when the spendable balance falls below this."},
    "credits": {**_CREDITS, "description": "How many credits to buy each time."},
}

TOPUP_SCHEMAS: dict[str, Any] = {
    "AutoTopup": {
        "type": "object",
        "description": "An organization's auto top-up: `credits` bought (by the app's charge callable) when its "
        "spendable balance falls below `below`, once per crossing. `state`: armed; running (a top-up is being "
        "bought); fired (one ran and the balance is still below the line: armed again once it is back at or "
        "above). `crossings` counts the top-ups run; `last_result` is what the charge returned, `last_error` "
        "what it raised, `last_run_at` when the last one started.",
        "properties": {
            "organization_id": {"type": "string"},
            **_LINE,
            "state": {"type": "string", "enum": ["armed", "running", "fired"]},
            "crossings": {"type": "integer", "minimum": 0},
            "last_result": {"type": ["string", "null"]},
            "last_error": {"type": ["string", "null"]},
            "last_run_at": {"type": ["string", "null"], "format": "date-time", "description": "RFC 3339, UTC."},
            "charge_registered": _CHARGE_REGISTERED,
        },
        "required": [
            "organization_id",
            "below",
            "credits",
            "state",
            "crossings",
            "last_result",
            "last_error",
            "last_run_at",
            "charge_registered",
        ],
    },
    "AutoTopupChange": {
        "type": "object",
        "properties": _LINE,
        "required": list(_LINE),
        "additionalProperties": False,
    },
    "NoAutoTopup": {
        "description": "The organization has no auto top-up; the answer still says whether this process could buy one.",
        "allOf": [
            {"$ref": REF + "Problem"},
            {
                "type": "object",
                "properties": {"organization_id": {"type": "string"}, "charge_registered": _CHARGE_REGISTERED},
                "required": ["organization_id", "charge_registered"],
            },
        ],
    },
}


def topup_paths(admin: list[str], org_id: dict[str, Any]) -> dict[str, Any]:
    org_param = {"name": "organization_id", "in": "path", "required": True, "schema": org_id}
    none = {
        "description": "The organization has no auto top-up.",
        "content": {problems.PROBLEM_CONTENT_TYPE: {"schema": {"$ref": REF + "NoAutoTopup"}}},
    }
    return {
        "/api/admin/organizations/{organization_id}/auto-topup": {
            "parameters": [org_param],
            "get": {
                "operationId": "getAutoTopup",
                "summary": "An organization's auto top-up: its line, state and last run",
                "tags": admin,
                "responses": {
                    "200": json_response("AutoTopup", "The auto top-up."),
                    "404": none,
                    **error_refs("401", "403", "422", "503"),
                },
            },
            "put": {
                "operationId": "setAutoTopup",
                "summary": "Set or change an organization's auto top-up (arms it; already below the line, a process "
                "with a charge registered buys at once, in the background)",
                "tags": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF + "AutoTopupChange"}}},
                },
                "responses": {
                    "200": json_response("AutoTopup", "Set (or changed): the auto top-up as it is now."),
                    **error_refs("400", "401", "403", "415", "422", "503"),
                },
            },
            "delete": {
                "operationId": "removeAutoTopup",
                "summary": "Remove an organization's auto top-up: nothing is bought automatically after",
                "tags": admin,
                "responses": {
                    "204": {"description": "Removed."},
                    "404": none,
                    **error_refs("401", "403", "422", "503"),
                },
            },
        },
    }


__all__ = ["TOPUP_SCHEMAS", "topup_paths"]
