"""CreditGuardMiddleware (pure ASGI) and the settlement wrapper every adapter shares.

Pure ASGI, not BaseHTTPMiddleware: no task group per request, contextvars intact, and
streaming bodies are passed through untouched. Per-request state lives in the Ticket
and the ``send`` closure, never on the middleware instance.

Streaming responses: the credit headers go out with ``http.response.start``. If the body
fails *after* that, the status can no longer change, so the charge is refunded in the
ledger (the client sees a cut connection, and the refund in the next response's
``X-Credits-Remaining``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
from starlette.datastructures import MutableHeaders
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import problems
from .guard import TICKET_SCOPE_KEY, CreditGuard, IdempotencyMode, Ticket, UnitsOf
from .idempotency import Replay
from .problems import Problem


async def send_problem(problem: Problem, send: Send) -> None:
    body = problem.body_bytes()
    await send({"type": "http.response.start", "status": problem.status, "headers": problem.raw_headers(len(body))})
    await send({"type": "http.response.body", "body": body})


async def send_replay(replay: Replay, send: Send) -> None:
    await send({"type": "http.response.start", "status": replay.status, "headers": replay.headers})
    await send({"type": "http.response.body", "body": replay.body})


async def read_body(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """The whole request body, and a ``receive`` that hands it to the app again.

    Needed only for requests with an Idempotency-Key: their fingerprint covers the body
    and must be known before the charge, that is before the app reads it. It is held in
    memory, so beyond ``limit`` bytes BodyTooLarge is raised (the request is refused).
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client left before sending its body: nothing to fingerprint or charge.
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def receive_again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, receive_again


class ClientDisconnected(Exception):
    """The client hung up while its request body was being read."""


class BodyTooLarge(Exception):
    """An idempotent request's body is larger than the guard will hold to fingerprint it."""


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


async def run_charged(
    guard: CreditGuard, ticket: Ticket, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run ``app`` for a paid request: refund if it is not delivered, add the headers.

    Not delivered means: a status the ticket refunds (5xx, and 4xx unless the route
    charges client errors), refunded before its ``http.response.start`` goes out so the
    response itself says ``X-Credits-Refunded``; an exception before the last body chunk;
    or a client that is gone before it: servers drop ``send()`` after a disconnect
    silently (uvicorn does), so "send returned" is not "delivered", and the client is
    asked (``client_gone``, no round trip, no task) just before the last chunk. Once the
    last chunk is sent the request is paid for (its hold is settled): a background task
    failing afterwards refunds nothing. The ticket is put in ``scope["state"]`` for
    ``current_ticket``, and for any inner guard, which then leaves this charge alone.
    """
    await _PaidResponse(guard, ticket, receive, send).run(app, scope)


class _PaidResponse:
    """One paid request's passage through the app (per-request state, never on a middleware)."""

    __slots__ = ("delivered", "disconnected", "guard", "receive", "send", "started", "status", "ticket")

    def __init__(self, guard: CreditGuard, ticket: Ticket, receive: Receive, send: Send) -> None:
        self.guard, self.ticket, self.receive, self.send = guard, ticket, receive, send
        self.started = self.delivered = self.disconnected = False
        self.status = 0

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        state = scope.setdefault("state", {})
        if isinstance(state, dict):
            state[TICKET_SCOPE_KEY] = self.ticket
        guard, ticket = self.guard, self.ticket
        try:
            await app(scope, self.receive_watching, self.send_with_credits)
        except BaseException as exc:
            if not self.delivered:
                # Before the start, the app's error handler will answer 500; after it, the
                # body broke mid-stream. Shielded: a cancelled request must still get its refund.
                with anyio.CancelScope(shield=True):
                    await guard.settle(ticket, failed=True, reason=f"handler raised {type(exc).__name__}")
            elif not ticket.fails(self.status):
                await guard.settle(ticket, failed=False, status=self.status)
            raise
        if not self.delivered:
            # No answer at all, or a client that hung up before the last chunk.
            reason = "client disconnected" if self.disconnected else "no response sent"
            await guard.settle(ticket, failed=True, reason=reason)
        elif not ticket.fails(self.status):
            await guard.settle(ticket, failed=False, status=self.status)

    async def send_with_credits(self, message: Message) -> None:
        kind = message["type"]
        ticket, recorder = self.ticket, self.ticket.recorder
        if kind == "http.response.start" and not self.started:
            self.started = True
            self.status = status = message["status"]
            if ticket.fails(status):
                await self.guard.settle(ticket, failed=True, reason=f"handler answered {status}")
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


@dataclass(frozen=True, slots=True)
class Rule:
    """A paid route's options for ``CreditGuardMiddleware`` (a bare feature key means defaults).

    ``units``: a callable of the request whose number multiplies the price (seconds of
    video...). The middleware runs before the app has read the body, so it passes a
    Starlette ``HTTPConnection`` (path, query, headers), not the body; ``idempotency``: True, "required" or False for this
    route (None: the guard's default); ``max_overage``: see ``Ticket.report_usage``;
    ``charge_client_errors``: keep the charge when the app answers 4xx (None: the guard's choice).
    """

    feature_key: str
    units: UnitsOf | None = None
    idempotency: IdempotencyMode | None = None
    max_overage: float | None = None
    #: Keep the charge of a 4xx answer (None: the guard's ``charge_client_errors``).
    charge_client_errors: bool | None = None

    def __post_init__(self) -> None:
        if self.idempotency not in (None, True, False, "required"):
            raise ValueError(f"idempotency must be True, False or 'required', got {self.idempotency!r}")


class CreditGuardMiddleware:
    """Charge for requests that match ``rules`` before the app runs them.

    ``rules`` maps ``"METHOD /path/{param}"`` to a feature key or a ``Rule``. Templates
    use Starlette's syntax (``{id}``, ``{id:int}``, ``{rest:path}``). Requests that match
    no rule, and every non-HTTP scope, go straight to the app: the only cost is a dict
    lookup (and, for methods that have templated rules, their regexes).
    """

    def __init__(self, app: ASGIApp, *, guard: CreditGuard, rules: Mapping[str, str | Rule]) -> None:
        self.app = app
        self.guard = guard
        # path -> method -> rule: the pass-through path is two dict lookups, no allocation.
        self._static: dict[str, dict[str, Rule]] = {}
        self._templated: dict[str, list[tuple[re.Pattern[str], Rule]]] = {}
        for spec, target in rules.items():
            rule = target if isinstance(target, Rule) else Rule(target)
            method, _, path = spec.strip().partition(" ")
            path = path.strip()
            if not method or not path.startswith("/"):
                raise ValueError(f"rule {spec!r} must look like 'POST /v1/images'")
            method = method.upper()
            if "{" in path:
                regex, _, _ = compile_path(path)
                self._templated.setdefault(method, []).append((regex, rule))
            else:
                self._static.setdefault(path, {})[method] = rule
        # Starlette (and most routers) answer HEAD with the GET handler: it must not run free.
        for methods in self._static.values():
            if "GET" in methods:
                methods.setdefault("HEAD", methods["GET"])
        if "GET" in self._templated and "HEAD" not in self._templated:
            self._templated["HEAD"] = self._templated["GET"]

    def match_rule(self, method: str, path: str) -> Rule | None:
        by_method = self._static.get(path)
        if by_method is not None:
            rule = by_method.get(method)
            if rule is not None:
                return rule
        templated = self._templated.get(method)
        if templated:
            for regex, found in templated:
                if regex.match(path):
                    return found
        return None

    def match(self, method: str, path: str) -> str | None:
        """The feature key a request pays for, or None."""
        rule = self.match_rule(method, path)
        return rule.feature_key if rule is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root_path: str | None = scope.get("root_path")
            if root_path and path.startswith(root_path):
                path = path[len(root_path) :] or "/"
            rule = self.match_rule(scope["method"], path)
            state = scope.get("state")
            if rule is not None and not (state and TICKET_SCOPE_KEY in state):  # an outer guard's charge stands alone
                body = None
                if self.guard.idempotency_key_of(scope, rule.idempotency) is not None:
                    try:
                        body, receive = await read_body(receive, self.guard.idempotency_max_request_body)
                    except ClientDisconnected:
                        return
                    except BodyTooLarge:
                        limit = self.guard.idempotency_max_request_body
                        await send_problem(problems.request_too_large(limit), send)
                        return
                outcome = await self.guard.open_charge(
                    rule.feature_key,
                    scope,
                    units=rule.units,
                    idempotency=rule.idempotency,
                    body=body,
                    max_overage=rule.max_overage,
                    charge_client_errors=rule.charge_client_errors,
                )
                if isinstance(outcome, Problem):
                    await send_problem(outcome, send)
                elif isinstance(outcome, Replay):
                    await send_replay(outcome, send)
                else:
                    await run_charged(self.guard, outcome, self.app, scope, receive, send)
                return
        await self.app(scope, receive, send)


__all__ = ["CreditGuardMiddleware", "Rule", "client_gone", "read_body", "run_charged", "send_problem", "send_replay"]
