"""The operator's view of organizations: find one, see its credits, grant some.

    GET  /api/admin/organizations[?q=PREFIX]                 admin: accounts by id prefix
    GET  /api/admin/organizations/{organization_id}          admin: balance, overdraft, grants,
                                                             open reservations, recent ledger rows
    GET  /api/admin/organizations/{organization_id}/balance-history[?since=&until=]
                                                             admin: the balance at the end of
                                                             each UTC day it moved (a chart)
    POST /api/admin/organizations/{organization_id}/grants   admin: grant credits
    GET, PUT, DELETE .../{organization_id}/subscription      admin: its plan (``plans.py``)
    GET, PUT, DELETE .../{organization_id}/auto-topup        admin: its auto top-up (``topups.py``)
    GET .../{organization_id}/members, PUT, DELETE .../members/{member}
                                                             admin: its member caps (``members.py``)
    GET  /admin/organizations                                admin (the HTML page, ``page.py``)

The balance history is a route of its own rather than part of the organization's detail:
the detail is read again after every grant and stays small (the latest 50 ledger rows),
while the history grows by a point per active day for the life of the account and has a
range of its own (``since``/``until``), which the chart asks for separately.

A grant from the page carries an ``Idempotency-Key`` the page makes once per confirmed
form, so a double click or a retried request grants once.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import problems
from .._guard import CreditGuard
from ..errors import IdempotencyKeyReused
from ..models import Grant, Reservation, pool_error
from ..schema import MAX_BALANCE
from ._http import Refusal, json_object, parse_when, refuse_if

log = logging.getLogger("credit_guard.admin")

ORGANIZATIONS_PATH = "/api/admin/organizations"
_PRIVATE = {"Cache-Control": "no-store"}


async def find(request: Request, guard: CreditGuard) -> Response:
    prefix = request.query_params.get("q", "")
    if len(prefix) > 255:
        refuse_if({"q": "must be at most 255 characters"})
    found = await guard.find_organizations(prefix, limit=50)
    body = {"organizations": [{"organization_id": org, "balance": balance} for org, balance in found]}
    return JSONResponse(body, headers=_PRIVATE)


async def detail(request: Request, guard: CreditGuard) -> Response:
    org = path_organization(request)
    grants = await guard.list_grants(org)
    entries, jobs = await guard.organization_activity(org, limit=50)
    if not grants and not entries:
        raise Refusal(
            problems.Problem(404, problems.TYPE_NO_ORGANIZATION, "Not found", f"No organization {org!r} has credits.")
        )
    limit, owed = await guard.get_overdraft(org)
    body = {
        "organization_id": org,
        "balance": await guard.get_balance(org),
        "overdraft": {"limit": limit, "owed": owed},
        "pools": [{"pool": pool, "balance": held} for pool, held in (await guard.get_pool_balances(org)).items()],
        "grants": [_grant(g) for g in grants],
        "reservations": [_reservation(r) for r in jobs],
        "ledger": [{**row, "created_at": _when(row["created_at"])} for row in entries],
    }
    return JSONResponse(body, headers=_PRIVATE)


async def balance_history(request: Request, guard: CreditGuard) -> Response:
    """``{"organization_id", "points": [{"day": "YYYY-MM-DD", "balance": n}, ...]}``, oldest
    first; no points (not a 404) for an organization or a range without movement."""
    org = path_organization(request)
    errors: dict[str, str] = {}
    since = parse_when(request.query_params.get("since"), "since", errors)
    until = parse_when(request.query_params.get("until"), "until", errors)
    refuse_if(errors)
    points = await guard.balance_history(org, since=since, until=until)
    body = {"organization_id": org, "points": [p.to_dict() for p in points]}
    return JSONResponse(body, headers=_PRIVATE)


async def grant(request: Request, guard: CreditGuard) -> Response:
    org = path_organization(request)
    data = await json_object(request)
    errors: dict[str, str] = {}
    unknown = sorted(set(data) - {"amount", "expires_at", "priority", "reason", "pool"})
    if unknown:
        errors["body"] = f"unknown fields: {', '.join(unknown)}"
    amount = data.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_BALANCE:
        errors["amount"] = f"must be a whole number of credits from 1 to {MAX_BALANCE}"
    priority = data.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -(2**31) <= priority < 2**31:
        errors["priority"] = "must be a 32-bit integer"
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
        errors["reason"] = "must be text of at most 500 characters"
    expires_at = _expiry(data.get("expires_at"), errors)
    pool = data.get("pool")
    if (wrong := pool_error(pool)) is not None:
        errors["pool"] = wrong
    refuse_if(errors)
    assert isinstance(amount, int)
    key = request.headers.get("idempotency-key") or None
    try:
        balance = await guard.grant_credits(
            org,
            amount,
            reason=reason or None,
            expires_at=expires_at,
            priority=priority,
            idempotency_key=key,
            pool=pool,
        )
    except IdempotencyKeyReused as exc:
        raise Refusal(problems.invalid_request({"idempotency-key": str(exc)}, status=422)) from exc
    except ValueError as exc:  # the guard's own checks: an expiry that has passed, the maximum, the id
        raise Refusal(problems.invalid_request({"body": str(exc)}, status=422)) from exc
    log.info("credit_guard admin: granted %s to %s (%s)", amount, org, reason or "no reason")
    return JSONResponse({"organization_id": org, "balance": balance}, status_code=201, headers=_PRIVATE)


def path_organization(request: Request) -> str:
    org = str(request.path_params["organization_id"])
    if not org or len(org) > 255:
        refuse_if({"organization_id": "must be 1 to 255 characters"})
    return org


def _expiry(raw: Any, errors: dict[str, str]) -> datetime | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        errors["expires_at"] = "must be an ISO 8601 datetime with a timezone, or null"
        return None
    if len(raw) <= 10 or not (raw.upper().endswith("Z") or "+" in raw[10:] or "-" in raw[10:]):
        errors["expires_at"] = "must name its timezone (e.g. 2026-12-31T23:59:00Z): an expiry is an instant"
        return None
    return parse_when(raw, "expires_at", errors)


def _when(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else (str(value) if value is not None else None)


def _grant(g: Grant) -> dict[str, Any]:
    return {
        "id": g.id,
        "amount": g.amount,
        "remaining": g.remaining,
        "expires_at": _when(g.expires_at),
        "priority": g.priority,
        "reason": g.reason,
        "created_at": _when(g.created_at),
        "pool": g.pool,
    }


def _reservation(r: Reservation) -> dict[str, Any]:
    return {"job_id": r.job_id, "feature_key": r.feature_key, "credits": r.credits, "expires_at": _when(r.expires_at)}


__all__ = ["ORGANIZATIONS_PATH", "balance_history", "detail", "find", "grant", "path_organization"]
