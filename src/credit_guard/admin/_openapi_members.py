"""The member caps' part of the admin OpenAPI document (``members.py``'s routes): the same
limits the code validates with."""

from __future__ import annotations

from typing import Any

from .. import problems
from .._ledger import USER_ID_MAX
from .._storage.members import PERIODS
from ..schema import MAX_BALANCE
from ._openapi_common import NO_NUL, REF, error_refs, json_response

_PER = {
    "type": ["string", "null"],
    "enum": [*PERIODS, None],
    "description": "The period the cap counts in: a UTC calendar day or month; null: in all (never resets).",
}
_CAP = {
    "credits": {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_BALANCE,
        "description": "The most the member may spend per `per` (0: none of its paid calls go through).",
    },
    "per": _PER,
}

MEMBER_SCHEMAS: dict[str, Any] = {
    "MemberLimit": {
        "type": "object",
        "description": "A member's cap inside an organization and its use now: at most `credits` per `per`, "
        "`used` of it spent in the current period (charges net of their refunds), `remaining` what is left, "
        "`resets_at` when the next period starts (null: never). A charge over `remaining` is refused (402, "
        "problem type urn:credit-guard:problem:member-limit-reached), even when the organization has the credits.",
        "properties": {
            "organization_id": {"type": "string"},
            "member": {"type": "string", "description": "The request's user id (or API key id)."},
            **_CAP,
            "used": {"type": "integer", "minimum": 0},
            "remaining": {"type": "integer", "minimum": 0},
            "resets_at": {"type": ["string", "null"], "format": "date-time", "description": "RFC 3339, UTC."},
        },
        "required": ["organization_id", "member", "credits", "per", "used", "remaining", "resets_at"],
    },
    "MemberLimitList": {
        "type": "object",
        "properties": {
            "organization_id": {"type": "string"},
            "members": {"type": "array", "items": {"$ref": REF + "MemberLimit"}},
        },
        "required": ["organization_id", "members"],
    },
    "MemberLimitChange": {
        "type": "object",
        "description": "Both required. Changing `credits` keeps what the member spent this period; changing "
        "`per` starts counting again.",
        "properties": _CAP,
        "required": list(_CAP),
        "additionalProperties": False,
    },
    "NoMemberLimit": {
        "description": "The member has no cap in this organization.",
        "allOf": [
            {"$ref": REF + "Problem"},
            {
                "type": "object",
                "properties": {"organization_id": {"type": "string"}, "member": {"type": "string"}},
                "required": ["organization_id", "member"],
            },
        ],
    },
}


def member_paths(admin: list[str], org_id: dict[str, Any]) -> dict[str, Any]:
    org_param = {"name": "organization_id", "in": "path", "required": True, "schema": org_id}
    member_param = {
        "name": "member",
        "in": "path",
        "required": True,
        "description": "The member: the request's user id (or API key id).",
        "schema": {"type": "string", "minLength": 1, "maxLength": USER_ID_MAX, "pattern": NO_NUL},
    }
    none = {
        "description": "The member has no cap.",
        "content": {problems.PROBLEM_CONTENT_TYPE: {"schema": {"$ref": REF + "NoMemberLimit"}}},
    }
    return {
        "/api/admin/organizations/{organization_id}/members": {
            "parameters": [org_param],
            "get": {
                "operationId": "listMemberLimits",
                "summary": "An organization's member caps, each with what the member spent this period",
                "tags": admin,
                "responses": {
                    "200": json_response("MemberLimitList", "The caps, by member (none: an empty list)."),
                    **error_refs("401", "403", "422", "503"),
                },
            },
        },
        "/api/admin/organizations/{organization_id}/members/{member}": {
            "parameters": [org_param, member_param],
            "put": {
                "operationId": "setMemberLimit",
                "summary": "Set or change a member's cap (enforced by the next charge)",
                "tags": admin,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF + "MemberLimitChange"}}},
                },
                "responses": {
                    "200": json_response("MemberLimit", "Set (or changed): the cap and its use now."),
                    **error_refs("400", "401", "403", "415", "422", "503"),
                },
            },
            "delete": {
                "operationId": "removeMemberLimit",
                "summary": "Remove a member's cap: it may spend what the organization has",
                "tags": admin,
                "responses": {
                    "204": {"description": "Removed."},
                    "404": none,
                    **error_refs("401", "403", "422", "503"),
                },
            },
        },
    }


__all__ = ["MEMBER_SCHEMAS", "member_paths"]
