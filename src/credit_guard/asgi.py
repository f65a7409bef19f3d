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

import anyio
from starlette.datastructures import MutableHeaders
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .guard import CreditGuard, Ticket
from .problems import Problem


async def send_problem(problem: Problem, send: Send) -> None:
    body = problem.body_bytes()
    await send({"type": "http.response.start", "status": problem.status, "headers": problem.raw_headers(len(body))})
    await send({"type": "http.response.body", "body": body})


async def run_charged(
    guard: CreditGuard, ticket: Ticket, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run ``app`` for a paid request: refund if it is not delivered, add the headers.

    Not delivered means: a 5xx status (refunded before its ``http.response.start`` goes
    out, so the response itself says ``X-Credits-Refunded``), an exception before the
    last body chunk, or the client disconnecting before it. Once the last chunk is sent
    the request is paid for: a background task failing afterwards refunds nothing.
    """
    started = delivered = disconnected = False

    async def send_with_credits(message: Message) -> None:
        nonlocal started, delivered
        kind = message["type"]
        if kind == "http.response.start" and not started:
            started = True
            status = message["status"]
            if status >= 500:
                await guard.settle(ticket, failed=True, reason=f"handler answered {status}")
            else:
                await guard.settle(ticket, failed=False)
            headers = MutableHeaders(raw=list(message.get("headers", ())))
            for name, value in ticket.headers():
                headers[name] = value
            message = {**message, "headers": headers.raw}
        await send(message)
        if kind == "http.response.body" and not message.get("more_body", False):
            delivered = True

    async def receive_watching() -> Message:
        nonlocal disconnected
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected = True
        return message

    try:
        await app(scope, receive_watching, send_with_credits)
    except BaseException as exc:
        if not delivered:
            # Before the start, the app's error handler will answer 500; after it, the
            # body broke mid-stream. Shielded: a cancelled request must still get its refund.
            with anyio.CancelScope(shield=True):
                await guard.settle(ticket, failed=True, reason=f"handler raised {type(exc).__name__}")
        raise
    if not delivered:
        # No answer at all, or a stream the client hung up on (Starlette stops it quietly).
        reason = "client disconnected" if disconnected else "no response sent"
        await guard.settle(ticket, failed=True, reason=reason)


class CreditGuardMiddleware:
    """Charge for requests that match ``rules`` before the app runs them.

    ``rules`` maps ``"METHOD /path/{param}"`` to a feature key. Templates use Starlette's
    syntax (``{id}``, ``{id:int}``, ``{rest:path}``). Requests that match no rule, and
    every non-HTTP scope, go straight to the app: the only cost is a dict lookup (and,
    for methods that have templated rules, their regexes).
    """

    def __init__(self, app: ASGIApp, *, guard: CreditGuard, rules: Mapping[str, str]) -> None:
        self.app = app
        self.guard = guard
        # path -> method -> feature: the pass-through path is two dict lookups, no allocation.
        self._static: dict[str, dict[str, str]] = {}
        self._templated: dict[str, list[tuple[re.Pattern[str], str]]] = {}
        for rule, feature_key in rules.items():
            method, _, path = rule.strip().partition(" ")
            path = path.strip()
            if not method or not path.startswith("/"):
                raise ValueError(f"rule {rule!r} must look like 'POST /v1/images'")
            method = method.upper()
            if "{" in path:
                regex, _, _ = compile_path(path)
                self._templated.setdefault(method, []).append((regex, feature_key))
            else:
                self._static.setdefault(path, {})[method] = feature_key
        # Starlette (and most routers) answer HEAD with the GET handler: it must not run free.
        for methods in self._static.values():
            if "GET" in methods:
                methods.setdefault("HEAD", methods["GET"])
        if "GET" in self._templated and "HEAD" not in self._templated:
            self._templated["HEAD"] = self._templated["GET"]

    def match(self, method: str, path: str) -> str | None:
        """The feature key a request pays for, or None."""
        by_method = self._static.get(path)
        if by_method is not None:
            feature_key = by_method.get(method)
            if feature_key is not None:
                return feature_key
        templated = self._templated.get(method)
        if templated:
            for regex, key in templated:
                if regex.match(path):
                    return key
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root_path: str | None = scope.get("root_path")
            if root_path and path.startswith(root_path):
                path = path[len(root_path) :] or "/"
            feature_key = self.match(scope["method"], path)
            if feature_key is not None:
                outcome = await self.guard.open_charge(feature_key, scope)
                if isinstance(outcome, Problem):
                    await send_problem(outcome, send)
                else:
                    await run_charged(self.guard, outcome, self.app, scope, receive, send)
                return
        await self.app(scope, receive, send)


__all__ = ["CreditGuardMiddleware", "run_charged", "send_problem"]
