"""Litestar: ``CreditGuardPlugin`` (routes paid by their ``opt``) and ``requires_credits``.

``Litestar(route_handlers=[...], plugins=[CreditGuardPlugin(guard)])`` starts the guard in
the app's lifespan, puts it on ``app.state`` and charges routes whose ``opt`` names a
feature (``@post("/v1/images", opt={"credits": "key"})``) right before their handler, as
the decorator does, through the same flow (``_flow.charge_handler``); a passage around the
request ends the charge at delivery: see ``CreditGuardPlugin``.

The decorator: Litestar hands a handler its request through the reserved keyword ``request``; if the
handler does not ask for it, one is added to ``__signature__`` and popped before the
call. A returned value is wrapped in a ``litestar.Response`` with the route's own status
code and media type, so the credit headers can ride on it. On a route with a
``return_dto``, refusals and idempotent replays are raised past the DTO (``CreditAnswer``)
instead of returned, so it never tries to read them as the handler's model.

Without the plugin the decorator ends a charge by the returned value's status: a ``Stream``
whose body fails after its headers went out is not refunded, and an idempotent replay is
the status and credit headers without the body (Litestar serialises the value after the
decorator returns). Under the plugin, decorated routes get its passage too: they replay
whole and see a stream break, as ``opt`` routes do.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
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

from .._flow import RequiresCredits, Rule, charge_handler, end_returned, outer_ticket, plain_call
from .._guard import CreditGuard
from .._idempotency import Replay
from .._openapi import mark, marked
from .._passage import run_paid
from .._ticket import Ticket
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


class _Binding:
    """What Litestar knows of one request to a paid handler (``_flow.HandlerBinding``).

    ``as_response``: the wrapper declares it returns a Response (the decorator's, whose
    credit headers ride on it); the plugin's wrapper of an ``opt`` route keeps the
    handler's own return type and leaves the headers to the passage around it.
    """

    __slots__ = ("app", "as_response", "request", "scope")

    def __init__(self, request: Request[Any, Any, Any], *, as_response: bool) -> None:
        self.request, self.app = request, request.app
        self.scope: Scope = typing.cast(Scope, request.scope)
        self.as_response = as_response

    async def body(self) -> bytes:
        return await self.request.body()

    def returned(self, result: Any) -> Any:
        return _as_response(self.request, result) if self.as_response else result

    def refusal(self, answer: Problem | Replay) -> Any:
        return _answer(self.request, _Answer(answer))

    async def end(self, ticket: Ticket, result: Any) -> Any:
        """No passage around the request (the decorator without the plugin): ended by the
        returned value's status. Litestar serialises it after the wrapper returns, so a
        stream that breaks later is not seen here (pay for it with the plugin)."""
        response = _as_response(self.request, result)
        status = response.status_code or 200
        if not await end_returned(ticket, status, self.request.receive):  # type: ignore[arg-type]
            await ticket.keep(status)
        for name, value in ticket.headers():
            response.headers[name] = value
        return response


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
        binding = _Binding(request, as_response=True)
        return await charge_handler(binding, guard, rule, plain_call(fn, is_async, args, kwargs))

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
OPT_OPTIONS = ("units", "idempotency", "max_overage", "charge_client_errors", "rate", "rate_by", "on_disconnect")
#: Set in a paid handler's own resolved ``opt`` (by its opt or a decorator): the plugin's
#: middleware runs a passage around its requests.
_PAID_KEY = "credit_guard.paid"


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

    An opt route is charged right before its handler runs (its function is wrapped when
    the route is registered, keeping its signature), after Litestar's guards,
    dependencies and body validation: the app's own refusals come first, as with the
    decorator. A pure ASGI middleware (added after the app's own) runs a passage around
    each request to a paid route (``opt`` or decorator), which ends the charge at delivery:
    a failing status, an exception, a stream that breaks or a client that hangs up is
    refunded, and an idempotent replay is the first response byte for byte. A route that
    also has ``@requires_credits`` is charged once (the decorator sees the charge);
    OPTIONS requests are never charged.
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
                handler.opt[_PAID_KEY] = True  # the middleware runs a passage around it
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
            assert isinstance(handler, HTTPRouteHandler)
            _pay_before(handler, rule, self.guard)

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
    ValueError naming the route and the key for an opt of the wrong shape, or for a value
    ``Rule`` refuses (its checks are the decorator's and the middleware's: one place)."""

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
        return feature
    if not isinstance(feature, str):
        raise bad(TypeError, f"opt {OPT_CREDITS!r} must be a feature key (str) or a Rule, got {type(feature).__name__}")
    # Each option on its own first, so an error names its opt key; then all of them.
    for name, value in [(None, None), *options.items()]:
        try:
            Rule(feature, **({} if name is None else {name: value}))
        except (TypeError, ValueError) as exc:
            raise bad(type(exc), f"opt {OPT_CREDITS if name is None else OPT_PREFIX + name!r}: {exc}") from None
    return Rule(feature, **options)


#: The request a paid ``opt`` route is being handled for, set by the plugin's middleware
#: around the app, read by the route's handler wrapper (Litestar hands a handler only the
#: arguments its signature names, and an ``opt`` route's signature is the app's own).
_CURRENT: ContextVar[tuple[Scope, Receive] | None] = ContextVar("credit_guard_litestar_request", default=None)
#: Marks a handler function the plugin wrapped (a handler registered twice is wrapped once).
_WRAPPED = "__credit_guard_paid__"


def _pay_before(handler: HTTPRouteHandler, rule: Rule, guard: CreditGuard) -> None:
    """Charge an ``opt`` route right before its handler runs: after Litestar's guards,
    dependencies, ``before_request`` and body validation (so the app's own 400, 401, 403
    come first, and a 402 never tells a non-member whether a team has credits), as the
    decorator does. The handler function is wrapped in place, keeping its signature, so
    Litestar's parameters, DTOs and OpenAPI are unchanged; it ends in the passage the
    plugin's middleware runs around the request."""
    fn = handler.fn
    if getattr(fn, _WRAPPED, False):
        return
    inline = handler.has_sync_callable  # Litestar would call it on the loop, unawaited

    async def call_inline(kwargs: dict[str, Any]) -> Any:
        return fn(**kwargs)

    @functools.wraps(fn)
    async def paid(**kwargs: Any) -> Any:
        current = _CURRENT.get()
        if current is None:  # never free: a paid route handled outside the plugin's middleware
            raise RuntimeError(f"credit_guard: {_where(handler)} is paid by its opt, but the plugin did not run")
        scope, receive = current
        request = handler.resolve_request_class()(scope, receive)  # type: ignore[arg-type]
        call = functools.partial(call_inline, kwargs) if inline else functools.partial(fn, **kwargs)
        return await charge_handler(_Binding(request, as_response=False), guard, rule, call)

    setattr(paid, _WRAPPED, True)
    handler._fn = paid
    handler.has_sync_callable = False


class _PaidRoutes:
    """The plugin's middleware: a passage (``_passage.run_paid``) around each request to a
    paid route, which its handler's charge ends at delivery: credit headers on the
    response, a refund for a failing status, an exception, a stream that breaks or a client
    that hangs up, and an idempotent response recorded whole for its replays.

    Pure ASGI; per-request state lives in the passage, never here. Everything else
    (unpaid routes, OPTIONS, websockets, a request a guard further out already charged)
    goes straight through.
    """

    def __init__(self, app: ASGIApp, *, guard: CreditGuard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = scope.get("route_handler")
        paid = (
            scope["type"] == "http"
            and scope.get("method") != "OPTIONS"
            and isinstance(getattr(handler, "opt", None), Mapping)
            and handler.opt.get(_PAID_KEY) is True  # type: ignore[union-attr]
        )
        if not paid or outer_ticket(scope) is not None:
            await self.app(scope, receive, send)
            return
        token = _CURRENT.set((scope, receive))
        try:
            await run_paid(None, self.app, scope, receive, send)
        finally:
            _CURRENT.reset(token)
