"""An organization's auto top-up over HTTP: see it, set or change its line, remove it.

    GET    /api/admin/organizations/{organization_id}/auto-topup   admin: the line, its state, the last run
    PUT    /api/admin/organizations/{organization_id}/auto-topup   admin: set or change {below, credits}
    DELETE /api/admin/organizations/{organization_id}/auto-topup   admin: remove it

Every write goes through ``guard.set_auto_topup`` / ``guard.remove_auto_topup``, so a
line set here is the line the guard watches, exactly as if the app had set it.

What the admin cannot do is pay. Buying the credits is the app's ``charge`` callable,
registered in each process at startup (``guard.topups.register(charge)``); it is never
sent over HTTP. So every answer (the 404 too) says ``charge_registered``: whether the
process that answered has one. Without one, a balance that falls below its line in that
process buys nothing and records nothing: ``_topups.AutoTopups._look`` logs a warning and
returns before claiming the crossing, so ``state``, ``crossings``, ``last_run_at``,
``last_result`` and ``last_error`` do not move (an armed line stays armed, a fired one is
not armed again there). That crossing is not looked at again: the next look comes when the
balance crosses the line again.

A ``PUT`` arms the line again (a change too), and the guard looks at the balance at once:
already below the new line, a process with a charge runs a top-up right away, in the
background (so the ``PUT`` answers before it has run, with the state it found).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import problems
from .._guard import CreditGuard
from ..models import AutoTopup
from ._http import Refusal, json_object, refuse_if, whole_number
from .organizations import path_organization

log = logging.getLogger("credit_guard.admin")

TYPE_NO_AUTO_TOPUP = "urn:credit-guard:problem:no-auto-topup"
#: The body's fields, each a whole number of credits from 1 (the table's ``positive`` check).
TOPUP_FIELDS = ("below", "credits")
_PRIVATE = {"Cache-Control": "no-store"}


async def get_auto_topup(request: Request, guard: CreditGuard) -> Response:
    """The organization's line, its state and how its last run went; 404 when it has none."""
    org = path_organization(request)
    topup = await guard.auto_topup(org)
    if topup is None:
        raise Refusal(no_auto_topup(guard, org))
    return JSONResponse(topup_view(guard, topup), headers=_PRIVATE)


async def put_auto_topup(request: Request, guard: CreditGuard) -> Response:
    """Buy ``credits`` whenever the spendable balance falls below ``below``: creates the
    line or changes it (arming it again; the count of top-ups run is kept). 200 either way."""
    org = path_organization(request)
    below, credits = validate_line(await json_object(request))
    before = await guard.auto_topup(org)
    topup = await guard.set_auto_topup(org, below=below, credits=credits)
    charge = "" if has_charge(guard) else "; no charge is registered in this process: nothing will be bought here"
    if before is None:
        log.info("credit_guard admin: set %s's auto top-up: %s credits below %s%s", org, credits, below, charge)
    else:
        log.info(
            "credit_guard admin: changed %s's auto top-up from %s credits below %s to %s credits below %s%s",
            org,
            before.credits,
            before.below,
            credits,
            below,
            charge,
        )
    return JSONResponse(topup_view(guard, topup), headers=_PRIVATE)


async def delete_auto_topup(request: Request, guard: CreditGuard) -> Response:
    """Remove the organization's auto top-up: nothing is bought automatically after this
    (a top-up already running finishes). 404 when it has none."""
    org = path_organization(request)
    if not await guard.remove_auto_topup(org):
        raise Refusal(no_auto_topup(guard, org))
    log.info("credit_guard admin: removed %s's auto top-up", org)
    return Response(status_code=204, headers=_PRIVATE)


def has_charge(guard: CreditGuard) -> bool:
    """Whether this process can buy anything: the app registered its charge callable here."""
    return guard.topups.charge is not None


def topup_view(guard: CreditGuard, topup: AutoTopup) -> dict[str, Any]:
    return {
        "organization_id": topup.organization_id,
        "below": topup.below,
        "credits": topup.credits,
        "state": topup.state,
        "crossings": topup.crossings,
        "last_result": topup.last_result,
        "last_error": topup.last_error,
        "last_run_at": None if topup.last_run_at is None else topup.last_run_at.isoformat(),
        "charge_registered": has_charge(guard),
    }


def validate_line(data: dict[str, Any]) -> tuple[int, int]:
    """``(below, credits)`` from a body, every bad field named at once (a 422)."""
    errors: dict[str, str] = {}
    for unknown in sorted(set(data) - set(TOPUP_FIELDS)):
        errors[unknown] = "unknown field"
    clean: dict[str, int | None] = {}
    for name in TOPUP_FIELDS:
        if name not in data:
            errors[name] = "is required"
        else:
            clean[name] = whole_number(data[name], 1, name, errors)
    refuse_if(errors)
    below, credits = clean["below"], clean["credits"]
    assert below is not None and credits is not None
    return below, credits


def no_auto_topup(guard: CreditGuard, org: str) -> problems.Problem:
    return problems.Problem(
        404,
        TYPE_NO_AUTO_TOPUP,
        "No auto top-up",
        f"Organization {org!r:.80} has no auto top-up.",
        {"organization_id": org, "charge_registered": has_charge(guard)},
    )


__all__ = [
    "TOPUP_FIELDS",
    "TYPE_NO_AUTO_TOPUP",
    "delete_auto_topup",
    "get_auto_topup",
    "has_charge",
    "put_auto_topup",
    "topup_view",
    "validate_line",
]
