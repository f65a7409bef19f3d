"""Litestar: ``CreditGuardPlugin`` (routes paid by their ``opt``) and ``requires_credits``.

``Litestar(route_handlers=[...], plugins=[CreditGuardPlugin(guard)])`` starts the guard in
the app's lifespan, puts it on ``app.state`` and charges routes whose ``opt`` names a
feature (``@post("/v1/images", opt={"credits": "key"})``) around everything Litestar does
for them, through the same flow as ``CreditGuardMiddleware``: see ``CreditGuardPlugin``.

The decorator: Litestar hands a handler its request through the reserved keyword ``request``; if the
handler does not ask for it, one is added to ``__signature__`` and popped before the
call. A returned value is wrapped in a ``litestar.Response`` with the route's own status
code and media type, so the credit headers can ride on it. On a route with a
``return_dto``, refusals and idempotent replays are raised past the DTO (``CreditAnswer``)
instead of returned, so it never tries to read them as the handler's model.

Streaming: a ``Stream`` whose body fails after its headers went out is not refunded by
the decorator; pay for such routes by ``opt`` (or ``CreditGuardMiddleware``), which sees
the failure. Its idempotent replays are the status and credit headers, without the body
(Litestar serialises the value after the decorator returns); ``opt`` routes replay it all.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any, TypeVar

from litestar import Litestar, Request, Response
from litestar.config.app import AppConfig
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol
from litestar.plugins.base import ReceiveRoutePlugin
from litestar.routes import BaseRoute, HTTPRoute, WebSocketRoute
from litestar.utils.scope.state import ScopeState
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import problems
from .._flow import (
    RequiresCredits,
    Rule,
    call_paid,
    call_plain,
    end_returned,
    find_guard,
    open_charge,
    outer_ticket,
    put_on_request,
    run_paid,
    wants_body,
)
from .._guard import CreditGuard
from .._idempotency import Replay
from .._openapi import mark, marked
from .._ticket import Ticket
from .._units import UnitsOf, units_value
from ..middleware import BodyTooLarge, ClientDisconnected, read_body
from ..models import FEATURE_KEY_MAX, FEATURE_KEY_RE
from ..problems import Problem
from ._litestar_openapi import credit_operation

F = TypeVar("F", bound=Callable[..., Any])


class _Answer(Response[bytes]):
    """A refusal or a replay as the Litestar Response a handler returns: Litestar sends
    what ``to_asgi_response`` gives, and the problem or replay sends itself."""

    def __init__(self, answer: Problem | Replay) -> None:
        super().__init__(content=b"", status_code=answer.status)
        self.answer = answer

    def to_asgi_response(self, app: Any, request: Any, **kwargs: Any) -> Any:
        return self.answer


class CreditAnswer(HTTPException):
    """Carries a refusal or a replay past a route's return DTO.

    Litestar hands whatever a handler with ``return_dto`` returns to that DTO, which would
    try to read a problem document or a stored response as the handler's model (and fail
    with a 500). An exception skips the DTO; ``_answer_directly`` sends its response as is.
    """

    def __init__(self, response: Response[Any]) -> None:
        super().__init__(status_code=response.status_code, detail="credit_guard answered this request")
        self.response = response


def _answer_directly(request: Request[Any, Any, Any], exc: CreditAnswer) -> Response[Any]:
    return exc.response


def _answer(request: Request[Any, Any, Any], response: Response[Any]) -> Response[Any]:
    """Return ``response``, or raise it past the route's return DTO if it has one.

    ``CreditGuardPlugin`` registers the handler for CreditAnswer app-wide; without it, the
    handler is added to this request's own copy of the exception handlers Litestar resolved
    for the route, so an app without the plugin needs no registration either.
    """
    if request.route_handler.resolve_return_dto() is None:
        return response
    state = ScopeState.from_scope(request.scope)
    handlers = state.exception_handlers
    if not (isinstance(handlers, Mapping) and CreditAnswer in handlers):  # else CreditGuardPlugin registered it
        state.exception_handlers = {
            **(handlers if isinstance(handlers, Mapping) else {}),
            CreditAnswer: _answer_directly,
        }
    raise CreditAnswer(response)


def _as_response(request: Request[Any, Any, Any], result: Any) -> Response[Any]:
    """A handler's answer as a Response (the wrapper declares it returns one): a plain
    value gets the route's own status code and media type."""
    if isinstance(result, Response):
        return result
    handler: HTTPRouteHandler = request.scope["route_handler"]  # type: ignore[assignment]
    return Response(content=result, status_code=handler.status_code, media_type=handler.media_type)


def _declared_return(fn: Callable[..., Any]) -> Any:
    """The handler's declared return type, resolved, when it is a plain value type (not a
    Response already, and resolvable now); None leaves the annotation as it is."""
    try:
        returns = typing.get_type_hints(fn).get("return")
    except Exception:  # a forward reference that cannot be resolved yet: leave it to Litestar
        return None
    if returns is None or returns is type(None):
        return None
    origin = typing.get_origin(returns) or returns
    if isinstance(origin, type) and issubclass(origin, Response):
        return None
    return returns


def decorate_litestar(fn: F, rule: Rule, guard: CreditGuard | None) -> F:
    signature = inspect.signature(fn)
    asks_for_request = "request" in signature.parameters
    params = list(signature.parameters.values())
    if not asks_for_request:
        param = inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
            params.insert(len(params) - 1, param)
        else:
            params.append(param)
    is_async = inspect.iscoroutinefunction(fn)

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        request: Request[Any, Any, Any] = kwargs["request"] if asks_for_request else kwargs.pop("request")
        if outer_ticket(request.scope) is not None:  # an outer guard charged it and ends its ticket
            return _as_response(request, await call_plain(fn, is_async, args, kwargs))
        active = find_guard(guard, request.app)
        if isinstance(active, Problem):
            return _answer(request, _Answer(active))
        body = await request.body() if wants_body(active, rule, request.scope) else None
        outcome = await open_charge(active, rule, request.scope, request, body)
        if not isinstance(outcome, Ticket):
            return _answer(request, _Answer(outcome))
        put_on_request(request.scope, outcome)  # type: ignore[arg-type]
        result = _as_response(request, await call_paid(outcome, fn, is_async, args, kwargs))
        status = result.status_code or 200
        if not await end_returned(outcome, status, request.receive):  # type: ignore[arg-type]
            await outcome.keep(status)
        for name, value in outcome.headers():
            result.headers[name] = value
        return result

    annotations = dict(getattr(fn, "__annotations__", {}))
    if not asks_for_request:
        annotations["request"] = Request
    returns = _declared_return(fn)
    if returns is not None:
        # The wrapper always returns a Response (the credit headers ride on it), so say
        # so: Litestar then applies a return DTO to its content, and OpenAPI still shows
        # the handler's own model.
        annotations["return"] = Response[returns]  # type: ignore[valid-type]
        signature = signature.replace(return_annotation=annotations["return"])
    wrapper.__annotations__ = annotations
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    mark(wrapper, rule, guard)  # seen by CreditGuardPlugin (its checks and OpenAPI)
    return typing.cast(F, wrapper)


#: ``requires_credits`` for Litestar handlers (options as for ``credit_guard.requires_credits``).
requires_credits = RequiresCredits(decorate_litestar)


# -- CreditGuardPlugin: the Litestar-native wiring ---------------------------------------------

#: The route ``opt`` key naming the feature a route pays for (``opt={"credits": "key"}``).
OPT_CREDITS = "credits"
#: Prefix of the route ``opt`` keys for the rest of a route's options (``credits_units``...).
OPT_PREFIX = "credits_"
#: The options after the prefix, as ``requires_credits`` takes them.
OPT_OPTIONS = ("units", "idempotency", "max_overage", "charge_client_errors")
#: Where the plugin keeps a route's checked ``Rule``, in that handler's own resolved ``opt``.
_RULE_KEY = "credit_guard.rule"


class CreditGuardPlugin(InitPluginProtocol, ReceiveRoutePlugin):
    """``Litestar(route_handlers=[...], plugins=[CreditGuardPlugin(guard)])``.

    - the guard is started in the app's lifespan, on the loop that serves it, and closed at
      shutdown (a new loop each time is fine: a ``TestClient`` per test module); if the
      app's own code already started it on that loop, starting and closing it stay its job;
    - the guard is ``app.state.credit_guard``, where ``@requires_credits`` finds it;
    - routes pay through their ``opt``: ``@post("/v1/images", opt={"credits": "key"})``,
      with ``credits_units`` (a number, or a callable of the Litestar request as for the
      decorator), ``credits_idempotency``, ``credits_max_overage`` and
      ``credits_charge_client_errors``; or ``opt={"credits": Rule(...)}``. A Router's or
      Controller's opt applies to its routes, and ``"credits": None`` opts one out. They are
      checked as the app is built: a bad value fails then, naming the route.

    An opt route is charged by a pure ASGI middleware added after the app's own middleware
    (put auth there, it runs first), around everything Litestar does for the route:
    ``_flow.run_paid``, as ``CreditGuardMiddleware``, so a failing status, an exception, a
    stream that breaks or a client that hangs up is refunded, and an idempotent replay is
    the first response byte for byte. A route that also has ``@requires_credits`` is
    charged once (the decorator sees the charge); OPTIONS requests are never charged.
    """

    __slots__ = ("create_schema", "guard")

    def __init__(self, guard: CreditGuard, *, create_schema: bool = False) -> None:
        """``create_schema``: run ``guard.create_schema()`` at startup, before ``start()``."""
        self.guard = guard
        self.create_schema = create_schema

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.state["credit_guard"] = self.guard
        app_config.lifespan.insert(0, self._lifespan)  # first in, last out: the app's own lifespan sees it running
        app_config.middleware.append(DefineMiddleware(typing.cast(Any, _PaidRoutes), guard=self.guard))
        app_config.exception_handlers.setdefault(CreditAnswer, _answer_directly)
        return app_config

    def receive_route(self, route: BaseRoute) -> None:
        """Check each handler's credit options as it is registered, and keep its Rule."""
        handlers = route.route_handlers if isinstance(route, HTTPRoute) else [route.route_handler]  # type: ignore[attr-defined]
        for handler in handlers:
            if isinstance(handler, HTTPRouteHandler) and handler.http_methods <= {"OPTIONS"}:
                continue  # a preflight, or Litestar's own OPTIONS handler inheriting a Router's opt
            rule = rule_from_opt(handler.opt, _where(handler))
            found = marked(handler.fn)
            if isinstance(handler, HTTPRouteHandler) and (rule or found):
                paid, own_guard = (rule, self.guard) if rule is not None else found  # type: ignore[misc]
                handler.operation_class = credit_operation(handler.operation_class, paid, own_guard or self.guard)
            if rule is None:
                continue
            if isinstance(route, WebSocketRoute):
                raise ValueError(
                    f"credit_guard: {_where(handler)}: opt {OPT_CREDITS!r} is for HTTP routes, not websockets"
                )
            decorated = found[0] if found is not None else None
            if decorated is not None and decorated.feature_key != rule.feature_key:
                raise ValueError(
                    f"credit_guard: {_where(handler)} pays for {rule.feature_key!r} by its opt and for"
                    f" {decorated.feature_key!r} by @requires_credits: a request is charged once, so keep one"
                )
            handler.opt[_RULE_KEY] = rule

    @asynccontextmanager
    async def _lifespan(self, app: Litestar) -> AsyncIterator[None]:
        guard = self.guard
        if guard.started:  # started by the app's own code on this loop: it closes it too
            yield
            return
        if self.create_schema:
            await guard.create_schema()
        await guard.start()
        try:
            yield
        finally:
            if guard.started:  # unless the app's own lifespan closed it already (`async with guard:`)
                await guard.close()


def _where(handler: BaseRouteHandler) -> str:
    methods = " ".join(sorted(getattr(handler, "http_methods", ()))) or "ASGI"
    return f"{methods} {', '.join(sorted(handler.paths))} ({handler})"


def rule_from_opt(opt: Mapping[str, Any], where: str = "route") -> Rule | None:
    """A route's ``Rule`` from its Litestar ``opt``, None when it is free; TypeError or
    ValueError, naming the route and the key, for anything ``requires_credits`` would refuse."""

    def bad(kind: type[Exception], why: str) -> Exception:
        return kind(f"credit_guard: {where}: {why}")

    feature = opt.get(OPT_CREDITS)
    options = {name[len(OPT_PREFIX) :]: value for name, value in opt.items() if name.startswith(OPT_PREFIX)}
    unknown = sorted(OPT_PREFIX + name for name in set(options) - set(OPT_OPTIONS))
    if unknown:
        known = ", ".join(OPT_PREFIX + name for name in OPT_OPTIONS)
        raise bad(ValueError, f"unknown opt key {', '.join(map(repr, unknown))} (known: {OPT_CREDITS}, {known})")
    if feature is None:
        if options and OPT_CREDITS not in opt:
            raise bad(ValueError, f"opt {', '.join(OPT_PREFIX + n for n in options)} without {OPT_CREDITS!r}")
        return None
    if isinstance(feature, Rule):
        if options:
            raise bad(ValueError, f"opt {OPT_CREDITS!r} is a Rule: give its options to the Rule, not as credits_* keys")
        given: Rule = feature
        feature = given.feature_key
        options = {
            "units": given.units,
            "idempotency": given.idempotency,
            "max_overage": given.max_overage,
            "charge_client_errors": given.charge_client_errors,
        }
    if not isinstance(feature, str):
        raise bad(TypeError, f"opt {OPT_CREDITS!r} must be a feature key (str) or a Rule, got {type(feature).__name__}")
    if len(feature) > FEATURE_KEY_MAX or not FEATURE_KEY_RE.fullmatch(feature):
        raise bad(ValueError, f"opt {OPT_CREDITS!r} is not a feature key (lowercase snake_case, <= 64): {feature!r}")
    units = options.get("units")
    if units is not None and not callable(units):
        try:
            units = _fixed_units(units_value(units))
        except ValueError as exc:
            raise bad(ValueError, f"opt 'credits_units' must be a number or a callable of the request: {exc}") from None
    idempotency = options.get("idempotency")
    if idempotency not in (None, True, False, "required"):
        raise bad(ValueError, f"opt 'credits_idempotency' must be True, False or 'required', got {idempotency!r}")
    max_overage = options.get("max_overage")
    if max_overage is not None and (
        isinstance(max_overage, bool) or not isinstance(max_overage, int | float) or not 0 <= max_overage <= 100
    ):
        raise bad(ValueError, f"opt 'credits_max_overage' must be a share from 0 to 100, got {max_overage!r}")
    client_errors = options.get("charge_client_errors")
    if client_errors is not None and not isinstance(client_errors, bool):
        raise bad(TypeError, f"opt 'credits_charge_client_errors' must be a bool, got {client_errors!r}")
    return Rule(feature, units, idempotency, max_overage, client_errors)


def _fixed_units(count: Decimal) -> UnitsOf:
    def units(request: Any) -> Decimal:
        return count

    return units


class _PaidRoutes:
    """The plugin's middleware: charges routes whose opt names a feature (``rule_from_opt``).

    Pure ASGI, per-request state in the flow's responder, never here. Everything else
    (unpaid routes, OPTIONS, websockets, a request a guard further out already charged)
    goes straight through.
    """

    def __init__(self, app: ASGIApp, *, guard: CreditGuard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = scope.get("route_handler")
        rule = _rule_of(handler) if scope["type"] == "http" and scope.get("method") != "OPTIONS" else None
        if rule is None or outer_ticket(scope) is not None:
            await self.app(scope, receive, send)
            return
        guard = self.guard
        body = None
        if wants_body(guard, rule, scope):
            try:
                body, receive = await read_body(receive, guard.idempotency_max_request_body)
            except ClientDisconnected:
                return
            except BodyTooLarge:
                await problems.request_too_large(guard.idempotency_max_request_body)(scope, receive, send)
                return
        request_class = handler.resolve_request_class() if isinstance(handler, HTTPRouteHandler) else Request
        request = request_class(scope, receive)  # type: ignore[arg-type]  # for resolvers and units, as the decorator's
        outcome = await open_charge(guard, rule, scope, request, body)
        if isinstance(outcome, Ticket):
            await run_paid(outcome, self.app, scope, receive, send)
        else:  # a refusal or a replay: each sends itself
            await outcome(scope, receive, send)


def _rule_of(handler: Any) -> Rule | None:
    """The Rule the plugin checked for this handler; an opt it somehow did not see (Litestar
    resolved the handler's opt again) is read now rather than served free."""
    opt = getattr(handler, "opt", None)
    if not opt:
        return None
    rule = opt.get(_RULE_KEY)
    if isinstance(rule, Rule):
        return rule
    return rule_from_opt(opt, _where(handler)) if opt.get(OPT_CREDITS) is not None else None
