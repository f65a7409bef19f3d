"""The app the real-server tests run under uvicorn (``--factory tests.field_app:create_app``).

A FastAPI app wired as a user would wire it: a module-level guard started in the
lifespan, auth on request state, and paid routes both ways:

* ``/dec/...``: ``@requires_credits``; ``/mw/...``: a ``CreditGuardMiddleware`` rule;
* ``.../slow-dict`` and ``.../slow-response`` sleep ``FIELD_APP_SLOW`` seconds, then return
  a dict or a ``Response`` (a client may hang up meanwhile);
* ``.../fast`` answers at once (load tests).

Configured from the environment: ``FIELD_APP_DATABASE_URL`` (required),
``FIELD_APP_SLOW`` (default 1 s). The payer is the ``X-Org`` header (a test app only).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from credit_guard import CreditGuard, CreditGuardMiddleware, requires_credits

DB_ENV = "FIELD_APP_DATABASE_URL"
SLOW_ENV = "FIELD_APP_SLOW"
FEATURE = "seedream_text_to_image"


def organization_of(request: Any) -> str | None:
    return request.headers.get("x-org")  # a test app: real apps take it from their auth


def create_app() -> FastAPI:
    guard = CreditGuard(os.environ[DB_ENV], organization_resolver=organization_of)
    slow = float(os.environ.get(SLOW_ENV, "1.0"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await guard.create_schema()
        async with guard:
            app.state.credit_guard = guard
            yield

    app = FastAPI(lifespan=lifespan)

    async def slow_dict() -> dict[str, str]:
        await anyio.sleep(slow)
        return {"video": "done"}

    async def slow_response() -> JSONResponse:
        await anyio.sleep(slow)
        return JSONResponse({"video": "done"})

    async def fast() -> PlainTextResponse:
        return PlainTextResponse("ok")

    for name, handler in (("slow-dict", slow_dict), ("slow-response", slow_response), ("fast", fast)):
        app.post(f"/dec/{name}")(requires_credits(FEATURE)(handler))
        app.post(f"/mw/{name}")(handler)

    @app.get("/health")
    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    rules = {f"POST /mw/{name}": FEATURE for name in ("slow-dict", "slow-response", "fast")}
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules=rules)
    return app
