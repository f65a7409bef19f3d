"""CreditGuardMiddleware: charge for requests by rule, in one place (pure ASGI).

Pure ASGI, not BaseHTTPMiddleware: no task group per request, contextvars intact, and
streaming bodies are passed through untouched. This module only matches rules; the
request's sequence is the flow's (``_flow.charge_asgi``), and per-request state lives in
the ticket and its passage (``_passage.py``), never on the middleware instance. Requests
that match no rule, and every non-HTTP scope, go straight to the app.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from ._body import BodyTooLarge, ClientDisconnected, read_body
from ._flow import Rule, charge_asgi
from ._guard import CreditGuard


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
            if rule is not None:
                await charge_asgi(self.guard, rule, self.app, scope, receive, send)
                return
        await self.app(scope, receive, send)


__all__ = ["BodyTooLarge", "ClientDisconnected", "CreditGuardMiddleware", "Rule", "read_body"]
