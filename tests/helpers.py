"""Small pieces many test modules share: the auth shim an app would have, and a client."""

from __future__ import annotations

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send


class OrgFromHeader:
    """What an app's auth layer does: put the paying organization (``X-Org``) and the user
    (``X-User``, else ``user_9``) on request state. Test-only: never trust a client header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            org = headers.get(b"x-org")
            if org:
                state = scope.setdefault("state", {})
                state["organization_id"] = org.decode("utf-8", "surrogateescape")
                state["user_id"] = headers.get(b"x-user", b"user_9").decode("utf-8", "surrogateescape")
        await self.app(scope, receive, send)


def client(app: ASGIApp) -> httpx.AsyncClient:
    """An in-process client; app exceptions become the server's 500, as behind uvicorn."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")
