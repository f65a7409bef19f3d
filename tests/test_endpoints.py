"""The balance and check endpoints, in-process, mounted in Starlette, FastAPI and Litestar."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from litestar import Litestar, asgi
from litestar.datastructures import State
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_guard import CreditGuard, credit_endpoints
from credit_guard.problems import TYPE_FEATURE_NOT_FOUND, TYPE_INVALID_REQUEST, TYPE_NO_ORGANIZATION, TYPE_UNAVAILABLE

from .conftest import ledger_rows
from .test_middleware import ORG, DemoAuth, client
from .test_outage import Outage

pytestmark = pytest.mark.anyio

PREFIX = "/api/credits"


def starlette_app(guard: CreditGuard) -> ASGIApp:
    app = Starlette(routes=[Mount(PREFIX, credit_endpoints())])
    app.state.credit_guard = guard  # found per request, as an app sets it in its lifespan
    return DemoAuth(app)


def fastapi_app(guard: CreditGuard) -> ASGIApp:
    app = FastAPI()
    app.mount(PREFIX, credit_endpoints(guard))
    return DemoAuth(app)


def litestar_app(guard: CreditGuard) -> ASGIApp:
    endpoints = credit_endpoints()

    @asgi(PREFIX, is_mount=True, copy_scope=True)
    async def credits(scope: Scope, receive: Receive, send: Send) -> None:
        await endpoints(scope, receive, send)

    return DemoAuth(Litestar([credits], state=State({"credit_guard": guard})))  # type: ignore[arg-type]


APPS = {"starlette": starlette_app, "fastapi": fastapi_app, "litestar": litestar_app}


@pytest.fixture(params=list(APPS))
def build(request: pytest.FixtureRequest) -> Any:
    return APPS[request.param]


def problem(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert (body["status"], body["type"]) == (status, type_)
    return body


async def test_balance_and_check_answer_for_the_signed_in_organization(guard: CreditGuard, build: Any) -> None:
    await guard.grant_credits("org_1", 12)
    await guard.grant_credits("org_other", 500)
    async with client(build(guard)) as c:
        balance = await c.get(f"{PREFIX}/balance", headers=ORG)
        enough = await c.get(f"{PREFIX}/check", params={"feature": "seedream_text_to_image"}, headers=ORG)
        short = await c.get(f"{PREFIX}/check/", params={"feature": "kling_image_to_video"}, headers=ORG)
    assert balance.json() == {"organization_id": "org_1", "credits": 12}
    assert (balance.headers["x-credits-remaining"], balance.headers["cache-control"]) == ("12", "no-store")
    assert enough.json() == {"feature": "seedream_text_to_image", "has_enough": True, "required": 5, "available": 12}
    assert short.json() == {"feature": "kling_image_to_video", "has_enough": False, "required": 20, "available": 12}
    assert await guard.get_balance("org_1") == 12  # a check reserves nothing
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant"]


async def test_unknown_organization_has_zero_credits(guard: CreditGuard, build: Any) -> None:
    async with client(build(guard)) as c:
        r = await c.get(f"{PREFIX}/balance", headers={"x-org": "org_new"})
    assert r.json() == {"organization_id": "org_new", "credits": 0}


async def test_refusals_are_problem_json(guard: CreditGuard, build: Any) -> None:
    async with client(build(guard)) as c:
        anonymous_balance = await c.get(f"{PREFIX}/balance")
        anonymous_check = await c.get(f"{PREFIX}/check", params={"feature": "seedream_text_to_image"})
        missing = await c.get(f"{PREFIX}/check", headers=ORG)
        invalid = await c.get(f"{PREFIX}/check", params={"feature": "Robert'); DROP"}, headers=ORG)
        unknown = await c.get(f"{PREFIX}/check", params={"feature": "no_such_feature"}, headers=ORG)
        inactive = await c.get(f"{PREFIX}/check", params={"feature": "retired_feature"}, headers=ORG)
        wrong_method = await c.post(f"{PREFIX}/balance", headers=ORG)
        wrong_path = await c.get(f"{PREFIX}/nope", headers=ORG)
    problem(anonymous_balance, 401, TYPE_NO_ORGANIZATION)
    problem(anonymous_check, 401, TYPE_NO_ORGANIZATION)
    assert problem(missing, 400, TYPE_INVALID_REQUEST)["errors"] == {"feature": "required query parameter"}
    assert list(problem(invalid, 400, TYPE_INVALID_REQUEST)["errors"]) == ["feature"]
    assert problem(unknown, 404, TYPE_FEATURE_NOT_FOUND)["feature"] == "no_such_feature"
    assert problem(inactive, 404, TYPE_FEATURE_NOT_FOUND)["feature"] == "retired_feature"
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "GET, HEAD")
    assert wrong_path.status_code == 404


async def test_endpoints_use_the_guards_organization_resolver(guard: CreditGuard) -> None:
    """The same rule as charging: a custom resolver decides, and request state is ignored."""

    def from_tenant_header(conn: HTTPConnection) -> str | None:
        return conn.headers.get("x-tenant")

    guard.organization_resolver = from_tenant_header
    await guard.grant_credits("org_tenant", 7)
    async with client(starlette_app(guard)) as c:
        by_tenant = await c.get(f"{PREFIX}/balance", headers={"x-tenant": "org_tenant"})
        by_state_only = await c.get(f"{PREFIX}/balance", headers=ORG)
    assert by_tenant.json() == {"organization_id": "org_tenant", "credits": 7}
    assert by_state_only.status_code == 401


async def test_missing_guard_is_a_configuration_error() -> None:
    app = Starlette(routes=[Mount(PREFIX, credit_endpoints())])
    async with client(DemoAuth(app)) as c:
        r = await c.get(f"{PREFIX}/balance", headers=ORG)
    assert r.status_code == 500


async def test_database_down_answers_503_with_retry_after(db_url: str) -> None:
    async with Outage(db_url) as o, CreditGuard(db_url) as direct:
        await direct.create_schema()
        async with CreditGuard(o.url, timeout=0.5, retry_after=9) as guard:
            async with client(starlette_app(guard)) as c:
                await o.down()
                r = await c.get(f"{PREFIX}/balance", headers=ORG)
                await o.up()
                again = await c.get(f"{PREFIX}/balance", headers=ORG)
    problem(r, 503, TYPE_UNAVAILABLE)
    assert r.headers["retry-after"] == "9"
    assert again.status_code == 200
