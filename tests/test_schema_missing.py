"""Issue 23: missing tables are a missed deployment step, said plainly, never an outage
and never a free pass. Both databases: a SQLite file nobody initialised, and a PostgreSQL
schema (``?schema=``) without credit_guard's tables."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from credit_guard import CreditGuard, SchemaMissing, StorageUnavailable, requires_credits

from .conftest import PG_URL, pg_problem

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'never_initialised.db'}"
        return
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    yield f"{PG_URL}?schema=cg_missing_{uuid.uuid4().hex[:8]}"  # a schema nobody created


async def test_the_python_api_says_the_tables_are_missing_and_how_to_create_them(empty_url: str) -> None:
    async with CreditGuard(empty_url) as guard:
        with pytest.raises(SchemaMissing, match=r"create_schema\(\)` or `credit-guard init`") as caught:
            await guard.deduct_credits("org_1", "anything")
        assert isinstance(caught.value, StorageUnavailable)  # code catching that keeps working
        with pytest.raises(SchemaMissing):
            await guard.get_balance("org_1")


@pytest.mark.parametrize("fail_open", [False, True])
async def test_a_paid_route_answers_503_schema_missing_and_never_runs_free(empty_url: str, fail_open: bool) -> None:
    guard = CreditGuard(empty_url, fail_open=fail_open, organization_resolver=lambda request: "org_1")
    ran: list[str] = []

    @requires_credits("image", guard=guard)
    async def paid(request: Request) -> PlainTextResponse:
        ran.append("ran")
        return PlainTextResponse("made")

    async with guard:
        app = Starlette(routes=[Route("/image", paid, methods=["POST"])])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            answer = await client.post("/image")
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["type"].endswith("schema-missing")
    assert "credit-guard init" in body["detail"]
    assert "Retry-After" in answer.headers
    assert ran == []
