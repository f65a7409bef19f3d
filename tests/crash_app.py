"""The app tests/test_crash.py kills with SIGKILL: a real server whose paid requests hang.

Started as ``python -m uvicorn --factory tests.crash_app:create_app`` (a subprocess, so
that killing it kills the guard's process for real: no ``close()``, no flush, no refund
on the way out). Configured from the environment, so the test chooses the database:

* ``CRASH_APP_DATABASE_URL``: the guard's database (the test's SQLite file or PostgreSQL);
* ``CRASH_APP_HOLD_TIMEOUT`` / ``CRASH_APP_SWEEP_INTERVAL``: short, so a restart recovers
  the dead process's holds within about a second instead of the default two minutes.

``POST /v1/render`` costs ``seedream_text_to_image`` and honours ``Idempotency-Key``. It
hangs for a minute when the request says ``X-Hang: 1`` (requests in flight at the kill)
and answers at once otherwise (the retry after the restart). The switch is a header on
purpose: the idempotency fingerprint covers method, path, query and body, not headers,
so a fast retry is still "the same request" as the one that hung.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule

DB_ENV = "CRASH_APP_DATABASE_URL"
HOLD_TIMEOUT_ENV = "CRASH_APP_HOLD_TIMEOUT"
SWEEP_INTERVAL_ENV = "CRASH_APP_SWEEP_INTERVAL"
ORG_HEADER = "x-org"
HANG_HEADER = "x-hang"
FEATURE = "seedream_text_to_image"
PAID_PATH = "/v1/render"
HANG_SECONDS = 60.0


def organization_of(request: HTTPConnection) -> str | None:
    # A test app: the payer comes from a header. Real apps take it from their auth.
    return request.headers.get(ORG_HEADER)


async def render(request: Request) -> JSONResponse:
    body = await request.json()
    if request.headers.get(HANG_HEADER) == "1":
        await anyio.sleep(HANG_SECONDS)  # in flight until the test kills the process
    return JSONResponse({"rendered": body.get("prompt")})


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def create_app() -> Starlette:
    """uvicorn --factory target; reads the environment when uvicorn calls it."""
    guard = CreditGuard(
        os.environ[DB_ENV],
        organization_resolver=organization_of,
        hold_timeout=float(os.environ.get(HOLD_TIMEOUT_ENV, "1.0")),
        sweep_interval=float(os.environ.get(SWEEP_INTERVAL_ENV, "0.2")),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await guard.create_schema()
        await guard.start()
        try:
            yield
        finally:
            await guard.close()

    app = Starlette(
        routes=[Route(PAID_PATH, render, methods=["POST"]), Route("/health", health)],
        lifespan=lifespan,
    )
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules={f"POST {PAID_PATH}": Rule(FEATURE, idempotency=True)})
    return app
