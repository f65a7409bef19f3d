"""``requires_credits`` for Starlette and FastAPI handlers.

The handler's signature is kept, so ``Depends``, path and query parameters and Pydantic
bodies keep working. If the handler declares no ``Request`` parameter, a keyword-only one
is added to ``__signature__`` (and popped before the call); likewise a ``Response``
parameter, which is how FastAPI lets a handler that returns a plain dict or model still
carry the credit headers, and a ``BackgroundTasks`` one, whose first task keeps such a
ticket once FastAPI has validated and sent the response (``_keep_on_delivery``).
Parameters are found by annotation, never by name alone (the complaint users have about
slowapi). The money steps are the request flow's (``credit_guard._flow``).

Import ``requires_credits`` from here where a module imports both Litestar and
Starlette/FastAPI and ``credit_guard.requires_credits`` cannot tell which one a handler is for.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

import anyio
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._flow import AsgiResponse, RequiresCredits, Rule, charge_handler, end_returned, plain_call
from .._guard import CreditGuard
from .._idempotency import Replay
from .._openapi import mark
from .._passage import run_paid
from .._ticket import Ticket
from ..problems import Problem

F = TypeVar("F", bound=Callable[..., Any])

_REQUEST_PARAM = "credit_guard_request"
_RESPONSE_PARAM = "credit_guard_response"
_TASKS_PARAM = "credit_guard_tasks"


class _PaidResponse(Response):
    """The handler's own response, sent through the flow's ``run_paid`` so that a 4xx/5xx,
    or a stream that breaks after its headers, is refunded at the moment it happens."""

    def __init__(self, ticket: Ticket, inner: Response) -> None:
        self._ticket, self._inner = ticket, inner
        self.status_code = inner.status_code

    @property
    def background(self) -> Any:
        return self._inner.background

    @background.setter
    def background(self, value: Any) -> None:
        self._inner.background = value

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._inner.raw_headers

    @raw_headers.setter
    def raw_headers(self, value: list[tuple[bytes, bytes]]) -> None:
        self._inner.raw_headers = value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await run_paid(self._ticket, self._inner, scope, receive, send)


def decorate_starlette(fn: F, rule: Rule | str, guard: CreditGuard | None) -> F:
    rule = rule if isinstance(rule, Rule) else Rule(rule)
    signature = _resolved(inspect.signature(fn), fn)
    hints = type_hints(fn)
    request_name = _param_of_type(signature, hints, HTTPConnection) or (
        "request" if "request" in signature.parameters and "request" not in hints else None
    )
    # A handler already decorated (stacked decorators) declares ours: pass them through.
    request_name = request_name or (_REQUEST_PARAM if _REQUEST_PARAM in signature.parameters else None)
    response_name = _param_of_type(signature, hints, Response) or (
        _RESPONSE_PARAM if _RESPONSE_PARAM in signature.parameters else None
    )
    tasks_name = _param_of_type(signature, hints, BackgroundTasks) or (
        _TASKS_PARAM if _TASKS_PARAM in signature.parameters else None
    )
    params = list(signature.parameters.values())
    extra = []
    if tasks_name is None:
        extra.append(inspect.Parameter(_TASKS_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=BackgroundTasks))
    if request_name is None:
        extra.append(inspect.Parameter(_REQUEST_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Request))
    if response_name is None:
        extra.append(inspect.Parameter(_RESPONSE_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=Response))
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params[-1:-1] = extra
    else:
        params += extra
    is_async = inspect.iscoroutinefunction(fn)

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        request = kwargs.pop(_REQUEST_PARAM, None) if request_name is None else kwargs.get(request_name)
        sub_response = kwargs.pop(_RESPONSE_PARAM, None) if response_name is None else kwargs.get(response_name)
        tasks = kwargs.pop(_TASKS_PARAM, None) if tasks_name is None else kwargs.get(tasks_name)
        if request is None:
            # Plain Starlette calls endpoint(request) positionally (or method(self, request)).
            request = next((arg for arg in args if isinstance(arg, HTTPConnection)), None)
        if request is None:
            raise RuntimeError(f"requires_credits: {fn.__qualname__} was called without a request")
        binding = _Binding(request, sub_response, tasks)
        return await charge_handler(binding, guard, rule, plain_call(fn, is_async, args, kwargs))

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    mark(wrapper, rule, guard)
    return typing.cast(F, wrapper)


class _Binding:
    """What Starlette/FastAPI know of one request to a paid handler (``_flow.HandlerBinding``)."""

    __slots__ = ("app", "request", "scope", "sub_response", "tasks")

    def __init__(self, request: HTTPConnection, sub_response: Response | None, tasks: BackgroundTasks | None) -> None:
        self.request, self.scope, self.app = request, request.scope, request.app
        self.sub_response, self.tasks = sub_response, tasks

    async def body(self) -> bytes:
        return await self.request.body() if isinstance(self.request, Request) else b""

    def returned(self, result: Any) -> Any:
        return result

    def refusal(self, answer: Problem | Replay) -> Any:
        return AsgiResponse(answer)

    async def end(self, ticket: Ticket, result: Any) -> Any:
        if isinstance(result, Response):
            # Sent through the passage: a 4xx/5xx, or a stream that breaks after its
            # headers, is refunded at the moment it happens.
            return _PaidResponse(ticket, result)
        # FastAPI serialises a returned value itself; its status and headers come from the
        # sub-response it handed us (status_code None there means the route's default).
        status = (
            getattr(self.sub_response, "status_code", None)
            or getattr(self.scope.get("route"), "status_code", None)
            or 200
        )
        if not await end_returned(ticket, status, getattr(self.request, "receive", None)) and not _keep_on_delivery(
            ticket, self.scope, self.tasks, status
        ):
            await ticket.keep(status)
        if self.sub_response is not None:
            for name, value in ticket.headers():
                self.sub_response.headers[name] = value
        return result


def _keep_on_delivery(ticket: Ticket, scope: Scope, tasks: BackgroundTasks | None, status: int) -> bool:
    """Keep a FastAPI plain-value answer's charge held until its response is delivered.

    FastAPI validates and serialises the returned value (``response_model``), runs the
    exit code of function-scoped ``yield`` dependencies and sends the response only after
    the handler returns; any of them can still fail with a 500 the client did not get
    its money's worth from. So the ticket is kept by a task put *first* in the request's
    background tasks (they run only after the last body byte is sent, and the app's own
    tasks come after: their failures stay charged, as everywhere), and an exit callback on
    FastAPI's request-scoped exit stack refunds it if an exception got there first. False
    when the request does not come from FastAPI's request handler (keep it now).
    """
    # FastAPI 0.118+ (the floor: before it, no stack of the request reached the endpoint).
    stack = scope.get("fastapi_inner_astack")
    if tasks is None or not isinstance(stack, AsyncExitStack):
        return False

    async def delivered() -> None:
        await ticket.keep(status)

    async def on_exit(
        exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if not ticket.ended:
            with anyio.CancelScope(shield=True):
                if exc is None:  # sent without running its background tasks: a custom response class
                    await ticket.keep(status)
                else:
                    await ticket.refund(f"response failed: {type(exc).__name__}")
        return False

    tasks.tasks.insert(0, BackgroundTask(delivered))
    stack.push_async_exit(on_exit)
    return True


def _resolved(signature: inspect.Signature, fn: Callable[..., Any]) -> inspect.Signature:
    """``signature`` with its string annotations (``from __future__ import annotations``)
    resolved in the handler's own module. The wrapper lives in this module, so a framework
    that resolves the wrapper's strings against the wrapper's globals (FastAPI before 0.1xx
    did) would not find ``JSONResponse`` or the app's models; resolved types need no lookup.
    Annotations that cannot be resolved yet stay strings, as before."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:
        return signature
    params = [
        p.replace(annotation=hints[p.name]) if isinstance(p.annotation, str) and p.name in hints else p
        for p in signature.parameters.values()
    ]
    returns = signature.return_annotation
    if isinstance(returns, str) and "return" in hints:
        returns = hints["return"]
    return signature.replace(parameters=params, return_annotation=returns)


def type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to what is concrete
        return {k: v for k, v in getattr(fn, "__annotations__", {}).items() if not isinstance(v, str)}


def _param_of_type(signature: inspect.Signature, hints: dict[str, Any], base: type) -> str | None:
    for name in signature.parameters:
        hint = hints.get(name)
        if isinstance(hint, type) and issubclass(hint, base):
            return name
    return None


#: ``requires_credits`` for Starlette/FastAPI handlers (options as for ``credit_guard.requires_credits``).
requires_credits = RequiresCredits(decorate_starlette)
