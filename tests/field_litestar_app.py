"""A Litestar app wired the Litestar way, for the real-server tests (uvicorn ``--factory
tests.field_litestar_app:create_app``): ``CreditGuardPlugin`` owns the guard's lifespan, and
routes pay through ``opt``.

* ``/ls/slow`` sleeps ``FIELD_APP_SLOW`` seconds, then answers (a client may hang up meanwhile);
* ``/ls/fast`` answers at once and honours ``Idempotency-Key``;
* ``/ls/flaky`` answers at once, or 502 when the request says ``X-Fail: 1`` (refunded).

``FIELD_APP_DATABASE_URL`` (required) names the database; the payer is the ``X-Org`` header
(a test app only: real apps take it from their auth).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from litestar import Litestar, Request, get, post
from litestar.exceptions import HTTPException

from credit_guard import CreditGuard
from credit_guard.contrib.litestar import CreditGuardPlugin

DB_ENV = "FIELD_APP_DATABASE_URL"
SLOW_ENV = "FIELD_APP_SLOW"
FEATURE = "seedream_text_to_image"


def organization_of(request: Any) -> str | None:
    return request.headers.get("x-org")  # type: ignore[no-any-return]


def create_app() -> Litestar:
    guard = CreditGuard(os.environ[DB_ENV], organization_resolver=organization_of)
    slow = float(os.environ.get(SLOW_ENV, "1.0"))

    @post("/ls/slow", opt={"credits": FEATURE})
    async def slow_route() -> dict[str, str]:
        await anyio.sleep(slow)
        return {"video": "done"}

    @post("/ls/fast", opt={"credits": FEATURE, "credits_idempotency": True})
    async def fast_route() -> dict[str, str]:
        return {"image": "done"}

    @post("/ls/flaky", opt={"credits": FEATURE})
    async def flaky_route(request: Request[Any, Any, Any]) -> dict[str, str]:
        if request.headers.get("x-fail") == "1":
            raise HTTPException(status_code=502, detail="the model server is down")
        return {"image": "done"}

    @get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    return Litestar(
        [slow_route, fast_route, flaky_route, health], plugins=[CreditGuardPlugin(guard, create_schema=True)]
    )
