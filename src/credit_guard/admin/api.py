"""The pricing admin API, the public pricing endpoint and their OpenAPI document, as one
mountable Starlette app.

    GET    /api/admin/feature-pricing[?category=&active=true|false]    admin
    POST   /api/admin/feature-pricing                                  admin
    GET    /api/admin/feature-pricing/{id}                             admin
    PATCH  /api/admin/feature-pricing/{id}                             admin
    DELETE /api/admin/feature-pricing/{id}                             admin
    GET    /api/admin/usage[?org=&feature=&since=&until=&group_by=&split_by=]  admin
    GET    /api/admin/organizations[?q=], .../{org}, .../{org}/balance-history,
           POST .../{org}/grants                                       admin (organizations.py)
    GET, POST /api/admin/plans; GET, PATCH, DELETE .../plans/{plan_key};
           GET, PUT, DELETE /api/admin/organizations/{org}/subscription  admin (plans.py)
    GET, PUT, DELETE /api/admin/organizations/{org}/auto-topup         admin (topups.py)
    GET    /api/admin/organizations/{org}/members,
           PUT, DELETE .../{org}/members/{member}                      admin (members.py)
    GET    /api/features/pricing[?key=]                                public
    GET    /openapi.json                                               public
    GET    /admin/feature-pricing, /admin/organizations, /admin/plans  admin (the HTML pages)

Paths are relative to wherever the app is mounted, so ``Mount("/{tenant}", admin_app())``
serves ``/acme/api/admin/feature-pricing``.

Why a Starlette app of its own rather than routes added to the host: it brings its own
exception handling (a Litestar host would turn Starlette's HTTPException into a 500),
and one object mounts the same way into Starlette, FastAPI and Litestar.

Every write goes through the guard's pricing methods, so validation is the one in
``models.py``, nothing is written unless the whole request is valid, and the pricing
cache is invalidated here and (PostgreSQL) in every other process at once.

Writes demand ``Content-Type: application/json``: a cross-site form cannot send it
without a CORS preflight, so a signed-in admin's browser cannot be made to change
prices from another site (cookie-based auth stays safe without a CSRF token).
"""

from __future__ import annotations

import html
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, get_args
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from .. import problems
from .._flow import problem_response
from .._guard import CreditGuard
from ..errors import DuplicateFeature, InvalidPricing, PricingNotFound, SchemaMissing, StorageUnavailable
from ..models import (
    FEATURE_KEY_MAX,
    FEATURE_KEY_RE,
    UsageGroup,
    validate_pricing_fields,
)
from ..problems import Problem
from . import members, organizations, plans, topups
from ._http import (
    Refusal,
    json_object,
    parse_bool,
    parse_when,
    public_view,
    refuse_if,
    refuse_unstorable,
)
from .openapi import openapi_document
from .organizations import ORGANIZATIONS_PATH
from .plans import PLANS_PATH

log = logging.getLogger("credit_guard.admin")

#: Is this request an administrator's? True: yes; False: signed in but not (403);
#: None: nobody is signed in (401). May be async.
IsAdmin = Callable[[Request], "bool | Awaitable[bool | None] | None"]

PRICING_PATH = "/api/admin/feature-pricing"
USAGE_PATH = "/api/admin/usage"
PUBLIC_PRICING_PATH = "/api/features/pricing"
OPENAPI_PATH = "/openapi.json"
#: Where the admin app puts the guard it serves with, for the page and host code.
GUARD_SCOPE_KEY = "credit_guard"
#: Seconds browsers and CDNs may reuse the public pricing; a price change shows after this.
PUBLIC_MAX_AGE = 60
USAGE_GROUPS: tuple[str, ...] = get_args(UsageGroup)

_PRIVATE = {"Cache-Control": "no-store"}
_PUBLIC = {"Cache-Control": f"public, max-age={PUBLIC_MAX_AGE}"}

Handler = Callable[[Request, CreditGuard], Awaitable[Response]]


def default_is_admin(request: Request) -> bool | None:
    """The seed's rule: the user on request state (an object or a mapping) has ``is_admin``
    set to exactly True. None when the request carries no user at all."""
    user = getattr(request.state, "user", None)
    if user is None:
        return None
    flag = user.get("is_admin") if isinstance(user, Mapping) else getattr(user, "is_admin", None)
    return flag is True


def get_guard(request: Request) -> CreditGuard:
    """The guard an admin app request is served with (for code running inside the app)."""
    guard = request.scope.get(GUARD_SCOPE_KEY)
    if not isinstance(guard, CreditGuard):
        raise RuntimeError(
            "the credit_guard admin app found no CreditGuard: pass admin_app(guard) or set "
            "app.state.credit_guard on the app it is mounted in"
        )
    return guard


# -- endpoints ---------------------------------------------------------------------------


async def list_pricing(request: Request, guard: CreditGuard) -> Response:
    params = request.query_params
    errors: dict[str, str] = {}
    category = params.get("category")
    if category is not None and not category.strip():
        errors["category"] = "must not be empty"
    active = parse_bool(params.get("active"), "active", errors)
    refuse_if(errors)
    features = await guard.list_pricing(category=category, is_active=active)
    return JSONResponse([f.to_dict() for f in features], headers=_PRIVATE)


async def create_pricing(request: Request, guard: CreditGuard) -> Response:
    fields = validate_pricing_fields(await json_object(request))
    pricing = await guard.create_pricing(**fields)
    log.info("credit_guard admin: created pricing %s (%s credits)", pricing.feature_key, pricing.credits)
    location = request.url.path.rstrip("/") + "/" + quote(pricing.id, safe="")
    return JSONResponse(pricing.to_dict(), status_code=201, headers={**_PRIVATE, "Location": location})


async def get_pricing(request: Request, guard: CreditGuard) -> Response:
    pricing_id = request.path_params["pricing_id"]
    pricing = await guard.get_pricing(pricing_id)
    if pricing is None:
        raise PricingNotFound(pricing_id)
    return JSONResponse(pricing.to_dict(), headers=_PRIVATE)


async def update_pricing(request: Request, guard: CreditGuard) -> Response:
    pricing_id = request.path_params["pricing_id"]
    # Validated before the call: a body key must never reach the method as a keyword of its own.
    fields = validate_pricing_fields(await json_object(request), partial=True)
    pricing = await guard.update_pricing(pricing_id, **fields)
    log.info(
        "credit_guard admin: updated pricing %s (%s)", pricing.feature_key, ", ".join(sorted(fields)) or "no change"
    )
    return JSONResponse(pricing.to_dict(), headers=_PRIVATE)


async def delete_pricing(request: Request, guard: CreditGuard) -> Response:
    pricing = await guard.delete_pricing(request.path_params["pricing_id"])
    log.info("credit_guard admin: deleted pricing %s", pricing.feature_key)
    return Response(status_code=204, headers=_PRIVATE)


async def usage(request: Request, guard: CreditGuard) -> Response:
    params = request.query_params
    errors: dict[str, str] = {}
    group_by = params.get("group_by", "day")
    if group_by not in USAGE_GROUPS:
        errors["group_by"] = f"must be one of {', '.join(USAGE_GROUPS)}"
    split_by = params.get("split_by")
    if split_by is not None and split_by not in USAGE_GROUPS:
        errors["split_by"] = f"must be one of {', '.join(USAGE_GROUPS)}"
    elif split_by is not None and split_by == group_by:
        errors["split_by"] = f"must differ from group_by ({group_by}): each row is split by a second grouping"
    since = parse_when(params.get("since"), "since", errors)
    until = parse_when(params.get("until"), "until", errors)
    refuse_if(errors)
    rows = await guard.usage_report(
        group_by=group_by,  # type: ignore[arg-type]  # checked against USAGE_GROUPS above
        organization_id=params.get("org") or None,
        feature_key=params.get("feature") or None,
        since=since,
        until=until,
        split_by=split_by,  # type: ignore[arg-type]  # checked against USAGE_GROUPS above
    )
    body = {"group_by": group_by, "split_by": split_by, "rows": [row.to_dict() for row in rows]}
    return JSONResponse(body, headers=_PRIVATE)


async def public_pricing(request: Request, guard: CreditGuard) -> Response:
    """What a pricing page needs; active prices only, and none of the admin's fields."""
    key = request.query_params.get("key")
    if key is None:
        groups: dict[str, list[dict[str, Any]]] = {}
        for pricing in await guard.list_pricing(is_active=True):
            groups.setdefault(pricing.category, []).append(public_view(pricing))
        body = {"categories": [{"category": category, "features": features} for category, features in groups.items()]}
        return JSONResponse(body, headers=_PUBLIC)
    if not key:
        refuse_if({"key": "must not be empty"})
    # A key that cannot exist is answered without a lookup, so anonymous requests cannot
    # fill the pricing cache with misses and push real prices out of it.
    found = (
        await guard.get_feature_pricing(key) if len(key) <= FEATURE_KEY_MAX and FEATURE_KEY_RE.fullmatch(key) else None
    )
    if found is None:
        raise Refusal(problems.unknown_feature(key))
    return JSONResponse(public_view(found), headers=_PUBLIC)


async def _check_admin(request: Request, is_admin: IsAdmin) -> Problem | None:
    verdict = is_admin(request)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    if verdict is None:
        return problems.not_authenticated()
    if not verdict:
        return problems.admin_required()
    return None


def _endpoint(handler: Handler, *, is_admin: IsAdmin | None) -> Callable[[Request], Awaitable[Response]]:
    """One handler behind the admin check (unless public), with every failure as problem+json."""

    async def endpoint(request: Request) -> Response:
        guard = get_guard(request)
        try:
            problem = await _check_admin(request, is_admin) if is_admin is not None else None
            if problem is None:
                refuse_unstorable(request)
                return await handler(request, guard)
        except Refusal as refusal:
            problem = refusal.problem
        except InvalidPricing as exc:
            problem = problems.invalid_request(exc.errors, status=422)
        except DuplicateFeature as exc:
            problem = problems.duplicate_feature(exc.feature_key)
        except PricingNotFound as exc:
            problem = problems.pricing_not_found(exc.pricing_id)
        except SchemaMissing:
            problem = problems.schema_missing(guard.retry_after, nothing_was="changed")
        except StorageUnavailable:
            problem = problems.unavailable(guard.retry_after, nothing_was="changed")
        except ValueError as exc:  # an argument the guard refused (an organization id it cannot store)
            problem = problems.invalid_request({"request": str(exc)}, status=422)
        _log_refusal(request, problem)
        response = problem_response(problem)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


def _log_refusal(request: Request, problem: Problem) -> None:
    level = (
        logging.ERROR if problem.status >= 500 else logging.WARNING if problem.status in (401, 403) else logging.INFO
    )
    log.log(
        level, "credit_guard admin: %s %s -> %s %s", request.method, request.url.path, problem.status, problem.detail
    )


def _admin_only_page(
    page: Callable[[Request], Awaitable[Response]], is_admin: IsAdmin, sign_in_url: str | None
) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        problem = await _check_admin(request, is_admin)
        if problem is not None:
            _log_refusal(request, problem)
            if "text/html" in request.headers.get("accept", ""):
                return _sign_in_hint(problem, sign_in_url)  # a browser: a page, not a JSON document
            return problem_response(problem)
        return await page(request)

    return endpoint


def _sign_in_hint(problem: Problem, sign_in_url: str | None) -> HTMLResponse:
    """What a person who opened the admin page without being an administrator reads."""
    link = (
        f'<p><a href="{html.escape(sign_in_url, quote=True)}">Sign in</a> as an administrator, then come back.</p>'
        if sign_in_url
        else "<p>Sign in to this app as an administrator, then open this page again.</p>"
    )
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in: credit_guard admin</title></head>'
        f"<body><main><h1>{html.escape(problem.title)}</h1><p>{html.escape(problem.detail)}</p>{link}</main></body></html>"
    )
    return HTMLResponse(body, status_code=problem.status)


def _page_routes(is_admin: IsAdmin, sign_in_url: str | None) -> list[BaseRoute]:
    """The HTML page, when its module is installed; a page that fails to import is logged,
    not fatal, since the JSON API works without it."""
    try:
        from . import page
    except ImportError as exc:
        if exc.name != f"{__package__}.page":
            log.warning("credit_guard admin: the pricing page is unavailable: %s", exc)
        return []
    routes: list[BaseRoute] = [
        Route(
            getattr(page, "PAGE_PATH", "/admin/feature-pricing"),
            _admin_only_page(page.feature_pricing_page, is_admin, sign_in_url),
            methods=["GET"],
            name="credit_guard_admin_page",
        ),
        Route(
            page.ORGANIZATIONS_PAGE_PATH,
            _admin_only_page(page.organizations_page, is_admin, sign_in_url),
            methods=["GET"],
            name="credit_guard_admin_organizations_page",
        ),
        Route(
            page.PLANS_PAGE_PATH,
            _admin_only_page(page.plans_page, is_admin, sign_in_url),
            methods=["GET"],
            name="credit_guard_admin_plans_page",
        ),
    ]
    static_routes = getattr(page, "static_routes", None)
    if callable(static_routes):
        routes += static_routes()
    return routes


class AdminApp(Starlette):
    """The app :func:`admin_app` returns. Finds its guard before Starlette overwrites
    ``scope["app"]`` with itself, while the host app is still there to ask."""

    def __init__(self, guard: CreditGuard | None, routes: list[BaseRoute]) -> None:
        super().__init__(routes=routes)
        self.guard = guard
        if guard is not None:
            self.state.credit_guard = guard
        #: The top-level paths the routes live under, for hosts that mount by prefix (Litestar).
        self.prefixes: tuple[str, ...] = tuple(dict.fromkeys(_prefix(str(getattr(r, "path", ""))) for r in routes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            guard = self.guard or _host_guard(scope)
            if guard is not None:
                scope[GUARD_SCOPE_KEY] = guard
        await super().__call__(scope, receive, send)


def _prefix(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[: 3 if len(parts) > 3 and parts[1] == "api" else 2])


def _host_guard(scope: Scope) -> CreditGuard | None:
    candidates = (
        scope.get(GUARD_SCOPE_KEY),
        getattr(getattr(scope.get("app"), "state", None), "credit_guard", None),
        # Starlette's lifespan state (``yield {"credit_guard": guard}``) lands here.
        (scope.get("state") or {}).get("credit_guard"),
    )
    return next((c for c in candidates if isinstance(c, CreditGuard)), None)


def admin_app(
    guard: CreditGuard | None = None,
    *,
    is_admin: IsAdmin | None = None,
    openapi_path: str | None = OPENAPI_PATH,
    include_page: bool = True,
    sign_in_url: str | None = None,
) -> AdminApp:
    """The pricing admin API, public pricing endpoint, OpenAPI document and admin page.

    Args:
        guard: the guard to serve; by default the host app's ``app.state.credit_guard``
            (or a lifespan state's ``credit_guard``), looked up per request.
        is_admin: who may use the admin routes (sync or async; True, False for 403,
            None for 401). Default: :func:`default_is_admin`.
        openapi_path: where to serve the OpenAPI document, or None for nowhere. Mounted at
            the root of a FastAPI app, pick another path: FastAPI's own ``/openapi.json``
            answers first.
        include_page: serve the HTML admin page when ``credit_guard.admin.page`` exists.
        sign_in_url: where the page sends a browser that is not signed in as an
            administrator (it gets a short HTML page saying so, not a problem document).
    """
    check = is_admin or default_is_admin

    def route(path: str, name: str, handlers: dict[str, Handler], *, admin: bool = True) -> Route:
        # One Route per path, so a 405 lists every method the path has in ``Allow``.
        endpoints = {method: _endpoint(h, is_admin=check if admin else None) for method, h in handlers.items()}

        async def dispatch(request: Request) -> Response:
            return await endpoints["GET" if request.method == "HEAD" else request.method](request)

        return Route(path, dispatch, methods=list(handlers), name=f"credit_guard_{name}")

    routes: list[BaseRoute] = [
        route(PRICING_PATH, "pricing_list", {"GET": list_pricing, "POST": create_pricing}),
        route(
            PRICING_PATH + "/{pricing_id}",
            "pricing_item",
            {"GET": get_pricing, "PATCH": update_pricing, "DELETE": delete_pricing},
        ),
        route(USAGE_PATH, "usage", {"GET": usage}),
        route(ORGANIZATIONS_PATH, "organizations", {"GET": organizations.find}),
        route(ORGANIZATIONS_PATH + "/{organization_id}", "organization", {"GET": organizations.detail}),
        route(ORGANIZATIONS_PATH + "/{organization_id}/grants", "organization_grants", {"POST": organizations.grant}),
        route(
            ORGANIZATIONS_PATH + "/{organization_id}/balance-history",
            "organization_balance_history",
            {"GET": organizations.balance_history},
        ),
        route(
            ORGANIZATIONS_PATH + "/{organization_id}/subscription",
            "organization_subscription",
            {"GET": plans.get_subscription, "PUT": plans.put_subscription, "DELETE": plans.delete_subscription},
        ),
        route(
            ORGANIZATIONS_PATH + "/{organization_id}/auto-topup",
            "organization_auto_topup",
            {"GET": topups.get_auto_topup, "PUT": topups.put_auto_topup, "DELETE": topups.delete_auto_topup},
        ),
        route(ORGANIZATIONS_PATH + "/{organization_id}/members", "organization_members", {"GET": members.list_members}),
        route(
            ORGANIZATIONS_PATH + "/{organization_id}/members/{member:" + members.MEMBER_CONVERTOR + "}",
            "organization_member",
            {"PUT": members.put_member, "DELETE": members.delete_member},
        ),
        route(PLANS_PATH, "plans", {"GET": plans.list_plans, "POST": plans.create_plan}),
        route(
            PLANS_PATH + "/{plan_key}",
            "plan",
            {"GET": plans.get_plan, "PATCH": plans.update_plan, "DELETE": plans.delete_plan},
        ),
        route(PUBLIC_PRICING_PATH, "public_pricing", {"GET": public_pricing}, admin=False),
    ]
    page_routes = _page_routes(check, sign_in_url) if include_page else []
    with_page = bool(page_routes)
    if openapi_path is not None:

        async def openapi(request: Request) -> Response:
            server = str(request.scope.get("root_path", "")).rstrip("/") or "/"
            return JSONResponse(openapi_document(server_url=server, include_page=with_page))

        routes.append(Route(openapi_path, openapi, methods=["GET"], name="credit_guard_openapi"))
    return AdminApp(guard, routes + page_routes)


__all__ = [
    "GUARD_SCOPE_KEY",
    "OPENAPI_PATH",
    "PLANS_PATH",
    "PRICING_PATH",
    "PUBLIC_PRICING_PATH",
    "USAGE_PATH",
    "AdminApp",
    "IsAdmin",
    "admin_app",
    "default_is_admin",
    "get_guard",
]
