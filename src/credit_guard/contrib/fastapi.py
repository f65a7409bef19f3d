"""OpenAPI for FastAPI routes that cost credits: ``document_credits(app)``.

FastAPI builds an operation from the route's own arguments (``responses=``...), which a
decorator placed below ``@app.post`` cannot reach, and the middleware's rules are not
routes at all. So one call, anywhere after ``app = FastAPI(...)``, wraps ``app.openapi``:
whenever FastAPI builds its document (lazily, on the first ``/openapi.json`` or
``app.openapi()``), the operations of routes guarded by ``@requires_credits`` and by
``CreditGuardMiddleware`` rules (found in ``app.user_middleware``, or passed as
``rules=``) get the 402/401/403/503 problem responses, the ``X-Credits-*`` headers, the
``Idempotency-Key`` parameter where it is honoured, and the ``x-credit-guard`` extension
(``credit_guard._openapi``). Routes added after the call, and included routers, count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import fastapi.openapi.utils
import fastapi.routing
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Mount

from .._endpoints import CHECK_PATH, CreditEndpoints
from .._flow import Rule
from .._guard import CreditGuard
from .._openapi import document_operation, marked, rule_specs
from ..middleware import CreditGuardMiddleware

_DOCUMENTED = "__credit_guard_documented__"


def document_credits(
    app: FastAPI, *, guard: CreditGuard | None = None, rules: Mapping[str, str | Rule] | None = None
) -> FastAPI:
    """Make ``app``'s OpenAPI document show what its paid routes cost and answer.

    ``guard`` decides the routes whose ``idempotency`` follows the guard's default (else
    the guard on ``app.state.credit_guard`` when the document is built, else "off").
    ``rules``: middleware rules to document besides those of the ``CreditGuardMiddleware``
    added to ``app``. Returns ``app``; calling it again changes nothing.
    """
    build: Callable[[], dict[str, Any]] = app.openapi
    if getattr(build, _DOCUMENTED, False):
        return app

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = build()
        _document(app, document, guard, rules)
        return document

    setattr(openapi, _DOCUMENTED, True)
    app.openapi = openapi  # type: ignore[method-assign]
    app.openapi_schema = None
    return app


def _document(
    app: FastAPI, document: dict[str, Any], guard: CreditGuard | None, rules: Mapping[str, str | Rule] | None
) -> None:
    fallback = guard or getattr(app.state, "credit_guard", None)
    by_rule: dict[tuple[str, str], tuple[Rule, CreditGuard | None]] = {}
    for middleware in app.user_middleware:
        options: dict[str, Any] = dict(middleware.kwargs)
        if middleware.cls is CreditGuardMiddleware and isinstance(options.get("rules"), Mapping):  # type: ignore[comparison-overlap]
            own = options.get("guard")
            for key, rule in rule_specs(options["rules"].items()).items():
                by_rule[key] = (rule, own if isinstance(own, CreditGuard) else None)
    for key, rule in rule_specs((rules or {}).items()).items():
        by_rule[key] = (rule, fallback)
    check_url = _check_url(app)
    paths: dict[str, Any] = document.get("paths", {})
    for path, methods, endpoint in _api_routes(app):
        decorated = marked(endpoint)
        for method in methods:
            paid = decorated or by_rule.get((method.lower(), path))
            operation = paths.get(path, {}).get(method.lower())
            if paid is None or not isinstance(operation, dict):
                continue
            rule, own_guard = paid
            document_operation(document, operation, rule, own_guard or fallback, check_url)


def _api_routes(app: FastAPI) -> Iterator[tuple[str, set[str], Any]]:
    """(OpenAPI path, methods, endpoint) of each documented route, included routers too.

    FastAPI before 0.137 copied an included router's routes into ``app.routes``; since, it
    keeps the router as one entry (``_IncludedRouter``), walked by ``iter_route_contexts``
    (0.140+) or by ``_iter_routes_with_context`` with ``_get_api_route_for_openapi`` (0.137-0.139).
    """
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is not None:
        for context in contexts(app.routes):
            route = getattr(context, "original_route", context)
            if isinstance(route, APIRoute) and route.include_in_schema:
                yield context.path_format, set(context.methods or ()), context.endpoint
        return
    pairs = getattr(fastapi.routing, "_iter_routes_with_context", None)
    effective = getattr(fastapi.openapi.utils, "_get_api_route_for_openapi", None)
    if pairs is not None and effective is not None:
        for route, context in pairs(app.routes):
            api_route = effective(route, context)
            if isinstance(route, APIRoute) and api_route is not None and api_route.include_in_schema:
                yield api_route.path_format, set(api_route.methods or ()), route.endpoint
        return
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            yield route.path_format, set(route.methods or ()), route.endpoint


def _check_url(app: FastAPI) -> str | None:
    """The check URL of ``credit_endpoints`` mounted on ``app`` (``/api/credits/check``), if any."""
    for route in app.routes:
        if isinstance(route, Mount) and isinstance(route.app, CreditEndpoints):
            return route.path.rstrip("/") + CHECK_PATH
    return None


__all__ = ["document_credits"]
