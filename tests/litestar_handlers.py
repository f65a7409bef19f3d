"""A Litestar app for the decorator tests, in a module of its own as Litestar apps are:
the top-level ``credit_guard.requires_credits`` recognises these handlers as Litestar's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Litestar, Request, Response, post
from litestar.dto import DataclassDTO, DTOConfig
from litestar.middleware import ASGIMiddleware
from litestar.params import Body
from litestar.types import ASGIApp, Receive, Scope, Send

from credit_guard import CreditGuard, requires_credits

ran: list[str] = []


class DemoAuth(ASGIMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        org = dict(scope.get("headers", [])).get(b"x-org")
        if org:
            scope.setdefault("state", {})["organization_id"] = org.decode()  # type: ignore[typeddict-item]
        await next_app(scope, receive, send)


@dataclass
class Prompt:
    prompt: str


@post("/image")
@requires_credits("seedream_text_to_image")
async def image(data: Annotated[Prompt, Body()]) -> dict[str, str]:
    ran.append(f"image {data.prompt}")
    return {"prompt": data.prompt}


@post("/image-with-request")
@requires_credits("seedream_text_to_image")
async def image_with_request(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
    ran.append("image-with-request")
    return Response({"path": request.url.path}, status_code=200)


@dataclass
class Account:
    name: str
    api_secret: str


class AccountDTO(DataclassDTO[Account]):
    config = DTOConfig(exclude={"api_secret"})


@post("/account", return_dto=AccountDTO)
@requires_credits("seedream_text_to_image")
async def account() -> Account:
    ran.append("account")
    return Account("ann", "never-shown")


@post("/crash")
@requires_credits("seedream_text_to_image")
async def crash() -> dict[str, str]:
    ran.append("crash")
    raise RuntimeError("boom")


@post("/fail")
@requires_credits("seedream_text_to_image")
async def fail() -> Response[dict[str, str]]:
    ran.append("fail")
    return Response({"error": "model failed"}, status_code=500)


def build(guard: CreditGuard) -> Litestar:
    app = Litestar([image, image_with_request, account, crash, fail], middleware=[DemoAuth()])
    app.state.credit_guard = guard
    return app
