"""Rate limits next to credits (``rate=``): 429 before any charge, counted per organization
or member, in memory or in Redis shared by several guards (workers), and an outage of the
rate limit storage treated like the database's: 503, or free of limits under fail_open.

Every test runs on both databases; the Redis ones use the real server on 127.0.0.1:6379
with a key prefix of their own (deleted after), so nothing else on that server is touched."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from fastapi import FastAPI
from limits.aio.storage import RedisStorage
from starlette.requests import Request

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule, requires_credits
from credit_guard._openapi import refusals
from credit_guard._ratelimit import release_storage

from .conftest import ledger_rows, reset_postgres, seed_prices
from .helpers import OrgFromHeader, client

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"  # 5 credits
REDIS_URI = "async+redis://127.0.0.1:6379"


def app_with(guard: CreditGuard, **options: object) -> FastAPI:
    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/v1/images")
    @requires_credits(IMAGE, **options)  # type: ignore[arg-type]
    async def images(request: Request) -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(OrgFromHeader)
    return app


async def charges(guard: CreditGuard, org: str) -> list[int]:
    return [int(r["amount"]) for r in await ledger_rows(guard, org) if r["kind"] == "charge"]  # type: ignore[call-overload]


async def test_over_its_rate_a_request_is_answered_429_and_charged_nothing(guard: CreditGuard) -> None:
    await guard.grant_credits("acme", 100)
    async with client(app_with(guard, rate="3/minute")) as http:
        answers = [await http.post("/v1/images", headers={"x-org": "acme"}) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    refused = answers[3]
    assert refused.headers["content-type"] == "application/problem+json"
    body = refused.json()
    assert body["type"] == "urn:credit-guard:problem:rate-limited" and body["status"] == 429
    assert (body["feature"], body["limit"], body["allowed"], body["window"]) == (IMAGE, "rate", 3, 60)
    assert body["per"] == "organization"
    assert "3 per 1 minute" in body["detail"] and "nothing was charged" in body["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60 and body["retry_after"] == int(refused.headers["retry-after"])
    assert refused.headers["ratelimit-limit"] == "3" and refused.headers["ratelimit-remaining"] == "0"
    assert refused.headers["ratelimit-reset"] == refused.headers["retry-after"]
    assert refused.headers["ratelimit-policy"] == "3;w=60"
    assert "x-credits-charged" not in refused.headers
    assert await guard.get_balance("acme") == 100 - 3 * 5
    assert await charges(guard, "acme") == [-5, -5, -5]
    assert await guard.audit() == []


async def test_each_organization_and_each_member_has_a_window_of_its_own(guard: CreditGuard) -> None:
    for org in ("acme", "globex"):
        await guard.grant_credits(org, 100)
    async with client(app_with(guard, rate="2/minute")) as http:
        statuses = [
            (await http.post("/v1/images", headers={"x-org": o})).status_code for o in ["acme"] * 3 + ["globex"] * 3
        ]
    assert statuses == [200, 200, 429, 200, 200, 429]

    async with client(app_with(guard, rate="1/minute", rate_by="member")) as http:
        members = ["ann", "bob", "ann", "bob", "cy"]
        got = [(await http.post("/v1/images", headers={"x-org": "acme", "x-user": m})).status_code for m in members]
        refused = await http.post("/v1/images", headers={"x-org": "acme", "x-user": "ann"})
    assert got == [200, 200, 429, 429, 200]
    assert refused.json()["per"] == "member"
    assert await guard.get_balance("acme") == 100 - 2 * 5 - 3 * 5
    assert await guard.audit() == []


async def test_a_refused_charge_still_counts_but_bad_input_does_not(guard: CreditGuard) -> None:
    """The window counts requests that reached the charge (a 402 did); one refused earlier
    (no organization) never reached it."""
    async with client(app_with(guard, rate="2/minute")) as http:
        assert (await http.post("/v1/images")).status_code == 401
        assert (await http.post("/v1/images", headers={"x-org": "poor"})).status_code == 402
        await guard.grant_credits("poor", 50)
        assert (await http.post("/v1/images", headers={"x-org": "poor"})).status_code == 200
        assert (await http.post("/v1/images", headers={"x-org": "poor"})).status_code == 429
    assert await guard.get_balance("poor") == 45


async def test_the_middleware_rule_and_several_limits(guard: CreditGuard) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def images(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/images", images, methods=["POST"])])
    app.add_middleware(
        CreditGuardMiddleware, guard=guard, rules={"POST /v1/images": Rule(IMAGE, rate="5/minute;2/second")}
    )
    app.add_middleware(OrgFromHeader)
    await guard.grant_credits("acme", 100)
    async with client(app) as http:
        statuses = [(await http.post("/v1/images", headers={"x-org": "acme"})).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = await http.post("/v1/images", headers={"x-org": "acme"})
        assert refused.headers["ratelimit-policy"] == "2;w=1" and refused.headers["retry-after"] == "1"
    assert await guard.get_balance("acme") == 90


def test_a_bad_rate_fails_when_the_route_is_declared() -> None:
    with pytest.raises(ValueError, match="not a rate like '10/minute'"):
        requires_credits(IMAGE, rate="ten a minute")
    with pytest.raises(TypeError, match="rate must be a string"):
        Rule(IMAGE, rate=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_by must be one of organization, member"):
        Rule(IMAGE, rate="1/second", rate_by="user")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_limit_storage must be a URI"):
        CreditGuard("sqlite+aiosqlite://", rate_limit_storage="redis")


def test_openapi_documents_the_429_on_rate_limited_routes_only() -> None:
    limited = refusals(Rule(IMAGE, rate="10/minute", rate_by="member"), idempotency="off")
    assert "429" in limited and "10/minute per member" in limited["429"]["description"]
    headers = limited["429"]["headers"]
    assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "RateLimit-Policy"} <= set(
        headers
    )
    assert "rate limit storage" in limited["503"]["description"]
    assert "429" not in refusals(Rule(IMAGE), idempotency="off")


# -- Redis: many workers, one window -----------------------------------------------------------


@pytest.fixture
async def redis_storage() -> AsyncIterator[RedisStorage]:
    """A Redis storage with a key prefix of its own; a failure (not a skip) in CI without Redis."""
    storage = RedisStorage(REDIS_URI, wrap_exceptions=True, key_prefix=f"cg-test-{uuid.uuid4().hex}")
    try:
        with anyio.fail_after(5):
            await storage.check() or pytest.fail("Redis ping failed")
    except Exception as exc:  # any reason it cannot be reached
        if os.environ.get("CREDIT_GUARD_REQUIRE_REDIS"):
            pytest.fail(f"Redis at 127.0.0.1:6379 is required here: {exc}")
        pytest.skip(f"no Redis at 127.0.0.1:6379: {exc}")
    try:
        yield storage
    finally:
        await storage.reset()
        await release_storage(storage)


async def test_two_workers_sharing_redis_let_exactly_the_rate_through_under_concurrency(
    db_url: str, redis_storage: RedisStorage
) -> None:
    """Two guards (two worker processes' worth: separate pools, separate caches) on one
    database and one Redis: 60 concurrent requests against 10/minute -> exactly 10 charged."""
    async with (
        CreditGuard(db_url, rate_limit_storage=redis_storage) as one,
        CreditGuard(db_url, rate_limit_storage=redis_storage) as two,
    ):
        await one.create_schema()
        if one.engine.dialect.name == "postgresql":
            await reset_postgres(one)
        await seed_prices(one)
        await one.grant_credits("acme", 1000)
        statuses: list[int] = []
        async with client(app_with(one, rate="10/minute")) as a, client(app_with(two, rate="10/minute")) as b:

            async def call(http: httpx.AsyncClient) -> None:
                statuses.append((await http.post("/v1/images", headers={"x-org": "acme"})).status_code)

            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(call, a if i % 2 else b)
        assert sorted(statuses) == [200] * 10 + [429] * 50
        assert await one.get_balance("acme") == 1000 - 10 * 5
        assert await charges(one, "acme") == [-5] * 10
        assert await one.audit() == []


async def test_a_redis_outage_fails_closed_and_fail_open_serves_without_limits(db_url: str) -> None:
    nowhere = "redis://127.0.0.1:1"  # nothing listens there: connection refused
    async with CreditGuard(db_url, rate_limit_storage=nowhere) as closed:
        await closed.create_schema()
        if closed.engine.dialect.name == "postgresql":
            await reset_postgres(closed)
        await seed_prices(closed)
        await closed.grant_credits("acme", 100)
        async with client(app_with(closed, rate="10/minute")) as http:
            down = await http.post("/v1/images", headers={"x-org": "acme"})
        assert down.status_code == 503 and down.headers["retry-after"] == "5"
        assert "rate limit storage cannot be reached" in down.json()["detail"]
        assert await closed.get_balance("acme") == 100 and await charges(closed, "acme") == []
    async with CreditGuard(db_url, rate_limit_storage=nowhere, fail_open=True) as open_:
        async with client(app_with(open_, rate="1/minute")) as http:
            statuses = [(await http.post("/v1/images", headers={"x-org": "acme"})).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]  # no limit without its storage, but every one paid for
        assert await open_.get_balance("acme") == 85
        assert await open_.audit() == []


async def test_a_litestar_opt_route_takes_its_rate_from_opt(guard: CreditGuard) -> None:
    from litestar import Litestar, post

    from credit_guard.contrib.litestar import CreditGuardPlugin

    from .litestar_handlers import DemoAuth

    @post("/v1/images", opt={"credits": IMAGE, "credits_rate": "2/minute", "credits_rate_by": "member"})
    async def images() -> dict[str, bool]:
        return {"ok": True}

    app = Litestar([images], middleware=[DemoAuth()], plugins=[CreditGuardPlugin(guard)])
    await guard.grant_credits("org_1", 100)
    async with client(app) as http:  # type: ignore[arg-type]
        statuses = [(await http.post("/v1/images", headers={"x-org": "org_1"})).status_code for _ in range(3)]
        refused = await http.post("/v1/images", headers={"x-org": "org_1"})
    assert statuses == [201, 201, 429]
    assert refused.json()["per"] == "member" and refused.headers["ratelimit-limit"] == "2"
    assert await guard.get_balance("org_1") == 90
    with pytest.raises(ValueError, match="credits_rate"):
        Litestar(
            [post("/x", opt={"credits": IMAGE, "credits_rate": "often"})(images.fn)], plugins=[CreditGuardPlugin(guard)]
        )
