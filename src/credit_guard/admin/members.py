"""An organization's member caps over HTTP: list them, set or change one, remove one.

    GET    /api/admin/organizations/{organization_id}/members            admin: every cap, its use now
    PUT    /api/admin/organizations/{organization_id}/members/{member}   admin: set or change {credits, per}
    DELETE /api/admin/organizations/{organization_id}/members/{member}   admin: remove the cap

A member is whatever the request's ``user_id`` is (a user id, an API key id), so the path
carries it as it is, percent-encoded: the rest of the path after ``/members/``, a "/" or a
newline included (``MemberConvertor``), so every member the list shows can be changed. Every write goes through ``guard.set_member_limit`` /
``guard.remove_member_limit``, so a cap set here is the one the next charge meets, in the
same statement as the organization's debit, exactly as if the app had set it.

Both fields of a ``PUT`` are required, ``per`` too (``null`` for "in all"): changing
``per`` starts the member's count again, so leaving it out must not quietly do that.
Changing only ``credits`` keeps what the member spent this period; 0 blocks its paid calls.
Removing a cap lets the member spend what the organization has; setting one again later
counts from 0.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import problems
from .._guard import CreditGuard
from .._ledger import USER_ID_MAX
from .._storage.members import PERIODS
from ._http import Refusal, json_object, refuse_if, whole_number
from .organizations import path_organization

log = logging.getLogger("credit_guard.admin")

TYPE_NO_MEMBER_LIMIT = "urn:credit-guard:problem:no-member-limit"
#: The body's fields, both required: a whole number of credits from 0, and the period.
MEMBER_FIELDS = ("credits", "per")
_PRIVATE = {"Cache-Control": "no-store"}
#: The path convertor of ``{member}`` (``api.py``'s route): ``f"{{member:{MEMBER_CONVERTOR}}}"``.
MEMBER_CONVERTOR = "credit_guard_member"


class MemberConvertor(Convertor[str]):
    """The rest of the path, whatever it holds. Starlette's ``str`` stops at a "/" (sent as
    %2F, decoded before routing) and its ``path`` at a newline, so a member id holding one
    would be listed but never found (a plain-text 404). An empty one or a NUL reaches the
    handler, which refuses it with a 422 naming ``member``."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor(MEMBER_CONVERTOR, MemberConvertor())


async def list_members(request: Request, guard: CreditGuard) -> Response:
    """Every member cap of the organization, by member, each with what it spent this
    period; an empty list (not a 404) when it has none."""
    org = path_organization(request)
    caps = await guard.list_member_limits(org)
    body = {"organization_id": org, "members": [cap.to_dict() for cap in caps]}
    return JSONResponse(body, headers=_PRIVATE)


async def put_member(request: Request, guard: CreditGuard) -> Response:
    """Let the member spend at most ``credits`` per ``per``: creates the cap or changes it. 200 either way."""
    org, member = path_member(request)
    credits, per = validate_cap(await json_object(request))
    before = await guard.get_member_usage(org, member)
    cap = await guard.set_member_limit(org, member, credits, per=per)
    if before is None:
        log.info("credit_guard admin: set %s's cap for member %r: %s credits %s", org, member, credits, _period(per))
    else:
        log.info(
            "credit_guard admin: changed %s's cap for member %r from %s credits %s to %s credits %s",
            org,
            member,
            before.credits,
            _period(before.per),
            credits,
            _period(per),
        )
    return JSONResponse(cap.to_dict(), headers=_PRIVATE)


async def delete_member(request: Request, guard: CreditGuard) -> Response:
    """Remove the member's cap: it may spend what the organization has. 404 when it has none."""
    org, member = path_member(request)
    if not await guard.remove_member_limit(org, member):
        raise Refusal(no_member_limit(org, member))
    log.info("credit_guard admin: removed %s's cap for member %r", org, member)
    return Response(status_code=204, headers=_PRIVATE)


def path_member(request: Request) -> tuple[str, str]:
    """``(organization_id, member)`` from the path, each 1 to 255 characters, else a 422 naming
    it (a NUL in either was refused before the handler ran, by ``_http.refuse_unstorable``)."""
    org = path_organization(request)
    member = str(request.path_params["member"])
    if not member or len(member) > USER_ID_MAX:
        refuse_if({"member": f"must be 1 to {USER_ID_MAX} characters (a user or API key id)"})
    return org, member


def validate_cap(data: dict[str, Any]) -> tuple[int, str | None]:
    """``(credits, per)`` from a body, every bad field named at once (a 422)."""
    errors: dict[str, str] = {}
    for unknown in sorted(set(data) - set(MEMBER_FIELDS)):
        errors[unknown] = "unknown field"
    credits: int | None = None
    if "credits" not in data:
        errors["credits"] = "is required"
    else:
        credits = whole_number(data["credits"], 0, "credits", errors)
    if "per" not in data:
        errors["per"] = 'is required: "day", "month" or null (in all)'
    elif data["per"] is not None and data["per"] not in PERIODS:
        errors["per"] = 'must be "day", "month" or null (in all)'
    refuse_if(errors)
    assert credits is not None
    per: str | None = data["per"]
    return credits, per


def no_member_limit(org: str, member: str) -> problems.Problem:
    return problems.Problem(
        404,
        TYPE_NO_MEMBER_LIMIT,
        "No member limit",
        f"Member {member!r:.80} of organization {org!r:.80} has no cap.",
        {"organization_id": org, "member": member},
    )


def _period(per: str | None) -> str:
    return "in all" if per is None else f"a {per}"


__all__ = [
    "MEMBER_CONVERTOR",
    "MEMBER_FIELDS",
    "TYPE_NO_MEMBER_LIMIT",
    "MemberConvertor",
    "delete_member",
    "list_members",
    "no_member_limit",
    "path_member",
    "put_member",
    "validate_cap",
]
