"""The one request flow: every web adapter (the middleware, the Starlette/FastAPI decorator,
the Litestar adapter, the credit endpoints) takes these steps, in this order.

    outer_ticket(scope)                    a guard further out already charged: run as is
    open_charge(guard, rule, scope, ...)   -> Ticket (charged, as a hold) | Problem | Replay
    run_paid(ticket, app, ...)             an ASGI app: headers, refund if not delivered
    call_paid(ticket, handler, ...)        a handler: refund if it raises (HTTP errors by status)
    end_returned(ticket, status, ...)      a handler's plain value, ended by its status

Problems and replays render themselves (they are ASGI responses); ``problem_response``
wraps one for frameworks that want their own Response type. Everything money-related
happens in the ticket (``keep``/``refund``) and the ledger below it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal, TypeVar

import anyio
from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import problems
from ._config import IdempotencyMode
from ._guard import CreditGuard
from ._idempotency import (
    IDEMPOTENCY_HEADER,
    Replay,
    ResponseRecorder,
    key_from_headers,
    request_fingerprint,
    validate_key,
)
from ._ledger import ORGANIZATION_ID_MAX
from ._metrics import outcome_of
from ._storage.base import ClaimKind
from ._ticket import TICKET_SCOPE_KEY, Ticket, current_ticket
from ._units import ONE, UnitsOf, units_value
from .errors import StorageUnavailable
from .models import UNSTORABLE_TEXT, is_storable_text
from .problems import Problem

log = logging.getLogger("credit_guard")


@dataclass(frozen=True, slots=True)
class Rule:
    """A paid route's options (a bare feature key means the defaults).

    ``units``: a callable of the request whose number multiplies the price (seconds of
    video...); under the middleware it gets a Starlette ``HTTPConnection`` (path, query,
    headers: the app has not read the body yet). ``idempotency``: True, "required" or
    False for this route (None: the guard's default). ``max_overage``: how far above its
    reserve reported usage may be charged. ``charge_client_errors``: keep the charge when
    the app answers 4xx (None: the guard's choice).
    """

    feature_key: str
    units: UnitsOf | None = None
    idempotency: IdempotencyMode | None = None
    max_overage: float | None = None
    charge_client_errors: bool | None = None

    def __post_init__(self) -> None:
        if self.idempotency not in (None, True, False, "required"):
            raise ValueError(f"idempotency must be True, False or 'required', got {self.idempotency!r}")


F = TypeVar("F", bound=Callable[..., Any])
Decorate = Callable[[Any, Rule, "CreditGuard | None"], Any]


class RequiresCredits:
    """``requires_credits``: one decorator factory, whichever framework applies the rule.

    Each framework adapter makes one with its own ``decorate(fn, rule, guard)``; the
    options, their checks and their documentation are here once.
    """

    def __init__(self, decorate: Decorate) -> None:
        self._decorate = decorate

    def __call__(
        self,
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
        (seconds of video...): the price is multiplied by it, rounded up, and charged
        before the handler runs; the handler may ``current_ticket(request).report_usage(n)``.
        ``idempotency``: honour ``Idempotency-Key`` here (True / "required"; None follows
        the guard). ``max_overage``: how far above the reserve reported usage may be
        charged. ``charge_client_errors``: keep the charge when the handler answers 4xx
        (None follows the guard, which refunds them by default).

        A request an outer guard already charged (a ``CreditGuardMiddleware`` rule, another
        decorator) is not charged again: the handler runs under that charge.
        """
        rule = Rule(feature_key, units, idempotency, max_overage, charge_client_errors)

        def decorate(fn: F) -> F:
            return typing.cast(F, self._decorate(fn, rule, guard))

        return decorate


def outer_ticket(scope: Mapping[str, Any]) -> Ticket | None:
    """The ticket a guard further out put on this request: its charge stands alone."""
    return current_ticket(scope)


# -- who pays ---------------------------------------------------------------------------------


async def resolve(
    guard: CreditGuard, what: Literal["organization_id", "user_id"], scope: Mapping[str, Any], request: Any
) -> str | None:
    """The request's organization or user, by the guard's resolver or from request state:
    the same rule for every adapter and endpoint."""
    resolver = guard.organization_resolver if what == "organization_id" else guard.user_resolver
    if resolver is None:
        state = scope.get("state")
        if type(state) is dict or isinstance(state, Mapping):
            value = state.get(what)
        else:
            value = getattr(getattr(request, "state", None), what, None)
    else:
        value = resolver(request if request is not None else connection(scope))
        if inspect.isawaitable(value):
            value = await value
    return str(value) if value not in (None, "") else None


async def paying_organization(guard: CreditGuard, scope: Mapping[str, Any], request: Any = None) -> str | Problem:
    """The resolved organization, or the 401 to answer: none, or an id no account can have
    (too long for the ledger, or NUL / a lone surrogate the database cannot store: asked
    anyway, its error would read as an outage, a 503 or free service under fail_open).
    Logged, since it may as well be the app's own misconfiguration."""
    organization_id = await resolve(guard, "organization_id", scope, request)
    if not organization_id:
        log.info("credit_guard: %s %s refused: no organization", scope.get("method"), scope.get("path"))
        return problems.no_organization()
    method, path = scope.get("method"), scope.get("path")
    if len(organization_id) > ORGANIZATION_ID_MAX:
        why = f"is longer than {ORGANIZATION_ID_MAX} characters"
        log.warning(
            "credit_guard: %s %s refused: organization id of %d characters (at most %d)",
            method,
            path,
            len(organization_id),
            ORGANIZATION_ID_MAX,
        )
    elif not is_storable_text(organization_id):
        why = UNSTORABLE_TEXT
        log.warning("credit_guard: %s %s refused: organization id %r %s", method, path, organization_id[:80], why)
    else:
        return organization_id
    return problems.no_organization(f"The organization id this request resolved to {why}.")


def connection(scope: Mapping[str, Any]) -> HTTPConnection:
    """A Starlette HTTPConnection for callbacks when the adapter has no request object."""
    return HTTPConnection(scope if isinstance(scope, dict) else dict(scope))


# -- opening the charge -----------------------------------------------------------------------


def wants_body(guard: CreditGuard, rule: Rule, scope: Mapping[str, Any]) -> bool:
    """Whether ``open_charge`` needs the request body: an Idempotency-Key the route
    honours is bound to a fingerprint of it, taken before the app reads it."""
    mode = guard.idempotency if rule.idempotency is None else rule.idempotency
    return bool(mode) and key_from_headers(scope.get("headers") or ()) is not None


async def open_charge(
    guard: CreditGuard, rule: Rule, scope: Mapping[str, Any], request: Any = None, body: bytes | None = None
) -> Ticket | Problem | Replay:
    """Charge for one request before its handler runs, or say what to answer instead: a
    refusal (Problem) or an idempotent replay of the first response (Replay).

    ``request`` is the framework's request object when the adapter has one; resolvers and
    ``units`` receive it (a Starlette HTTPConnection otherwise). ``body``: see ``wants_body``.
    """
    if not guard.started:
        log.error(
            "credit_guard: refused %s %s: the CreditGuard was not started on this event loop; "
            "call `await guard.start()` in the app's lifespan",
            scope.get("method"),
            scope.get("path"),
        )
        return problems.not_started()
    organization_id = await paying_organization(guard, scope, request)
    if isinstance(organization_id, Problem):
        return organization_id
    user_id = await resolve(guard, "user_id", scope, request)
    if user_id is not None and not is_storable_text(user_id):
        log.warning(
            "credit_guard: %s %s refused: user id %r %s",
            scope.get("method"),
            scope.get("path"),
            user_id[:80],
            UNSTORABLE_TEXT,
        )
        return problems.no_organization(f"The user id this request resolved to {UNSTORABLE_TEXT}.")
    count = ONE
    if rule.units is not None:
        try:
            value = rule.units(request if request is not None else connection(scope))
            if inspect.isawaitable(value):
                value = await value
            count = units_value(value)
        except (ValueError, TypeError, LookupError) as exc:
            why = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
            log.info("credit_guard: %s %s refused: bad units: %s", scope.get("method"), scope.get("path"), why)
            return problems.invalid_request({"units": why or type(exc).__name__}, status=422)
    mode = guard.idempotency if rule.idempotency is None else rule.idempotency
    key: str | None = None
    fingerprint = ""
    if mode:
        raw_key = key_from_headers(scope.get("headers") or ())
        if raw_key is None and mode == "required":
            return problems.invalid_request({IDEMPOTENCY_HEADER: "this route requires an Idempotency-Key header"})
        if raw_key is not None:
            key = validate_key(raw_key)
            if key is None:
                return problems.invalid_request({IDEMPOTENCY_HEADER: "must be 1 to 255 visible ASCII characters"})
            method, path = str(scope.get("method", "")), str(scope.get("path", ""))
            fingerprint = request_fingerprint(method, path, scope.get("query_string") or b"", body or b"", user_id)
    ledger, metrics = guard.ledger, guard.ledger.metrics
    started = perf_counter() if metrics is not None else 0.0
    try:
        for attempt in range(2):
            result, outcome = await ledger.charge(
                organization_id,
                rule.feature_key,
                user_id,
                units=count,
                idempotency=(key, fingerprint, False) if key is not None else None,
                hold=True,
                request_method=scope.get("method"),
                request_path=scope.get("path"),
                checked=True,
            )
            if attempt or outcome is None or outcome.kind is not ClaimKind.RUNNING:
                break
            assert key is not None
            await _await_finished_response(guard, organization_id, key)
    except StorageUnavailable:
        if metrics is not None:
            metrics.decided(
                rule.feature_key, "served_free" if guard.fail_open else "unavailable", perf_counter() - started
            )
        if guard.fail_open:
            log.warning("credit_guard: database down, %r served FREE (fail_open=True)", rule.feature_key)
            return Ticket(rule.feature_key, organization_id, 0, None, None)
        return problems.unavailable(guard.retry_after)
    if metrics is not None:
        metrics.decided(rule.feature_key, outcome_of(result, outcome), perf_counter() - started)
    if outcome is not None and outcome.kind not in (ClaimKind.CLAIMED, ClaimKind.INSUFFICIENT):
        assert key is not None and outcome.stored is not None
        if outcome.kind is ClaimKind.REPLAY:
            log.info("credit_guard: replayed %r for %s (not charged again)", key, organization_id)
            return Replay.from_stored(outcome.stored)
        if outcome.kind is ClaimKind.RUNNING:
            return problems.idempotency_conflict(key, retry_after=1)
        return problems.idempotency_mismatch(key)
    if result.success:
        assert result.credits_deducted is not None
        return Ticket(
            rule.feature_key,
            organization_id,
            result.credits_deducted,
            result.remaining_credits,
            result.charge_id,
            ledger=ledger,
            unit_price=result.unit_price or 0,
            units=count,
            max_overage=guard.max_overage if rule.max_overage is None else rule.max_overage,
            idempotency_key=key,
            recorder=ResponseRecorder(guard.idempotency_max_body) if key is not None else None,
            user_id=user_id,
            charge_client_errors=guard.charge_client_errors
            if rule.charge_client_errors is None
            else rule.charge_client_errors,
        )
    if result.error_code == "insufficient_credits":
        assert result.required is not None and result.remaining_credits is not None
        return problems.insufficient_credits(rule.feature_key, result.required, result.remaining_credits)
    if guard.allow_unpriced:
        log.warning("credit_guard: %s; served free (allow_unpriced=True)", result.error)
        return Ticket(rule.feature_key, organization_id, 0, None, None)
    log.error("credit_guard: refused %s %s: %s", scope.get("method"), scope.get("path"), result.error)
    if result.error_code == "feature_inactive":
        return problems.feature_inactive(rule.feature_key)
    return problems.feature_not_found(rule.feature_key)


async def _await_finished_response(guard: CreditGuard, organization_id: str, key: str) -> None:
    """Before answering a retry 409: its first request may have just finished, with the
    response to replay still in a settlement batch (a client retrying a lost answer does so
    at once). This process's batch is written now; another process's lands within a couple
    of ``settle_delay``, so wait that long (capped) and look again."""
    holds = guard.holds
    if holds.has_completion(organization_id, key):
        await holds.flush()
    else:
        await anyio.sleep(min(2 * holds.settle_delay + 0.05, 0.25))


def put_on_request(scope: Scope, ticket: Ticket) -> None:
    """Where ``current_ticket`` (and any guard further in) finds it."""
    state = scope.setdefault("state", {})
    if isinstance(state, dict):
        state[TICKET_SCOPE_KEY] = ticket


# -- running a paid ASGI app ------------------------------------------------------------------


async def client_gone(receive: Receive) -> bool:
    """Whether the client has already hung up, asked without waiting (and without a task).

    ``receive()`` is started and, if it would have to wait (the client is still there),
    dropped at once: its awaitable is closed before it ever reaches the event loop, so
    nothing is left pending. A server that already knows of a disconnect answers
    ``http.disconnect`` without waiting (uvicorn keeps answering it). Call it only once the
    app has read its body: a body message it returned would be lost.
    """
    waiter = receive().__await__()
    try:
        waiter.send(None)
    except StopIteration as done:
        message = done.value
        return type(message) is dict and message.get("type") == "http.disconnect"
    except Exception:  # a receive that cannot be asked this way: assume the client is there
        return False
    waiter.close()
    return False


async def run_paid(ticket: Ticket, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app`` for a paid request: add the credit headers, refund if not delivered.

    Not delivered means: a status the ticket refunds (5xx, and 4xx unless the route
    charges client errors), refunded before its ``http.response.start`` goes out so the
    response itself says ``X-Credits-Refunded``; an exception before the last body chunk;
    or a client that is gone before it: servers drop ``send()`` after a disconnect
    silently (uvicorn does), so "send returned" is not "delivered", and the client is
    asked (``client_gone``, no round trip, no task) just before the last chunk. Once the
    last chunk is sent the request is paid for (its hold is settled): a background task
    failing afterwards refunds nothing.
    """
    put_on_request(scope, ticket)
    await _PaidResponse(ticket, receive, send).run(app, scope)


class _PaidResponse:
    """One paid request's passage through the app (per-request state, never on a middleware)."""

    __slots__ = ("delivered", "disconnected", "receive", "send", "started", "status", "ticket")

    def __init__(self, ticket: Ticket, receive: Receive, send: Send) -> None:
        self.ticket, self.receive, self.send = ticket, receive, send
        self.started = self.delivered = self.disconnected = False
        self.status = 0

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        ticket = self.ticket
        try:
            await app(scope, self.receive_watching, self.send_with_credits)
        except BaseException as exc:
            if not self.delivered:
                # Before the start, the app's error handler will answer 500; after it, the
                # body broke mid-stream. Shielded: a cancelled request must still get its refund.
                with anyio.CancelScope(shield=True):
                    await ticket.refund(f"handler raised {type(exc).__name__}")
            elif not ticket.fails(self.status):
                await ticket.keep(self.status)
            raise
        if not self.delivered:
            # No answer at all, or a client that hung up before the last chunk.
            await ticket.refund("client disconnected" if self.disconnected else "no response sent")
        elif not ticket.fails(self.status):
            await ticket.keep(self.status)

    async def send_with_credits(self, message: Message) -> None:
        kind = message["type"]
        ticket, recorder = self.ticket, self.ticket.recorder
        if kind == "http.response.start" and not self.started:
            self.started = True
            self.status = status = message["status"]
            if ticket.fails(status):
                await ticket.refund(f"handler answered {status}")
            headers = MutableHeaders(raw=list(message.get("headers", ())))
            for name, value in ticket.headers():
                headers[name] = value
            message = {**message, "headers": headers.raw}
            if recorder is not None:
                recorder.start(status, headers.raw)
        elif kind == "http.response.body":
            if recorder is not None:
                recorder.body(message.get("body", b""))
            if not message.get("more_body", False):
                await self._deliver(message)
                return
        elif kind == "http.response.pathsend":
            if recorder is not None:
                recorder.overflow = True  # the server sends the file itself: no bytes to keep
            await self._deliver(message)
            return
        await self.send(message)

    async def _deliver(self, message: Message) -> None:
        """The last message of the response: sent and counted as delivered, unless the
        client is already gone (then it is dropped, and the charge refunded after)."""
        if self.disconnected or await client_gone(self.receive):
            self.disconnected = True
            return
        await self.send(message)
        self.delivered = True

    async def receive_watching(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message


# -- running a paid handler (the decorators) --------------------------------------------------


def fails(ticket: Ticket, exc: BaseException) -> bool:
    """Whether an exception from a handler means the client did not get what it paid for.

    An HTTP exception (Starlette's, FastAPI's, Litestar's: they carry an int ``status_code``)
    is judged by its status like a returned response, the same rule the middleware applies
    where the framework has already turned it into one. Every other exception fails.
    """
    status = getattr(exc, "status_code", None)
    return ticket.fails(status) if isinstance(status, int) else True


async def call_plain(fn: Callable[..., Any], is_async: bool, args: Any, kwargs: Any) -> Any:
    """Run a handler as it is (a sync one in a worker thread)."""
    if is_async:
        return await fn(*args, **kwargs)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def call_paid(ticket: Ticket, fn: Callable[..., Any], is_async: bool, args: Any, kwargs: Any) -> Any:
    """Run a paid handler. If it raises, the ticket is ended first (refunded, or kept for
    an HTTP exception whose status the route charges), shielded so a cancelled request
    still gets its refund, and the exception carries the credit headers on its way to
    the framework's error handler (Starlette, FastAPI and Litestar ones have ``headers``)."""
    try:
        return await call_plain(fn, is_async, args, kwargs)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            if fails(ticket, exc):
                await ticket.refund(f"handler raised {type(exc).__name__}")
            else:
                await ticket.keep(getattr(exc, "status_code", None))
        if hasattr(exc, "status_code") and hasattr(exc, "headers"):
            try:
                exc.headers = {**(exc.headers or {}), **dict(ticket.headers())}
            except (TypeError, AttributeError):  # an exotic headers type: leave it be
                pass
        raise


async def end_returned(ticket: Ticket, status: int, receive: Receive | None) -> bool:
    """End now what a handler's plain value answered, when that is already decided:
    refunded if its status fails, or if the client hung up while it ran (its framework
    would send the answer into the void). True when ended here; False leaves a kept
    ticket to the caller (kept on delivery, or at once). The framework serialises the
    value unseen, so an idempotent replay of it is its status and credit headers, no body."""
    if ticket.fails(status):
        await ticket.refund(f"handler answered {status}")
        return True
    if receive is not None and await client_gone(receive):
        await ticket.refund("client disconnected")
        return True
    if ticket.recorder is not None and ticket.recorder.status is None:
        ticket.recorder.start(status, [(name.encode(), value.encode()) for name, value in ticket.headers()])
        ticket.recorder.overflow = True
    return False


# -- finding the guard; rendering for Starlette ------------------------------------------------

NO_GUARD = "found no CreditGuard: pass guard=... or set app.state.credit_guard in the app's lifespan"


def find_guard(explicit: CreditGuard | None, app: Any) -> CreditGuard | Problem:
    """The route's guard (``guard=``, else ``app.state.credit_guard``), or the 500 problem
    to answer when the app never set one up (its lifespan did not run): the handler must
    not run unpaid, and the reason must be plain."""
    if explicit is not None:
        return explicit
    found = getattr(getattr(app, "state", None), "credit_guard", None)
    if isinstance(found, CreditGuard):
        return found
    log.error("credit_guard: %s", NO_GUARD)
    return problems.not_started(
        "This route is paid for in credits, but no CreditGuard was found for it (no guard= and no"
        " app.state.credit_guard: did the app's lifespan run?), so nothing was charged and the handler did"
        " not run. In tests, use `with TestClient(app) as client:` (it runs the lifespan); an httpx"
        " ASGITransport does not run it: set app.state.credit_guard yourself."
    )


class AsgiResponse(Response):
    """A Problem or a Replay as the Starlette Response a framework expects (FastAPI would
    serialise anything else): the bytes and headers they render, sent as they are (plus
    any header the app adds on the way, as endpoints add ``Cache-Control``)."""

    def __init__(self, answer: Problem | Replay) -> None:
        self.status_code = answer.status
        self.background = None
        if isinstance(answer, Problem):
            self.body = answer.body_bytes()
            self.raw_headers = answer.raw_headers(len(self.body))
        else:
            self.body = answer.body
            self.raw_headers = list(answer.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def problem_response(problem: Problem) -> Response:
    """A problem as a Starlette Response (endpoints, admin, the Starlette decorator)."""
    return AsgiResponse(problem)


__all__ = [
    "AsgiResponse",
    "IdempotencyMode",
    "Rule",
    "call_paid",
    "call_plain",
    "client_gone",
    "end_returned",
    "find_guard",
    "open_charge",
    "outer_ticket",
    "paying_organization",
    "problem_response",
    "put_on_request",
    "resolve",
    "run_paid",
    "wants_body",
]
