"""``@requires_credits``: charge for one route handler, on Starlette, FastAPI or Litestar.

For Starlette and FastAPI the handler's signature is kept, so ``Depends``, path and query
parameters and Pydantic bodies keep working. If the handler declares no ``Request``
parameter, a keyword-only one is added to ``__signature__`` (and popped before the call);
likewise a ``Response`` parameter, which is how FastAPI lets a handler that returns a
plain dict or model still carry the credit headers, and a ``BackgroundTasks`` one, whose
first task settles such a charge once FastAPI has validated and sent the response (see
``_settle_on_delivery``). Parameters are found by annotation, never by name alone (the
complaint users have about slowapi).

Litestar handlers are recognised by their annotations or module and handed to
``credit_guard.contrib.litestar``; import ``requires_credits`` from there to be explicit.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
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

from . import problems
from .asgi import Rule, client_gone, run_charged
from .guard import TICKET_SCOPE_KEY, CreditGuard, IdempotencyMode, Ticket, UnitsOf, current_ticket
from .idempotency import Replay
from .problems import PROBLEM_CONTENT_TYPE, Problem

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("credit_guard")

_REQUEST_PARAM = "credit_guard_request"
_RESPONSE_PARAM = "credit_guard_response"
_TASKS_PARAM = "credit_guard_tasks"


def requires_credits(
    feature_key: str,
    *,
    guard: CreditGuard | None = None,
    units: UnitsOf | None = None,
    idempotency: IdempotencyMode | None = None,
    max_overage: float | None = None,
    charge_client_errors: bool | None = None,
) -> Callable[[F], F]:
    """Charge ``feature_key``'s price before the handler runs; refund if it fails.

    The guard is ``guard=`` or ``request.app.state.credit_guard``. Put the decorator
    *below* the framework's route decorator (``@app.post(...)`` / ``@post(...)``).

    ``units``: a callable of the request returning how many units this call reserves
    (seconds of video...): the price is multiplied by it, rounded up, and charged before
    the handler runs; the handler may ``current_ticket(request).report_usage(n)``.
    ``idempotency``: honour ``Idempotency-Key`` here (True / "required"; None follows
    the guard). ``max_overage``: how far above the reserve reported usage may be charged.
    ``charge_client_errors``: keep the charge when the handler answers 4xx (None follows
    the guard, which refunds them by default).

    A request an outer guard already charged (a ``CreditGuardMiddleware`` rule, another
    decorator) is not charged again: the handler runs under that charge.
    """
    rule = Rule(
        feature_key,
        units=units,
        idempotency=idempotency,
        max_overage=max_overage,
        charge_client_errors=charge_client_errors,
    )

    def decorate(fn: F) -> F:
        if _is_litestar(fn):
            from .contrib.litestar import decorate_litestar

            return decorate_litestar(fn, rule, guard)
        return decorate_starlette(fn, rule, guard)

    return decorate


async def open_for(active: CreditGuard, rule: Rule, request: Any) -> Ticket | Problem | Replay:
    """``open_charge`` for a framework request object: reads the body only when an
    Idempotency-Key needs it (Starlette, FastAPI and Litestar cache it for the handler)."""
    scope = request.scope
    body = await request.body() if active.idempotency_key_of(scope, rule.idempotency) is not None else None
    outcome = await active.open_charge(
        rule.feature_key,
        scope,
        request,
        units=rule.units,
        idempotency=rule.idempotency,
        body=body,
        max_overage=rule.max_overage,
        charge_client_errors=rule.charge_client_errors,
    )
    if isinstance(outcome, Ticket):
        state = scope.setdefault("state", {})
        if isinstance(state, dict):
            state[TICKET_SCOPE_KEY] = outcome
    return outcome


NO_GUARD = "credit_guard found no CreditGuard: pass guard=... or set app.state.credit_guard in the app's lifespan"


def find_guard(explicit: CreditGuard | None, app: Any) -> CreditGuard:
    if explicit is not None:
        return explicit
    found = getattr(getattr(app, "state", None), "credit_guard", None)
    if not isinstance(found, CreditGuard):
        raise RuntimeError(NO_GUARD)
    return found


def guard_or_problem(explicit: CreditGuard | None, app: Any) -> CreditGuard | Problem:
    """The route's guard, or the 500 problem to answer when the app never set one up (its
    lifespan did not run): the handler must not run unpaid, and the reason must be plain."""
    try:
        return find_guard(explicit, app)
    except RuntimeError:
        log.error("credit_guard: %s", NO_GUARD)
        return problems.not_started(
            "This route is paid for in credits, but no CreditGuard was found for it (no guard= and no"
            " app.state.credit_guard: did the app's lifespan run?), so nothing was charged and the handler did"
            " not run. In tests, use `with TestClient(app) as client:`."
        )


def is_failure(exc: BaseException, ticket: Ticket | None = None) -> bool:
    """Whether an exception from a handler means the client did not get what it paid for.

    An HTTP exception (Starlette's, FastAPI's, Litestar's: they carry an int
    ``status_code``) is judged by its status like a returned response, the same rule the
    middleware applies where the framework has already turned it into one: a 5xx, and a
    4xx unless the route charges client errors, is refunded; below 400 it is charged.
    Every other exception is a failure and is refunded.
    """
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        return True
    return ticket.fails(status) if ticket is not None else status >= 400


async def call_plain(fn: Callable[..., Any], is_async: bool, args: Any, kwargs: Any) -> Any:
    """Run a handler as it is (a sync one in a worker thread)."""
    if is_async:
        return await fn(*args, **kwargs)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def call_handler(
    guard: CreditGuard, ticket: Ticket, fn: Callable[..., Any], is_async: bool, args: Any, kwargs: Any
) -> Any:
    """Run a paid handler. If it raises, the charge is settled first (refunded, or kept
    for an HTTP exception whose status the route charges: see ``is_failure``), shielded
    so a cancelled request still gets its refund, and the exception carries the credit
    headers on its way to the framework's error handler."""
    try:
        return await call_plain(fn, is_async, args, kwargs)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await guard.settle(
                ticket,
                failed=is_failure(exc, ticket),
                reason=f"handler raised {type(exc).__name__}",
                status=getattr(exc, "status_code", None),
            )
        attach_credit_headers(exc, ticket)
        raise


async def settle_returned_value(guard: CreditGuard, ticket: Ticket, status: int, receive: Any) -> bool:
    """Settle now what a handler's plain value answered, when that is already decided:
    refunded if its status fails or the client hung up while it ran (its framework would
    send the answer into the void: servers drop it silently). True when settled here;
    False leaves a kept charge to the caller (settled on delivery, or at once)."""
    if ticket.fails(status):
        await guard.settle(ticket, failed=True, reason=f"handler answered {status}", status=status)
        return True
    if receive is not None and await client_gone(receive):
        await guard.settle(ticket, failed=True, reason="client disconnected", status=status)
        return True
    return False


def attach_credit_headers(exc: BaseException, ticket: Ticket) -> None:
    """Put the refund headers on an HTTP exception (Starlette, FastAPI and Litestar ones
    carry ``status_code`` and ``headers``) so the error response the framework builds
    from it says ``X-Credits-Refunded``. Other exceptions become the server's bare 500;
    their refund shows in the ledger and the next response's ``X-Credits-Remaining``."""
    if hasattr(exc, "status_code") and hasattr(exc, "headers"):
        try:
            exc.headers = {**(exc.headers or {}), **dict(ticket.headers())}
        except (TypeError, AttributeError):  # an exotic headers type: leave it be
            pass


def problem_response(problem: Problem) -> Response:
    return Response(
        content=problem.body_bytes(),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_CONTENT_TYPE,
    )


class _ChargedResponse(Response):
    """The handler's own response, sent through ``run_charged`` so that a 5xx, or a
    stream that breaks after its headers, is refunded at the moment it happens."""

    def __init__(self, guard: CreditGuard, ticket: Ticket, inner: Response) -> None:
        self._guard, self._ticket, self._inner = guard, ticket, inner
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
        await run_charged(self._guard, self._ticket, self._inner, scope, receive, send)


class _ReplayResponse(Response):
    """An idempotent replay, sent byte for byte as it was stored."""

    def __init__(self, replay: Replay) -> None:
        self._replay = replay
        self.status_code = replay.status
        self.background = None

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._replay.headers

    @raw_headers.setter
    def raw_headers(self, value: list[tuple[bytes, bytes]]) -> None:
        self._replay = Replay(self._replay.status, value, self._replay.body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from .asgi import send_replay

        await send_replay(self._replay, send)


def decorate_starlette(fn: F, rule: Rule | str, guard: CreditGuard | None) -> F:
    rule = rule if isinstance(rule, Rule) else Rule(rule)
    signature = inspect.signature(fn)
    hints = _hints(fn)
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
        if current_ticket(request.scope) is not None:
            # An outer guard (a middleware rule, another decorator) charged this request and
            # settles it; charging here too would take the price twice.
            return await call_plain(fn, is_async, args, kwargs)
        active = guard_or_problem(guard, request.app)
        if isinstance(active, Problem):
            return problem_response(active)
        outcome = await open_for(active, rule, request)
        if isinstance(outcome, Problem):
            return problem_response(outcome)
        if isinstance(outcome, Replay):
            return _ReplayResponse(outcome)
        result = await call_handler(active, outcome, fn, is_async, args, kwargs)
        if isinstance(result, Response):
            return _ChargedResponse(active, outcome, result)
        # FastAPI serialises a returned value itself; its status and headers come from the
        # sub-response it handed us (status_code None there means the route's default).
        status = (
            getattr(sub_response, "status_code", None)
            or getattr(request.scope.get("route"), "status_code", None)
            or 200
        )
        if not await settle_returned_value(
            active, outcome, status, getattr(request, "receive", None)
        ) and not _settle_on_delivery(active, outcome, request.scope, tasks, status):
            await active.settle(outcome, failed=False, reason=f"handler answered {status}", status=status)
        if sub_response is not None:
            for name, value in outcome.headers():
                sub_response.headers[name] = value
        return result

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return typing.cast(F, wrapper)


def _settle_on_delivery(
    guard: CreditGuard, ticket: Ticket, scope: Scope, tasks: BackgroundTasks | None, status: int
) -> bool:
    """Keep a FastAPI plain-value answer's charge held until its response is delivered.

    FastAPI validates and serialises the returned value (``response_model``), runs the
    exit code of function-scoped ``yield`` dependencies and sends the response only after
    the handler returns; any of them can still fail with a 500 the client did not get
    its money's worth from. So the charge is settled by a task put *first* in the
    request's background tasks (they run only after the last body byte is sent, and the
    app's own tasks come after: their failures stay charged, as everywhere), and an exit
    callback on FastAPI's request-scoped exit stack refunds it if an exception got there
    first. False when the request does not come from FastAPI's request handler (settle now).
    """
    stack = scope.get("fastapi_inner_astack")
    if tasks is None or not isinstance(stack, AsyncExitStack):
        return False

    async def delivered() -> None:
        await guard.settle(ticket, failed=False, reason=f"handler answered {status}", status=status)

    async def on_exit(
        exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if not ticket.settled:
            with anyio.CancelScope(shield=True):
                if exc is None:  # sent without running its background tasks: a custom response class
                    await delivered()
                else:
                    await guard.settle(ticket, failed=True, reason=f"response failed: {type(exc).__name__}")
        return False

    tasks.tasks.insert(0, BackgroundTask(delivered))
    stack.push_async_exit(on_exit)
    return True


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
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


def _from_litestar(obj: Any) -> bool:
    return isinstance(getattr(obj, "__module__", None), str) and obj.__module__.split(".")[0] == "litestar"


def _is_litestar(fn: Callable[..., Any]) -> bool:
    """Tell a Litestar handler from a Starlette/FastAPI one: by its annotations, else its module.

    A module that imports both frameworks and whose handler's annotations do not tell is
    refused with a clear error rather than guessed at.
    """
    if "litestar" not in sys.modules:
        return False
    if _from_litestar(type(fn)):
        raise TypeError("put @requires_credits below Litestar's route decorator (@post(...)), not above it")
    hints = _hints(fn).values()
    if any(_from_litestar(hint) for hint in hints):
        return True
    if any(_from_starlette(hint) for hint in hints):
        return False
    module = sys.modules.get(fn.__module__)
    names = list(vars(module).values()) if module is not None else []
    uses_litestar = any(_from_litestar(value) for value in names)
    if uses_litestar and any(_from_starlette(value) for value in names):
        raise TypeError(
            f"cannot tell whether {fn.__qualname__} is a Litestar or a Starlette/FastAPI handler (its module "
            "imports both): import requires_credits from credit_guard.contrib.litestar or credit_guard.contrib.starlette"
        )
    return uses_litestar


def _from_starlette(obj: Any) -> bool:
    module = getattr(obj, "__module__", None)
    return isinstance(module, str) and module.split(".")[0] in ("starlette", "fastapi")
