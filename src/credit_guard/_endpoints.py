"""Read-only credit endpoints for the signed-in organization, and a widget that shows them.

    GET /balance             -> {"organization_id", "credits"}
    GET /check?feature=KEY   -> {"feature", "has_enough", "required", "available"}
    GET /grants              -> {"organization_id", "grants": [{"amount", "remaining",
                                 "expires_at", "reason", "priority"}]}: the live grants
                                 (credits left, not expired) in spending order
    GET /usage?days=N        -> usage per UTC day and feature over the last N days (30 by
                                 default, 1 to 366), today included: {"organization_id",
                                 "first_day", "last_day", "net_credits", "charges",
                                 "days": [{"day", "net_credits", "charges", "features":
                                 {key: net}}] (every day, zero-filled, oldest first),
                                 "features": [{"feature", "name", "net_credits", ...}]
                                 (biggest first), "balance_history": [{"day", "balance"}]}
    GET /openapi.json        -> the OpenAPI 3.1 document of the four above
                                 (``_endpoints_openapi.py``)
    GET /widget.js           -> the billing-page widget (``static/credit-widget.js``):
                                 ``<script src="/api/credits/widget.js" defer></script>``
                                 and ``<div data-credit-guard></div>``

Mount them next to the guarded routes (``Mount("/api/credits", credit_endpoints())``,
FastAPI's ``app.mount``, or a Litestar ``@asgi(..., is_mount=True)`` handler). The
organization is resolved exactly as for a charge (``_flow.paying_organization``), so
these endpoints can never show another organization's credits than the one that pays.

A plain ASGI app rather than a Starlette ``Router``: a Router answers unknown paths and
methods by raising Starlette's ``HTTPException``, which Litestar would turn into a 500.
Here every answer, refusals included, is sent by this module, and each one a client can
cause is in the document (only a missing guard, the operator's mistake, is a bare 500).
Refusals are problem+json (RFC 9457): a bad ``feature`` is a 400 and a bad ``days`` a
422 (as the admin API answers a bad query parameter), ``errors`` naming the parameter;
an unknown path is a 404 and another method than GET or HEAD a 405 (``Allow: GET,
HEAD``), both of the generic ``about:blank`` type since they say nothing about credits.
HEAD answers as GET would (the server drops the body, as for any Starlette route). Every
data answer carries ``X-Credits-Remaining``, so a client that tracks the header stays
current, and every answer but the widget ``Cache-Control: no-store``, since they are
private and change with every charge (a cached 404 would outlive the feature's
activation). The widget is public and the same for everyone: ``Cache-Control: public``
with an ``ETag`` of its content (a matching ``If-None-Match`` is a 304).

``check`` is advice for a UI (grey out a button), not a reservation: only the charge
itself holds credits. ``usage`` is read from the ledger, so it always matches the money:
a refund counts on the day it happened.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from . import problems
from ._clock import utcnow
from ._endpoints_openapi import (
    BALANCE_PATH,
    CHECK_PATH,
    DAYS_DEFAULT,
    DAYS_MAX,
    DAYS_PARAM,
    FEATURE_PARAM,
    GRANTS_PATH,
    OPENAPI_PATH,
    USAGE_PATH,
    WIDGET_PATH,
    openapi_document,
)
from ._flow import find_guard, paying_organization, problem_response
from ._guard import CreditGuard
from .errors import StorageUnavailable
from .models import FEATURE_KEY_MAX, FEATURE_KEY_RE, UsageRow
from .problems import Problem

ALLOW = "GET, HEAD"
_PRIVATE = {"Cache-Control": "no-store"}
NOT_SIGNED_IN = "Sign in to an organization to see its credits: the request is not signed in to one."
WIDGET_FILE = Path(__file__).resolve().parent / "static" / "credit-widget.js"
#: The widget may be an hour old in a browser; its ETag makes the revalidation after that cheap.
WIDGET_CACHE_CONTROL = "public, max-age=3600"
_DAYS_INVALID = f"must be a whole number from 1 to {DAYS_MAX}"

Endpoint = Callable[[CreditGuard, str, Request], Awaitable[Response]]


async def _balance(guard: CreditGuard, organization_id: str, request: Request) -> Response:
    credits = await guard.get_balance(organization_id)
    return _answer({"organization_id": organization_id, "credits": credits}, credits)


async def _check(guard: CreditGuard, organization_id: str, request: Request) -> Response:
    given = request.query_params.getlist(FEATURE_PARAM)
    if len(given) > 1:  # which one would be meant? Refuse rather than pick one silently.
        return problem_response(problems.invalid_request({FEATURE_PARAM: "given more than once"}))
    feature_key = given[0] if given else ""
    if not feature_key:
        return problem_response(problems.invalid_request({FEATURE_PARAM: "required query parameter"}))
    if len(feature_key) > FEATURE_KEY_MAX or not FEATURE_KEY_RE.fullmatch(feature_key):
        return problem_response(problems.invalid_request({FEATURE_PARAM: "must be a feature key like 'text_to_image'"}))
    check = await guard.check_credits(organization_id, feature_key)
    if check.error is not None:  # no pricing, or inactive: both are "no such feature" to a client
        return problem_response(problems.unknown_feature(feature_key))
    body = {
        "feature": feature_key,
        "has_enough": check.has_enough,
        "required": check.required,
        "available": check.available,
    }
    return _answer(body, check.available)


async def _grants(guard: CreditGuard, organization_id: str, request: Request) -> Response:
    """The live grants (credits left, not expired), in the order charges spend them:
    ``list_grants`` puts them first in that order, then the spent and expired ones."""
    now = utcnow()
    grants = [
        {
            "amount": grant.amount,
            "remaining": grant.remaining,
            "expires_at": None if grant.expires_at is None else grant.expires_at.astimezone(UTC).isoformat(),
            "reason": grant.reason,
            "priority": grant.priority,
        }
        for grant in await guard.list_grants(organization_id)
        if grant.remaining > 0 and (grant.expires_at is None or grant.expires_at > now)
    ]
    credits = await guard.get_balance(organization_id)
    return _answer({"organization_id": organization_id, "grants": grants}, credits)


async def _usage(guard: CreditGuard, organization_id: str, request: Request) -> Response:
    days = _days(request.query_params.getlist(DAYS_PARAM))
    if isinstance(days, Problem):
        return problem_response(days)
    last_day = utcnow().date()
    first_day = last_day - timedelta(days=days - 1)
    since = datetime.combine(first_day, time(), UTC)
    until = datetime.combine(last_day + timedelta(days=1), time(), UTC)
    rows = await guard.usage_report(
        group_by="day", split_by="feature", organization_id=organization_id, since=since, until=until
    )
    history = await guard.balance_history(organization_id, since=since, until=until)
    names = {pricing.feature_key: pricing.feature_name for pricing in await guard.list_pricing()}
    credits = await guard.get_balance(organization_id)
    body = {"organization_id": organization_id, **usage_summary(rows, first_day, last_day, names)}
    body["balance_history"] = [point.to_dict() for point in history]
    return _answer(body, credits)


def usage_summary(rows: list[UsageRow], first_day: date, last_day: date, names: dict[str, str]) -> dict[str, Any]:
    """``usage_report(group_by="day", split_by="feature")`` rows as a billing page draws
    them: every day from ``first_day`` to ``last_day`` (zero-filled, oldest first) with its
    features, and each feature's totals, biggest first."""
    days: dict[str, dict[str, Any]] = {}
    day = first_day
    while day <= last_day:
        days[day.isoformat()] = {"day": day.isoformat(), "net_credits": 0, "charges": 0, "features": {}}
        day += timedelta(days=1)
    features: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row.split if row.split is not None else ""
        entry = days.get(row.key)
        if entry is not None:  # the window's rows only; the query asked for nothing else
            entry["net_credits"] += row.net_credits
            entry["charges"] += row.charges
            entry["features"][key] = entry["features"].get(key, 0) + row.net_credits
        totals = features.setdefault(
            key,
            {
                "feature": key,
                "name": names.get(key),
                "net_credits": 0,
                "credits_charged": 0,
                "credits_refunded": 0,
                "charges": 0,
                "refunds": 0,
            },
        )
        totals["net_credits"] += row.net_credits
        totals["credits_charged"] += row.credits_charged
        totals["credits_refunded"] += row.credits_refunded
        totals["charges"] += row.charges
        totals["refunds"] += row.refunds
    ranked = sorted(features.values(), key=lambda f: (-f["net_credits"], -f["charges"], f["feature"]))
    return {
        "first_day": first_day.isoformat(),
        "last_day": last_day.isoformat(),
        "net_credits": sum(f["net_credits"] for f in ranked),
        "charges": sum(f["charges"] for f in ranked),
        "days": list(days.values()),
        "features": ranked,
    }


def _days(given: list[str]) -> int | Problem:
    """``days``: once at most, a whole number from 1 to DAYS_MAX; DAYS_DEFAULT when absent."""
    if len(given) > 1:
        return problems.invalid_request({DAYS_PARAM: "given more than once"}, status=422)
    if not given:
        return DAYS_DEFAULT
    raw = given[0]
    if not (0 < len(raw) <= 4 and raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= DAYS_MAX:
        return problems.invalid_request({DAYS_PARAM: _DAYS_INVALID}, status=422)
    return int(raw)


@cache
def _widget() -> tuple[bytes, str]:
    """The widget script and its ETag (a hash of its bytes: a new release is a new tag)."""
    script = WIDGET_FILE.read_bytes()
    return script, '"' + hashlib.sha256(script).hexdigest()[:32] + '"'


def _widget_response(request: Request) -> Response:
    script, etag = _widget()
    headers = {"ETag": etag, "Cache-Control": WIDGET_CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
    wanted = request.headers.get("if-none-match", "")
    if wanted.strip() == "*" or etag in (tag.strip().removeprefix("W/") for tag in wanted.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(script, media_type="text/javascript; charset=utf-8", headers=headers)


def _answer(body: dict[str, Any], remaining: int) -> Response:
    return JSONResponse(body, headers={problems.HEADER_REMAINING: str(remaining)})


def _http_problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    """A plain HTTP error as problem+json: ``about:blank`` (RFC 9457 4.2.1), title = the status phrase."""
    return problem_response(problems.Problem(status, "about:blank", title, detail, headers=headers or {}))


class CreditEndpoints:
    """The ASGI app :func:`credit_endpoints` returns; mount it under any prefix."""

    _routes: dict[str, Endpoint] = {
        BALANCE_PATH: _balance,
        CHECK_PATH: _check,
        GRANTS_PATH: _grants,
        USAGE_PATH: _usage,
    }

    def __init__(self, guard: CreditGuard | None = None) -> None:
        self.guard = guard

    def openapi_document(self, *, server_url: str = "/") -> dict[str, Any]:
        """The OpenAPI 3.1 document these endpoints serve, for a mount at ``server_url``."""
        return openapi_document(server_url=server_url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no websockets here; lifespan is the host app's business
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        path = _mounted_path(scope)
        endpoint = self._routes.get(path)
        response: Response
        if endpoint is None and path not in (OPENAPI_PATH, WIDGET_PATH):
            listed = ", ".join([*self._routes, OPENAPI_PATH, WIDGET_PATH])
            response = _http_problem(404, "Not Found", f"No endpoint here; the credit endpoints are {listed}.")
        elif scope["method"] not in ("GET", "HEAD"):
            response = _http_problem(
                405, "Method Not Allowed", f"Only {ALLOW} are allowed here.", headers={"Allow": ALLOW}
            )
        elif path == WIDGET_PATH:  # public and the same for everyone: the one cacheable answer
            await _widget_response(Request(scope, receive))(scope, receive, send)
            return
        elif endpoint is None:
            response = JSONResponse(openapi_document(server_url=_mount_point(scope)))
        else:
            response = await self._serve(endpoint, Request(scope, receive))
        response.headers.update(_PRIVATE)
        await response(scope, receive, send)

    async def _serve(self, endpoint: Endpoint, request: Request) -> Response:
        guard = find_guard(self.guard, request.scope.get("app"))
        if isinstance(guard, Problem):
            return problem_response(guard)
        organization_id = await paying_organization(guard, request.scope, request)
        if isinstance(organization_id, Problem):
            if organization_id.detail == problems.no_organization().detail:
                # The charge's wording ("this route is paid for") is wrong here: nothing is paid.
                organization_id = problems.no_organization(NOT_SIGNED_IN)
            return problem_response(organization_id)
        try:
            return await endpoint(guard, organization_id, request)
        except StorageUnavailable:
            # Unlike a charge, a read has nothing to give away, so fail_open does not apply.
            return problem_response(problems.unavailable(guard.retry_after))


def credit_endpoints(guard: CreditGuard | None = None) -> CreditEndpoints:
    """The balance, check, grants and usage endpoints (with their OpenAPI document and
    the billing-page widget) as one mountable ASGI app.

    The guard is ``guard=`` or, per request, the host app's ``app.state.credit_guard``
    (Starlette, FastAPI and Litestar keep the host app in ``scope["app"]``).
    """
    return CreditEndpoints(guard)


def _mounted_path(scope: Scope) -> str:
    """The path below the mount point (Starlette keeps the prefix in ``root_path``;
    Litestar rewrites ``path``), without a trailing slash."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    return path.rstrip("/") or "/"


def _mount_point(scope: Scope) -> str:
    """Where the app is mounted, for the document's ``servers``: ``root_path`` (Starlette,
    FastAPI), else what Litestar cut off ``path`` and left in ``raw_path``."""
    root_path = str(scope.get("root_path", ""))
    raw = scope.get("raw_path")
    if not root_path and isinstance(raw, bytes):
        raw_path = raw.decode("latin-1").rstrip("/")
        if raw_path.endswith(OPENAPI_PATH):
            root_path = raw_path[: -len(OPENAPI_PATH)]
    return root_path.rstrip("/") or "/"


__all__ = [
    "BALANCE_PATH",
    "CHECK_PATH",
    "DAYS_PARAM",
    "FEATURE_PARAM",
    "GRANTS_PATH",
    "OPENAPI_PATH",
    "USAGE_PATH",
    "WIDGET_PATH",
    "CreditEndpoints",
    "credit_endpoints",
    "openapi_document",
]
