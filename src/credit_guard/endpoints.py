"""Read-only credit endpoints for the signed-in organization: its balance, and a check.

    GET /balance             -> {"organization_id", "credits"}
    GET /check?feature=KEY   -> {"feature", "has_enough", "required", "available"}

Mount them next to the guarded routes (``Mount("/api/credits", credit_endpoints())``,
FastAPI's ``app.mount``, or a Litestar ``@asgi(..., is_mount=True)`` handler). The
organization is resolved exactly as for a charge (``guard.resolve_organization``), so
these endpoints can never show another organization's credits than the one that pays.

A plain ASGI app rather than a Starlette ``Router``: a Router answers unknown paths and
methods by raising Starlette's ``HTTPException``, which Litestar would turn into a 500.
Here every answer, refusals included, is sent by this module. Both answers also carry
``X-Credits-Remaining``, so a client that tracks the header stays current, and
``Cache-Control: no-store``, since they are private and change with every charge.

``check`` is advice for a UI (grey out a button), not a reservation: only the charge
itself holds credits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from . import problems
from .decorator import find_guard, problem_response
from .errors import StorageUnavailable
from .guard import CreditGuard
from .models import FEATURE_KEY_MAX, FEATURE_KEY_RE

FEATURE_PARAM = "feature"
_PRIVATE = {"Cache-Control": "no-store"}

Endpoint = Callable[[CreditGuard, str, Request], Awaitable[Response]]


async def _balance(guard: CreditGuard, organization_id: str, request: Request) -> Response:
    credits = await guard.get_balance(organization_id)
    return _answer({"organization_id": organization_id, "credits": credits}, credits)


async def _check(guard: CreditGuard, organization_id: str, request: Request) -> Response:
    feature_key = request.query_params.get(FEATURE_PARAM)
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


def _answer(body: dict[str, Any], remaining: int) -> Response:
    return JSONResponse(body, headers={**_PRIVATE, problems.HEADER_REMAINING: str(remaining)})


class CreditEndpoints:
    """The ASGI app :func:`credit_endpoints` returns; mount it under any prefix."""

    _routes: dict[str, Endpoint] = {"/balance": _balance, "/check": _check}

    def __init__(self, guard: CreditGuard | None = None) -> None:
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no websockets here; lifespan is the host app's business
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        endpoint = self._routes.get(_mounted_path(scope))
        if endpoint is None:
            response: Response = PlainTextResponse("Not Found", status_code=404)
        elif scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"})
        else:
            response = await self._serve(endpoint, Request(scope, receive))
        await response(scope, receive, send)

    async def _serve(self, endpoint: Endpoint, request: Request) -> Response:
        guard = find_guard(self.guard, request.scope.get("app"))
        organization_id = await guard.resolve_organization(request.scope, request)
        if not organization_id:
            return problem_response(problems.no_organization())
        try:
            return await endpoint(guard, organization_id, request)
        except StorageUnavailable:
            # Unlike a charge, a read has nothing to give away, so fail_open does not apply.
            return problem_response(problems.unavailable(guard.retry_after))


def credit_endpoints(guard: CreditGuard | None = None) -> CreditEndpoints:
    """The balance and check endpoints as one mountable ASGI app.

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


__all__ = ["FEATURE_PARAM", "CreditEndpoints", "credit_endpoints"]
