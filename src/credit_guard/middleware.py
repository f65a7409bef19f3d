"""CreditGuardMiddleware: charge for requests by rule, in one place (pure ASGI).

Pure ASGI, not BaseHTTPMiddleware: no task group per request, contextvars intact, and
streaming bodies are passed through untouched. Per-request state lives in the ticket and
the flow's per-request responder (``_flow.run_paid``), never on the middleware instance.
Requests that match no rule, and every non-HTTP scope, go straight to the app.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import problems
from ._flow import Rule, open_charge, run_paid, wants_body
from ._guard import CreditGuard
from ._ticket import TICKET_SCOPE_KEY, Ticket


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
            # A guard further out already charged this request: its charge stands alone.
            if rule is not None and not (state and TICKET_SCOPE_KEY in state):
                body = None
                if wants_body(self.guard, rule, scope):
                    try:
                        body, receive = await read_body(receive, self.guard.idempotency_max_request_body)
                    except ClientDisconnected:
                        return
                    except BodyTooLarge:
                        limit = self.guard.idempotency_max_request_body
                        await problems.request_too_large(limit)(scope, receive, send)
                        return
                outcome = await open_charge(self.guard, rule, scope, body=body)
                if isinstance(outcome, Ticket):
                    await run_paid(outcome, self.app, scope, receive, send)
                else:  # a refusal or a replay: each sends itself
                    await outcome(scope, receive, send)
                return
        await self.app(scope, receive, send)


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


__all__ = ["BodyTooLarge", "ClientDisconnected", "CreditGuardMiddleware", "Rule", "read_body"]
