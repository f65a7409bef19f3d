"""credit_guard.testing, as an app's test suite uses it: the plugin's fixtures (loaded by the
pytest11 entry point: nothing here imports them), funding and prices on the app's loop, and
the assertions, with FastAPI's TestClient, httpx's AsyncClient and Litestar's TestClient, on
SQLite and on a PostgreSQL schema of the test's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from litestar import Litestar, post
from litestar.testing import TestClient as LitestarTestClient
from sqlalchemy import text

from credit_guard import CreditGuard
from credit_guard.contrib.litestar import requires_credits as litestar_requires_credits
from credit_guard.contrib.starlette import requires_credits
from credit_guard.testing import (
    CreditKit,
    assert_charged,
    assert_refunded,
    assert_refused,
    drop_isolated,
    fund,
    isolated_url,
    set_price,
)

from .conftest import kit_base_url
from .helpers import OrgFromHeader

ORG = {"X-Org": "org_kit"}


@pytest.fixture(params=["sqlite", "postgres"])
def credit_guard_base_url(request: pytest.FixtureRequest) -> str | None:
    """The kit's documented override: each test below runs on SQLite and on PostgreSQL."""
    return kit_base_url(request.param)


def fastapi_app(guard: CreditGuard) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with guard:
            app.state.credit_guard = guard
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/images")
    @requires_credits("image")
    async def image() -> dict[str, str]:
        return {"url": "https://cdn.example/cat.png"}

    @app.post("/v1/fail")
    @requires_credits("image")
    async def fail() -> JSONResponse:
        return JSONResponse({"error": "the model is down"}, status_code=502)

    @app.post("/v1/crash")
    @requires_credits("image")
    async def crash() -> dict[str, str]:
        raise RuntimeError("the model crashed")

    app.add_middleware(OrgFromHeader)
    return app


def test_fastapi_test_client(credit_guard: CreditGuard) -> None:
    with TestClient(fastapi_app(credit_guard), raise_server_exceptions=False) as client:
        kit = CreditKit.of(client)
        kit.set_price("image", 5)
        assert kit.fund("org_kit", 12) == 12
        assert_charged(client.post("/v1/images", headers=ORG), 5, remaining=7)
        failed = client.post("/v1/fail", headers=ORG)
        assert failed.status_code == 502
        assert_refunded(failed, 5)
        assert client.post("/v1/crash", headers=ORG).status_code == 500  # the server's 500: no headers
        assert kit.balance("org_kit") == 7  # refunded all the same
        assert_charged(client.post("/v1/images", headers=ORG), 5, remaining=2)
        assert_refused(client.post("/v1/images", headers=ORG), required=5, available=2)
        kit.audit()


def test_assertions_fail_on_the_wrong_numbers(credit_guard: CreditGuard) -> None:
    with TestClient(fastapi_app(credit_guard)) as client:
        kit = CreditKit.of(client)
        kit.set_price("image", 5)
        kit.fund("org_kit", 5)
        paid = client.post("/v1/images", headers=ORG)
        with pytest.raises(AssertionError):
            assert_charged(paid, 4)
        with pytest.raises(AssertionError):
            assert_charged(paid, 5, remaining=1)
        with pytest.raises(AssertionError):
            assert_refused(paid)
        with pytest.raises(AssertionError):
            assert_refunded(paid, 5)


@pytest.mark.anyio
async def test_httpx_async_client(credit_guard: CreditGuard) -> None:
    app = fastapi_app(credit_guard)
    async with credit_guard:  # an async test: the app runs on the test's loop, as does the guard
        app.state.credit_guard = credit_guard
        await set_price(credit_guard, "image", 5)
        await fund(credit_guard, "org_kit", 8)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert_charged(await client.post("/v1/images", headers=ORG), 5, remaining=3)
            assert_refused(await client.post("/v1/images", headers=ORG), required=5, available=3)
        assert await credit_guard.get_balance("org_kit") == 3
        assert await credit_guard.audit() == []


def test_litestar_test_client(credit_guard: CreditGuard) -> None:
    @post("/v1/images")
    @litestar_requires_credits("image")
    async def image() -> dict[str, str]:
        return {"url": "https://cdn.example/cat.png"}

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with credit_guard:
            app.state.credit_guard = credit_guard
            yield

    app = Litestar([image], lifespan=[lifespan], middleware=[OrgFromHeader])
    with LitestarTestClient(app) as client:
        kit = CreditKit.of(client)
        kit.set_price("image", 5)
        kit.fund("org_kit", 6)
        assert_charged(client.post("/v1/images", headers=ORG), 5, remaining=1)
        assert_refused(client.post("/v1/images", headers=ORG), required=5, available=1)
        kit.audit()


def test_each_test_has_a_database_of_its_own(credit_guard_url: str, credit_guard_base_url: str | None) -> None:
    """Another isolated URL on the same base is another database (schema); dropping it
    removes its tables and leaves this test's alone."""
    import os
    import tempfile
    from pathlib import Path

    assert os.environ["CREDIT_GUARD_DATABASE_URL"] == credit_guard_url
    with tempfile.TemporaryDirectory() as other_dir:
        other = isolated_url(Path(other_dir), credit_guard_base_url)
        assert other != credit_guard_url

        async def scenario() -> tuple[int, int, list[Any]]:
            async with CreditGuard(credit_guard_url) as mine, CreditGuard(other) as theirs:
                await mine.create_schema()
                await theirs.create_schema()
                await fund(mine, "org_kit", 4)
                await fund(theirs, "org_kit", 9)
                balances = (await mine.get_balance("org_kit"), await theirs.get_balance("org_kit"))
            await drop_isolated(other)
            left: list[Any] = []
            if credit_guard_base_url is not None:
                probe = CreditGuard(credit_guard_base_url)
                async with probe.engine.connect() as conn:
                    schema = other.rsplit("schema=", 1)[1]
                    left = list(
                        await conn.execute(
                            text("select 1 from information_schema.schemata where schema_name = :s"), {"s": schema}
                        )
                    )
                await probe.close()
            return balances[0], balances[1], left

        mine_balance, their_balance, left = anyio.run(scenario)
    assert (mine_balance, their_balance, left) == (4, 9, [])


def test_kit_of_a_client_that_has_not_started_says_so(credit_guard: CreditGuard) -> None:
    client = TestClient(fastapi_app(credit_guard))
    with pytest.raises(RuntimeError, match="started test client"):
        CreditKit.of(client)


@pytest.mark.parametrize("name", ["Bad", "a-b", "x;drop table y", "1abc"])
def test_a_schema_that_is_not_a_plain_identifier_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="schema="):
        CreditGuard(f"postgresql+asyncpg://postgres@127.0.0.1:5432/db?schema={name}")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_client(request: pytest.FixtureRequest, credit_guard_factory: Any) -> Any:
    """One TestClient for the whole module, as most projects write them."""
    guard = credit_guard_factory(base_url=kit_base_url(request.param))
    with TestClient(fastapi_app(guard)) as client:
        yield client


def test_a_module_scoped_client_charges(module_client: Any) -> None:
    credits = CreditKit.of(module_client)
    credits.set_price("image", 5)
    before = credits.fund("org_module_a", 10)
    assert_charged(module_client.post("/v1/images", headers={"X-Org": "org_module_a"}), 5, remaining=before - 5)


def test_another_test_on_the_same_module_client(module_client: Any) -> None:
    credits = CreditKit.of(module_client)
    credits.set_price("image", 5)
    credits.fund("org_module_b", 5)
    assert_charged(module_client.post("/v1/images", headers={"X-Org": "org_module_b"}), 5, remaining=0)
    assert_refused(module_client.post("/v1/images", headers={"X-Org": "org_module_b"}), required=5, available=0)
    credits.audit()


def test_a_guard_built_before_the_fixture_is_called_out(credit_guard_url: str, tmp_path: Any) -> None:
    """The trap a module-level ``CreditGuard()`` sets: built at import, it keeps its own
    database while the test believes it runs on its isolated one."""
    from credit_guard.testing import CreditGuardTestWarning

    elsewhere = CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'developers_real.db'}")
    with TestClient(fastapi_app(elsewhere)) as client, pytest.warns(CreditGuardTestWarning, match="module-level"):
        CreditKit.of(client)
    here = CreditGuard(credit_guard_url)
    with TestClient(fastapi_app(here)) as client:
        import warnings as w

        with w.catch_warnings():
            w.simplefilter("error", CreditGuardTestWarning)
            CreditKit.of(client)  # the test's own database: no warning
