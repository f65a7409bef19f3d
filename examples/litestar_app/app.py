"""The same AI-media API on Litestar, wired by ``CreditGuardPlugin``: routes pay through
their ``opt`` (one keeps the ``@requires_credits`` decorator, which works as well).

Run it:  uvicorn examples.litestar_app.app:app   (SQLite file credit_guard_demo.db;
set CREDIT_GUARD_DATABASE_URL=postgresql+asyncpg://... for PostgreSQL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Litestar, Request, asgi, get, post
from litestar.config.cors import CORSConfig
from litestar.datastructures import Cookie
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.params import Body
from litestar.response import Redirect
from litestar.types import ASGIApp, Receive, Scope, Send

from credit_guard import EXPOSE_HEADERS, CreditGuard, credit_endpoints, current_ticket, requires_credits
from credit_guard.admin.litestar import admin_handlers
from credit_guard.contrib.litestar import CreditGuardPlugin
from examples.demo import DEMO_COOKIE, api_key_from, demo_user, resolve_api_key, seed

DATABASE_URL = os.environ.get("CREDIT_GUARD_DATABASE_URL", "sqlite+aiosqlite:///credit_guard_demo.db")
#: Started and closed in the app's lifespan by CreditGuardPlugin, on whatever loop serves it.
guard = CreditGuard(DATABASE_URL)


class DemoApiKeyAuth(ASGIMiddleware):
    """DEMO auth: maps the X-API-Key header to an organization on request state."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        raw_key = api_key_from(scope.get("headers", []))
        found = resolve_api_key(raw_key)
        if found is not None:
            state: dict[str, Any] = scope.setdefault("state", {})
            state["organization_id"], state["user_id"] = found
            state["user"] = demo_user(raw_key)
        await next_app(scope, receive, send)


@dataclass
class ImageRequest:
    prompt: str
    size: str = "1024x1024"


@dataclass
class VideoRequest:
    image_url: str
    seconds: int = 5


@post("/v1/images", status_code=200, opt={"credits": "seedream_text_to_image"})  # as the FastAPI example
async def text_to_image(data: Annotated[ImageRequest, Body()]) -> dict[str, Any]:
    return {"image_url": f"https://cdn.example/{abs(hash(data.prompt)) % 10**8}.png", "size": data.size}


#: The model renders at most this many seconds, whatever was asked (to show usage refunds).
MAX_RENDERED_SECONDS = 8


async def five_second_blocks(request: Request[Any, Any, Any]) -> float:
    """The video price is for five seconds: 7 s reserve 1.4 units (28 credits, rounded up)."""
    return int((await request.json()).get("seconds", 5)) / 5


@post(
    "/v1/videos",
    status_code=202,
    opt={"credits": "kling_image_to_video", "credits_units": five_second_blocks, "credits_idempotency": True},
)
async def image_to_video(data: Annotated[VideoRequest, Body()], request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Idempotent: a retry with the same Idempotency-Key gets the first answer again
    (status, credit headers and body), unpaid."""
    rendered = min(data.seconds, MAX_RENDERED_SECONDS)
    ticket = current_ticket(request)
    if ticket is not None and rendered < data.seconds:
        ticket.report_usage(rendered / 5)  # the unrendered seconds are refunded, exactly once
    return {"job_id": "vid_123", "status": "queued", "seconds": rendered}


@post("/v1/voice/fail")
@requires_credits("ai_voice_generation")  # the decorator works under the plugin too
async def voice_that_fails() -> dict[str, Any]:
    """Fails on purpose, to show the automatic refund (X-Credits-Refunded)."""
    raise HTTPException(status_code=502, detail="voice model is down (on purpose)")


#: GET /api/credits/balance and /api/credits/check?feature=KEY for the signed-in organization.
credits_api = credit_endpoints()


@asgi("/api/credits", is_mount=True, copy_scope=True)
async def credits(scope: Scope, receive: Receive, send: Send) -> None:
    await credits_api(scope, receive, send)  # type: ignore[arg-type]  # Litestar's ASGI types are narrower


@get("/demo/admin", include_in_schema=False)
async def demo_admin_login() -> Redirect:
    """DEMO ONLY: sign this browser in as the demo administrator and open the admin page."""
    cookie = Cookie(key=DEMO_COOKIE, value="demo-key-admin", httponly=True, samesite="strict")
    return Redirect("/admin/feature-pricing", status_code=303, cookies=[cookie])


async def seed_demo(app: Litestar) -> None:
    await seed(guard)  # the plugin has started the guard (its lifespan runs first)


app = Litestar(
    # admin_handlers(): the pricing admin API, public prices, OpenAPI document and admin page.
    [
        text_to_image,
        image_to_video,
        voice_that_fails,
        credits,
        demo_admin_login,
        *admin_handlers(sign_in_url="/demo/admin"),
    ],
    middleware=[DemoApiKeyAuth()],  # app middleware runs before the plugin's: the organization is known
    plugins=[CreditGuardPlugin(guard)],
    cors_config=CORSConfig(allow_origins=["*"], expose_headers=list(EXPOSE_HEADERS)),
    on_startup=[seed_demo],
)
