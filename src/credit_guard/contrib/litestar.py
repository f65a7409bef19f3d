"""``requires_credits`` for Litestar handlers.

Litestar hands a handler its request through the reserved keyword ``request``; if the
handler does not ask for it, one is added to ``__signature__`` and popped before the
call. A returned value is wrapped in a ``litestar.Response`` with the route's own status
code and media type, so the credit headers can ride on it. On a route with a
``return_dto``, refusals and idempotent replays are raised past the DTO (``CreditAnswer``)
instead of returned, so it never tries to read them as the handler's model.

Streaming: a ``Stream`` whose body fails after its headers went out is not refunded by
the decorator; put such routes under ``CreditGuardMiddleware``, which sees the failure.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.utils.scope.state import ScopeState

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
    wants_body,
)
from .._guard import CreditGuard
from .._idempotency import Replay
from .._ticket import Ticket
from ..problems import Problem

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

    The handler for CreditAnswer is added to this request's own copy of the exception
    handlers Litestar resolved for the route, so the app needs no registration.
    """
    if request.route_handler.resolve_return_dto() is None:
        return response
    state = ScopeState.from_scope(request.scope)
    handlers = state.exception_handlers
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
    return typing.cast(F, wrapper)


#: ``requires_credits`` for Litestar handlers (options as for ``credit_guard.requires_credits``).
requires_credits = RequiresCredits(decorate_litestar)
