"""Read-only credit endpoints for the signed-in organization: its balance, and a check.

    GET /balance             -> {"organization_id", "credits"}
    GET /check?feature=KEY   -> {"feature", "has_enough", "required", "available"}
    GET /openapi.json        -> the OpenAPI 3.1 document of the two above

Mount them next to the guarded routes (``Mount("/api/credits", credit_endpoints())``,
FastAPI's ``app.mount``, or a Litestar ``@asgi(..., is_mount=True)`` handler). The
organization is resolved exactly as for a charge (``_flow.paying_organization``), so
these endpoints can never show another organization's credits than the one that pays.

A plain ASGI app rather than a Starlette ``Router``: a Router answers unknown paths and
methods by raising Starlette's ``HTTPException``, which Litestar would turn into a 500.
Here every answer, refusals included, is sent by this module, and each one a client can
cause is in the document (only a missing guard, the operator's mistake, is a bare 500).
Refusals are problem+json (RFC 9457); an unknown path is a 404 and another method than
GET or HEAD a 405 (``Allow: GET, HEAD``), both of the generic ``about:blank`` type since
they say nothing about credits. HEAD answers as GET would (the server drops the body, as
for any Starlette route). Both data answers carry ``X-Credits-Remaining``, so a client
that tracks the header stays current, and every answer ``Cache-Control: no-store``, since
they are private and change with every charge (a cached 404 would outlive the feature's
activation).

``check`` is advice for a UI (grey out a button), not a reservation: only the charge
itself holds credits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from . import problems
from ._flow import find_guard, paying_organization, problem_response
from ._guard import CreditGuard
from .errors import StorageUnavailable
from .models import FEATURE_KEY_MAX, FEATURE_KEY_RE
from .problems import Problem

FEATURE_PARAM = "feature"
BALANCE_PATH = "/balance"
CHECK_PATH = "/check"
OPENAPI_PATH = "/openapi.json"
ALLOW = "GET, HEAD"
_PRIVATE = {"Cache-Control": "no-store"}
NOT_SIGNED_IN = "Sign in to an organization to see its credits: the request is not signed in to one."

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


def _answer(body: dict[str, Any], remaining: int) -> Response:
    return JSONResponse(body, headers={problems.HEADER_REMAINING: str(remaining)})


def _http_problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    """A plain HTTP error as problem+json: ``about:blank`` (RFC 9457 4.2.1), title = the status phrase."""
    return problem_response(problems.Problem(status, "about:blank", title, detail, headers=headers or {}))


class CreditEndpoints:
    """The ASGI app :func:`credit_endpoints` returns; mount it under any prefix."""

    _routes: dict[str, Endpoint] = {BALANCE_PATH: _balance, CHECK_PATH: _check}

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
        if endpoint is None and path != OPENAPI_PATH:
            response = _http_problem(
                404, "Not Found", f"No endpoint here; the credit endpoints are {BALANCE_PATH} and {CHECK_PATH}."
            )
        elif scope["method"] not in ("GET", "HEAD"):
            response = _http_problem(
                405, "Method Not Allowed", f"Only {ALLOW} are allowed here.", headers={"Allow": ALLOW}
            )
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
    """The balance and check endpoints (and their OpenAPI document) as one mountable ASGI app.

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


# -- the OpenAPI document ----------------------------------------------------------------

_SCHEMAS = "#/components/schemas/"
_RESPONSES = "#/components/responses/"


def openapi_document(*, server_url: str = "/") -> dict[str, Any]:
    """The OpenAPI 3.1 document of :func:`credit_endpoints`; ``server_url`` is where the
    app is mounted (``/api/credits``). Written by hand from the constants the code checks
    with, like the admin app's, and sharing its ``Problem`` schema."""
    # Imported here, not at the top: the admin package is not needed to serve credits.
    from .admin.openapi import openapi_document as admin_document

    problem_schema = admin_document(include_page=False)["components"]["schemas"]["Problem"]
    credits = {"type": "integer", "minimum": 0}
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
            "schema": credits,
        }
    }
    retry_after = {
        "Retry-After": {"description": "Seconds to wait before retrying.", "required": True, "schema": credits}
    }
    refusals = {
        "400": ("`feature` is missing, given more than once, or not a feature key; `errors` says which.", {}),
        "401": ("The request is not signed in to an organization (the host app's sign-in decides).", {}),
        "404": ("No active pricing has this feature key (unknown and disabled features alike).", {}),
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

    def ok(schema: str, description: str) -> dict[str, Any]:
        return {
            "description": description,
            "headers": {**private, **remaining},
            "content": {"application/json": {"schema": {"$ref": _SCHEMAS + schema}}},
        }

    def head_of(get: dict[str, Any], statuses: tuple[str, ...]) -> dict[str, Any]:
        return {
            **{key: value for key, value in get.items() if key != "responses"},
            "operationId": "head" + get["operationId"][0].upper() + get["operationId"][1:],
            "summary": get["summary"] + " (headers only)",
            "responses": {
                "200": {"description": "As GET, without the body.", "headers": {**private, **remaining}},
                **{status: {"$ref": _RESPONSES + "Head" + status} for status in statuses},
            },
        }

    feature = {
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
    balance = {
        "operationId": "getBalance",
        "summary": "The signed-in organization's balance",
        "tags": ["credits"],
        "responses": {
            "200": ok("Balance", "The balance (0 for an organization that never had credits)."),
            **{status: {"$ref": _RESPONSES + status} for status in ("401", "503")},
        },
    }
    check = {
        "operationId": "checkCredits",
        "summary": "Whether the signed-in organization can afford one use of a feature now",
        "description": "Advice for a UI, not a reservation: only a charge holds credits.",
        "tags": ["credits"],
        "parameters": [feature],
        "responses": {
            "200": ok("CreditCheck", "The price and the balance."),
            **{status: {"$ref": _RESPONSES + status} for status in ("400", "401", "404", "503")},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "credit_guard credit endpoints",
            "version": "1",
            "description": (
                "The balance of the organization the request is signed in to, and whether it can afford "
                "a feature. The organization comes from the host app's sign-in, never from a parameter. "
                "Every answer has `Cache-Control: no-store`. Errors are RFC 9457 problem+json; a path "
                "not listed here is a 404 and a method other than GET or HEAD a 405 with `Allow: GET, HEAD`, "
                "both of type `about:blank`."
            ),
        },
        "servers": [{"url": server_url}],
        "tags": [{"name": "credits", "description": "For the signed-in organization only."}],
        "paths": {
            BALANCE_PATH: {"get": balance, "head": head_of(balance, ("401", "503"))},
            CHECK_PATH: {"get": check, "head": head_of(check, ("400", "401", "404", "503"))},
        },
        "components": {
            "schemas": {
                "Balance": {
                    "type": "object",
                    "properties": {
                        "organization_id": {"type": "string", "minLength": 1},
                        "credits": credits,
                    },
                    "required": ["organization_id", "credits"],
                },
                "CreditCheck": {
                    "type": "object",
                    "properties": {
                        "feature": feature["schema"],
                        "has_enough": {"type": "boolean", "description": "available >= required"},
                        "required": {**credits, "description": "Cost of one use."},
                        "available": {**credits, "description": "The balance now."},
                    },
                    "required": ["feature", "has_enough", "required", "available"],
                },
                "Problem": problem_schema,
            },
            "responses": responses,
        },
    }


__all__ = [
    "BALANCE_PATH",
    "CHECK_PATH",
    "FEATURE_PARAM",
    "OPENAPI_PATH",
    "CreditEndpoints",
    "credit_endpoints",
    "openapi_document",
]
