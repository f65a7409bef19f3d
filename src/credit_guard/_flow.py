"""The one request flow: every web adapter takes these steps, in this order.

Two ways into it, one sequence each; an adapter supplies only what its framework knows:

    charge_asgi(guard, rule, app, scope, receive, send)
        the middleware: outer charge? -> body for the key -> open_charge -> run_paid
    charge_handler(binding, guard, rule, call)
        a decorated handler (Starlette/FastAPI, Litestar), the Litestar plugin's routes:
        outer charge? -> guard -> body -> open_charge -> the handler (refund if it
        raises) -> ended by a passage around the request (``_passage.py``), or by the
        returned value (``binding.end``)

``open_charge`` is where a request's charge is decided: the organization and user
resolved and checked, units bounded, an ``Idempotency-Key`` fingerprinted, then the
ledger's one charge, whose ``Decision`` is matched once into a ticket (charged, as a
hold), a problem (refused) or a replay. Problems and replays render themselves (they are
ASGI responses). Everything money-related happens in the ticket (``keep``/``refund``)
and the ledger below it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from time import perf_counter
from typing import Any, Literal, Protocol

import anyio
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import problems
from ._body import BodyTooLarge, ClientDisconnected, read_body
from ._clock import utcnow
from ._config import IdempotencyMode
from ._decisions import Charged, Decision, InFlight, KeyReused, Refusal, Refused, Replayed
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
from ._passage import client_gone, in_passage, put_on_request, run_paid
from ._ratelimit import RateLimitUnavailable
from ._rule import RequiresCredits, Rule
from ._storage.base import MemberCapHit
from ._storage.members import resets_at
from ._ticket import Ticket, current_ticket
from ._units import ONE, units_value
from .errors import IntegrityViolation, SchemaMissing, StorageUnavailable
from .models import UNSTORABLE_TEXT, is_storable_text
from .problems import Problem

log = logging.getLogger("credit_guard")


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
    method, path = scope.get("method"), scope.get("path")
    if not guard.started:
        log.error(
            "credit_guard: refused %s %s: the CreditGuard was not started on this event loop; "
            "call `await guard.start()` in the app's lifespan",
            method,
            path,
        )
        return problems.not_started()
    organization_id = await paying_organization(guard, scope, request)
    if isinstance(organization_id, Problem):
        return organization_id
    user_id = await resolve(guard, "user_id", scope, request)
    if user_id is not None and not is_storable_text(user_id):
        log.warning("credit_guard: %s %s refused: user id %r %s", method, path, user_id[:80], UNSTORABLE_TEXT)
        return problems.no_organization(f"The user id this request resolved to {UNSTORABLE_TEXT}.")
    count = await _units(rule, scope, request)
    if isinstance(count, Problem):
        return count
    keyed = _idempotency_key(guard, rule, scope, body, user_id)
    if isinstance(keyed, Problem):
        return keyed
    key = keyed[0] if keyed is not None else None
    if rule.rates is not None:  # the last check before the charge: only a valid request counts
        limited = await _over_rate(guard, rule, scope, organization_id, user_id)
        if limited is not None:
            return limited
    ledger, metrics = guard.ledger, guard.ledger.metrics
    started = perf_counter() if metrics is not None else 0.0
    try:
        for attempt in range(2):
            decision = await ledger.charge(
                organization_id,
                rule.feature_key,
                user_id,
                units=count,
                idempotency=(*keyed, False) if keyed is not None else None,
                hold=True,
                request_method=method,
                request_path=path,
                checked=True,
            )
            if attempt or not isinstance(decision, InFlight):
                break
            await _await_finished_response(guard, organization_id, key or "")
    except SchemaMissing:
        # A missed deployment step, not an outage: never served free, whatever fail_open says.
        if metrics is not None:
            metrics.decided(rule.feature_key, "unavailable", perf_counter() - started)
        return problems.schema_missing(guard.retry_after)
    except StorageUnavailable:
        if metrics is not None:
            metrics.decided(
                rule.feature_key, "served_free" if guard.fail_open else "unavailable", perf_counter() - started
            )
        if guard.fail_open:
            log.warning("credit_guard: database down, %r served FREE (fail_open=True)", rule.feature_key)
            return Ticket(rule.feature_key, organization_id, 0, None, None)
        return problems.unavailable(guard.retry_after)
    except IntegrityViolation:
        # A constraint caught what the rules should have prevented: never an outage, so
        # never served free (whatever fail_open says); logged with the database's words.
        log.error("credit_guard: refused %s %s: the database refused its charge", method, path)
        return problems.charge_refused()
    if metrics is not None:
        metrics.decided(rule.feature_key, outcome_of(decision), perf_counter() - started)
    return _answer(guard, rule, decision, scope, organization_id, user_id, count, key)


def _answer(
    guard: CreditGuard,
    rule: Rule,
    decision: Decision,
    scope: Mapping[str, Any],
    organization_id: str,
    user_id: str | None,
    count: Decimal,
    key: str | None,
) -> Ticket | Problem | Replay:
    """What the request flow makes of the ledger's decision: each case once."""
    match decision:
        case Charged():
            return Ticket(
                rule.feature_key,
                organization_id,
                decision.credits,
                decision.spendable,
                decision.charge_id,
                ledger=guard.ledger,
                unit_price=decision.unit_price,
                units=count,
                max_overage=guard.max_overage if rule.max_overage is None else rule.max_overage,
                idempotency_key=key,
                recorder=ResponseRecorder(guard.idempotency_max_body) if key is not None else None,
                user_id=user_id,
                on_disconnect=rule.on_disconnect,
                charge_client_errors=guard.charge_client_errors
                if rule.charge_client_errors is None
                else rule.charge_client_errors,
                pool=decision.pool,
            )
        case Refused(reason=Refusal.INSUFFICIENT):
            return problems.insufficient_credits(
                rule.feature_key, decision.required, decision.available, pool=decision.pool
            )
        case Refused(reason=Refusal.MEMBER_LIMIT, capped=MemberCapHit() as cap):
            log.info("credit_guard: %s %s refused: %s", scope.get("method"), scope.get("path"), decision.message)
            resets = resets_at(cap.per, utcnow())
            return problems.member_limit(
                rule.feature_key,
                required=decision.required,
                member=cap.member,
                cap=cap.credits,
                left=cap.left,
                per=cap.per,
                resets_at=None if resets is None else resets.isoformat(),
            )
        case Refused():
            if guard.allow_unpriced:
                log.warning("credit_guard: %s; served free (allow_unpriced=True)", decision.message)
                return Ticket(rule.feature_key, organization_id, 0, None, None)
            log.error("credit_guard: refused %s %s: %s", scope.get("method"), scope.get("path"), decision.message)
            if decision.reason is Refusal.FEATURE_INACTIVE:
                return problems.feature_inactive(rule.feature_key)
            return problems.feature_not_found(rule.feature_key)
        case Replayed():
            log.info("credit_guard: replayed %r for %s (not charged again)", key, organization_id)
            return Replay.from_stored(decision.stored)
        case InFlight():
            return problems.idempotency_conflict(key or "", retry_after=1)
        case KeyReused():
            return problems.idempotency_mismatch(key or "")


def _idempotency_key(
    guard: CreditGuard, rule: Rule, scope: Mapping[str, Any], body: bytes | None, user_id: str | None
) -> tuple[str, str] | Problem | None:
    """The request's ``Idempotency-Key`` and the fingerprint it is bound to (method, path,
    query, body, user), None when the route does not honour one, or the 400 to answer."""
    mode = guard.idempotency if rule.idempotency is None else rule.idempotency
    raw_key = key_from_headers(scope.get("headers") or ()) if mode else None
    if raw_key is None:
        if mode == "required":
            return problems.invalid_request({IDEMPOTENCY_HEADER: "this route requires an Idempotency-Key header"})
        return None
    key = validate_key(raw_key)
    if key is None:
        return problems.invalid_request({IDEMPOTENCY_HEADER: "must be 1 to 255 visible ASCII characters"})
    method, path = str(scope.get("method", "")), str(scope.get("path", ""))
    return key, request_fingerprint(method, path, scope.get("query_string") or b"", body or b"", user_id)


async def _units(rule: Rule, scope: Mapping[str, Any], request: Any) -> Decimal | Problem:
    """The request's units (the rule's callable, bounded), or the 422 to answer."""
    units = rule.units_of()
    if units is None:
        return ONE
    try:
        value = units(request if request is not None else connection(scope))
        if inspect.isawaitable(value):
            value = await value
        return units_value(value)
    except (ValueError, TypeError, LookupError) as exc:
        why = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
        log.info("credit_guard: %s %s refused: bad units: %s", scope.get("method"), scope.get("path"), why)
        return problems.invalid_request({"units": why or type(exc).__name__}, status=422)


async def _over_rate(
    guard: CreditGuard, rule: Rule, scope: Mapping[str, Any], organization_id: str, user_id: str | None
) -> Problem | None:
    """None when the request is within its route's rate (now counted); else the 429 to
    answer, or the 503 when the rate limit storage is down (None under ``fail_open``)."""
    assert rule.rates is not None
    metrics, started = guard.ledger.metrics, perf_counter()
    member = (user_id or "") if rule.rate_by == "member" else None
    try:
        over = await guard.rate_limits.hit(rule.rates, rule.feature_key, organization_id, member)
    except RateLimitUnavailable as exc:
        if guard.fail_open:
            log.warning("credit_guard: rate limits not applied to %r (fail_open=True): %s", rule.feature_key, exc)
            return None
        log.error(
            "credit_guard: refused %s %s: rate limit storage down: %s", scope.get("method"), scope.get("path"), exc
        )
        if metrics is not None:
            metrics.decided(rule.feature_key, "unavailable", perf_counter() - started)
        return problems.rate_limit_unavailable(guard.retry_after)
    if over is None:
        return None
    if metrics is not None:
        metrics.decided(rule.feature_key, "rate_limited", perf_counter() - started)
    log.info(
        "credit_guard: %s %s refused: %s over %s for %r",
        scope.get("method"),
        scope.get("path"),
        organization_id if member is None else f"{organization_id}/{member}",
        over.item,
        rule.feature_key,
    )
    return problems.rate_limited(
        rule.feature_key,
        amount=over.item.amount,
        window=over.window,
        per=rule.rate_by,
        rate=str(over.item),
        retry_after=over.retry_after,
    )


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


# -- the sequence for an ASGI app (the middleware) ---------------------------------------------


async def charge_asgi(guard: CreditGuard, rule: Rule, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Charge for a request, then run ``app`` for it (``run_paid``), or answer instead."""
    if outer_ticket(scope) is not None:  # a guard further out already charged it
        await app(scope, receive, send)
        return
    body = None
    if wants_body(guard, rule, scope):
        limit = guard.idempotency_max_request_body
        try:
            body, receive = await read_body(receive, limit)
        except ClientDisconnected:
            return
        except BodyTooLarge:
            await problems.request_too_large(limit)(scope, receive, send)
            return
    outcome = await open_charge(guard, rule, scope, body=body)
    if isinstance(outcome, Ticket):
        await run_paid(outcome, app, scope, receive, send)
    else:  # a refusal or a replay: each sends itself
        await outcome(scope, receive, send)


# -- the sequence for a handler (the decorators, the Litestar plugin's routes) -----------------


class HandlerBinding(Protocol):
    """What one framework knows of one request to a paid handler; the flow does the rest."""

    #: The ASGI scope, the framework's request object (for resolvers and units), and the
    #: app whose ``state.credit_guard`` is the guard when the route names none.
    scope: Scope
    request: Any
    app: Any

    async def body(self) -> bytes:
        """The request body (read once; the framework keeps it for the handler)."""

    def returned(self, result: Any) -> Any:
        """What the wrapper returns for a value the flow does not end (an outer charge, a
        passage around the request): as the framework expects it."""

    def refusal(self, answer: Problem | Replay) -> Any:
        """What the wrapper returns instead of running the handler."""

    async def end(self, ticket: Ticket, result: Any) -> Any:
        """End ``ticket`` by what the handler returned (its status, a client gone),
        with no passage to see the bytes go out; return what the framework sends."""


async def charge_handler(binding: HandlerBinding, guard: CreditGuard | None, rule: Rule, call: Call) -> Any:
    """Charge for a request right before its handler runs (after the framework's
    guards, dependencies and validation: the app's own refusals come first), run it,
    and end the charge: by a passage around the request when there is one (it sees the
    bytes go out), else by the returned value."""
    scope = binding.scope
    if outer_ticket(scope) is not None:
        # An outer guard (a middleware rule, another decorator) charged this request and
        # ends its ticket; charging here too would take the price twice.
        return binding.returned(await call())
    active = find_guard(guard, binding.app)
    if isinstance(active, Problem):
        return binding.refusal(active)
    body = await binding.body() if wants_body(active, rule, scope) else None
    outcome = await open_charge(active, rule, scope, binding.request, body)
    if not isinstance(outcome, Ticket):
        return binding.refusal(outcome)
    put_on_request(scope, outcome)
    result = await call_paid(outcome, call)
    if in_passage(scope):
        return binding.returned(result)
    return await binding.end(outcome, result)


#: The handler, ready to run with its arguments (``plain_call``).
Call = Callable[[], Awaitable[Any]]


def plain_call(fn: Callable[..., Any], is_async: bool, args: Any, kwargs: Any) -> Call:
    """Run a handler as it is (a sync one in a worker thread)."""
    if is_async:
        return functools.partial(fn, *args, **kwargs)
    return functools.partial(anyio.to_thread.run_sync, functools.partial(fn, *args, **kwargs))


def fails(ticket: Ticket, exc: BaseException) -> bool:
    """Whether an exception from a handler means the client did not get what it paid for.

    An HTTP exception (Starlette's, FastAPI's, Litestar's: they carry an int ``status_code``)
    is judged by its status like a returned response, the same rule the middleware applies
    where the framework has already turned it into one. Every other exception fails.
    """
    status = getattr(exc, "status_code", None)
    return ticket.fails(status) if isinstance(status, int) else True


async def call_paid(ticket: Ticket, call: Call) -> Any:
    """Run a paid handler. If it raises, the ticket is ended first (refunded, or kept for
    an HTTP exception whose status the route charges), shielded so a cancelled request
    still gets its refund, and the exception carries the credit headers on its way to
    the framework's error handler (Starlette, FastAPI and Litestar ones have ``headers``)."""
    try:
        return await call()
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
        await ticket.hung_up()
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
    "HandlerBinding",
    "IdempotencyMode",
    "RequiresCredits",
    "Rule",
    "call_paid",
    "charge_asgi",
    "charge_handler",
    "client_gone",
    "end_returned",
    "find_guard",
    "open_charge",
    "outer_ticket",
    "paying_organization",
    "plain_call",
    "problem_response",
    "put_on_request",
    "resolve",
    "run_paid",
    "wants_body",
]
