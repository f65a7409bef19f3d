"""A small AI-media API paid for in credits, on FastAPI.

Run it:  uvicorn examples.fastapi_app.app:app   (SQLite file credit_guard_demo.db;
set CREDIT_GUARD_DATABASE_URL=postgresql+asyncpg://... for PostgreSQL; CREDIT_GUARD_METRICS=prometheus
adds GET /metrics).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_guard import EXPOSE_HEADERS, CreditGuard, credit_endpoints, current_ticket, requires_credits
from credit_guard.admin import admin_app
from credit_guard.contrib.fastapi import document_credits
from credit_guard.contrib.stripe import stripe_webhook
from credit_guard.events import LowBalanceEvent
from examples.demo import DEMO_COOKIE, api_key_from, demo_user, resolve_api_key, seed

DATABASE_URL = os.environ.get("CREDIT_GUARD_DATABASE_URL", "sqlite+aiosqlite:///credit_guard_demo.db")
log = logging.getLogger("credit_guard.demo")
#: The model renders at most this many seconds, whatever was asked (to show a partial capture).
MAX_RENDERED_SECONDS = 8
#: Seconds between two streamed chat tokens (a model's pace).
TOKEN_DELAY = float(os.environ.get("DEMO_TOKEN_DELAY", "0.05"))


class DemoApiKeyAuth:
    """DEMO auth: maps the X-API-Key header to an organization on request state."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_key = api_key_from(scope["headers"])
            found = resolve_api_key(raw_key)
            if found is not None:
                state = scope.setdefault("state", {})
                state["organization_id"], state["user_id"] = found
                state["user"] = demo_user(raw_key)
        await self.app(scope, receive, send)


guard = CreditGuard(DATABASE_URL, low_balance_threshold=50)


@guard.on_low_balance
async def warn_low_balance(event: LowBalanceEvent) -> None:
    # A real app sends an e-mail or a webhook here; a slow or failing hook never
    # slows or breaks the request that crossed the line.
    log.warning("organization %s is down to %s credits", event.organization_id, event.balance)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # `async with` starts the guard on the serving loop (hold keeper, hooks, pricing listener)
    # and closes it at shutdown (a test client per module may start it again); seeding is
    # safe from every worker at once.
    async with guard:
        await seed(guard)
        app.state.credit_guard = guard
        yield


app = FastAPI(title="credit_guard demo: AI media API", lifespan=lifespan)
# /openapi.json shows each paid route's 402/401/403/503, X-Credits-* headers and price source.
document_credits(app, guard=guard)
# Added last = runs first: auth puts the organization on request state before any guard
# looks, and CORS, outermost, answers preflights and decorates every answer (402s included).
app.add_middleware(DemoApiKeyAuth)
app.add_middleware(
    CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], expose_headers=list(EXPOSE_HEADERS)
)


class ImageRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)
    size: str = "1024x1024"


class VideoRequest(BaseModel):
    image_url: str
    seconds: int = Field(default=5, ge=1, le=10)


@app.post("/v1/images")
@requires_credits("seedream_text_to_image")
async def text_to_image(body: ImageRequest) -> dict[str, Any]:
    return {"image_url": f"https://cdn.example/{abs(hash(body.prompt)) % 10**8}.png", "size": body.size}


async def five_second_blocks(request: Request) -> float:
    """The video price is for five seconds: 7 s reserve 1.4 units (28 credits, rounded up)."""
    return int((await request.json()).get("seconds", 5)) / 5


@app.post("/v1/videos", status_code=202)
@requires_credits("kling_image_to_video", units=five_second_blocks, idempotency=True)
async def image_to_video(body: VideoRequest, request: Request) -> JSONResponse:
    """An async job: the provider answers with a task id and finishes minutes later.

    The charge becomes a reservation held under the job's id (for up to an hour, whatever
    happens to this process); the provider's completion call below captures what was
    rendered, or releases it all. Idempotent: a retry with the same Idempotency-Key gets
    this answer (the same job) again, unpaid. Returns a Response so the replay has the body.
    """
    job_id = f"vid_{uuid.uuid4().hex}"
    ticket = current_ticket(request)
    if ticket is not None:
        await ticket.reserve_for(job_id, ttl=3600)
    return JSONResponse({"job_id": job_id, "status": "queued", "seconds": body.seconds}, status_code=202)


@app.post("/v1/clips")
@requires_credits("veo_video_clip")
async def video_clip(body: ImageRequest) -> dict[str, Any]:
    """Paid from the "video" credit pool (its pricing row says so): only credits granted to
    that pool pay for it, and its answers say ``X-Credits-Pool: video``."""
    return {"clip_url": f"https://cdn.example/{abs(hash(body.prompt)) % 10**8}.mp4"}


class VideoCompletion(BaseModel):
    status: Literal["succeeded", "failed"]
    seconds_rendered: float = Field(default=0, ge=0, le=60)


@app.post("/v1/videos/{job_id}/complete")
async def video_completed(job_id: str, body: VideoCompletion, request: Request) -> dict[str, Any]:
    """What the video provider calls when the job ends (a real provider signs this call:
    verify its signature here). Captures the rendered seconds at the reserved price and
    refunds the rest, or releases everything when the job failed. Calling it again (a
    provider's retry) moves nothing."""
    guard: CreditGuard = request.app.state.credit_guard
    try:
        if body.status == "succeeded":
            done = await guard.capture(job_id, units=min(body.seconds_rendered, MAX_RENDERED_SECONDS) / 5)
        else:
            done = await guard.release(job_id)
    except LookupError:  # no reservation has this id
        raise HTTPException(status_code=404, detail=f"no job {job_id[:80]!r}") from None
    except ValueError as exc:  # not a job id at all (empty, over 255 characters, a NUL)
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return {
        "job_id": job_id,
        "state": done.state,
        "credits_kept": done.captured_credits,
        "credits_refunded": done.refunded_credits,
    }


class ChatRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)
    max_tokens: int = Field(default=16, ge=1, le=64)


async def max_tokens(request: Request) -> int:
    """The reserve: one credit per token the answer may have."""
    return int((await request.json()).get("max_tokens", 16))


@app.post("/v1/chat")
@requires_credits("llm_chat_token", units=max_tokens, on_disconnect="charge_usage", rate="30/minute", rate_by="member")
async def chat(body: ChatRequest, request: Request) -> StreamingResponse:
    """A chat answer streamed as server-sent events, paid per token: ``max_tokens`` credits
    are reserved before the model runs and the charge settles at the tokens streamed. A
    client that hangs up mid-answer pays for the tokens it was sent (``on_disconnect``),
    and each member may start 30 answers a minute (``rate``, a 429 past it, nothing charged)."""
    ticket = current_ticket(request)
    words = (f"You asked about {body.prompt!r}. " + "Here is a long and careful answer. " * 8).split()

    async def tokens() -> AsyncIterator[str]:
        for produced, word in enumerate(words[: body.max_tokens], start=1):
            await anyio.sleep(TOKEN_DELAY)
            if ticket is not None:
                ticket.report_usage(produced)  # the total so far: what a hang-up now costs
            yield f"data: {json.dumps({'token': word})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(tokens(), media_type="text/event-stream")


@app.post("/v1/voice/fail")
@requires_credits("ai_voice_generation")
async def voice_that_fails() -> dict[str, Any]:
    """Fails on purpose, to show the automatic refund (X-Credits-Refunded)."""
    raise HTTPException(status_code=502, detail="voice model is down (on purpose)")


def credit_pack(event: Any) -> tuple[str, int] | None:
    """A paid Stripe Checkout session grants the credit pack its metadata names (set when
    the session was created: ``metadata={"organization_id": ..., "credits": "500"}``)."""
    if event["type"] != "checkout.session.completed":
        return None
    session = event["data"]["object"]
    if session["payment_status"] != "paid":
        return None
    return session["metadata"]["organization_id"], int(session["metadata"]["credits"])


# Stripe top-ups: the endpoint's signing secret from the Stripe dashboard (a demo one by
# default); each event grants once, however often Stripe delivers it.
# A Route to an ASGI app (Starlette serves an object with __call__ as one), before the admin
# app's catch-all mount below.
app.router.routes.append(
    Route(
        "/webhooks/stripe",
        stripe_webhook(guard, secret=os.environ.get("STRIPE_WEBHOOK_SECRET", "whsec_demo"), credits_for=credit_pack),
        methods=["POST"],
    )
)

# GET /api/credits/balance, /grants, /usage?days=N and /check?feature=KEY for the signed-in
# organization, and /api/credits/widget.js, the billing-page widget (GET /billing below).
app.mount("/api/credits", credit_endpoints())

#: The billing page's own look, allowed by its hash: the page runs under a strict CSP.
BILLING_CSS = "body{font-family:system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem}"
BILLING_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        f"style-src 'self' 'sha256-{base64.b64encode(hashlib.sha256(BILLING_CSS.encode()).digest()).decode()}'",
        "connect-src 'self'",
        "img-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
BILLING_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Billing · credit_guard demo</title>
<style>{BILLING_CSS}</style>
<script src="/api/credits/widget.js" defer></script>
</head>
<body>
<h1>Billing</h1>
<div data-credit-guard></div>
<p><a href="/demo/billing">Sign in as the demo organization</a></p>
</body>
</html>
"""


@app.get("/billing", include_in_schema=False)
async def billing() -> HTMLResponse:
    """The billing page: the credit widget, for whoever the demo auth signed in (the
    X-API-Key header or the demo cookie; /demo/billing sets it). The widget asks
    /api/credits for the balance, grants and usage with the page's cookies."""
    return HTMLResponse(BILLING_PAGE, headers={"Content-Security-Policy": BILLING_CSP, "Cache-Control": "no-store"})


@app.get("/demo/billing", include_in_schema=False)
async def demo_billing_login() -> RedirectResponse:
    """DEMO ONLY: sign this browser in as the demo organization (Alice, not an admin)."""
    response = RedirectResponse("/billing", status_code=303)
    response.set_cookie(DEMO_COOKIE, "demo-key-rich", httponly=True, samesite="strict")
    return response


@app.get("/demo/admin", include_in_schema=False)
async def demo_admin_login() -> RedirectResponse:
    """DEMO ONLY: sign this browser in as the demo administrator and open the admin page."""
    response = RedirectResponse("/admin/feature-pricing", status_code=303)
    response.set_cookie(DEMO_COOKIE, "demo-key-admin", httponly=True, samesite="strict")
    return response


# Metrics, opt-in: CREDIT_GUARD_METRICS=prometheus reports the guard's OpenTelemetry metrics
# through the Prometheus exporter, served at GET /metrics (before the catch-all mount below).
# Needs: pip install "credit_guard[otel]" opentelemetry-exporter-prometheus
metrics_provider: Any = None  # the MeterProvider, when enabled
if os.environ.get("CREDIT_GUARD_METRICS") == "prometheus":
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.responses import Response

    from credit_guard.contrib.opentelemetry import instrument

    metrics_provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    instrument(guard, meter_provider=metrics_provider)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        # A plain def: FastAPI runs it in a thread, where the open-holds gauges can wait for
        # their count (one query per scrape, on the guard's loop; never on a paid request).
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# Pricing admin API (/api/admin/...), public prices (/api/features/pricing) and the admin
# page (/admin/feature-pricing), for users whose request.state.user has is_admin=True.
# Mounted last, so FastAPI's own routes match first; its OpenAPI document moves aside
# because FastAPI already serves /openapi.json.
app.mount("/", admin_app(openapi_path="/api/admin/openapi.json", sign_in_url="/demo/admin"))
