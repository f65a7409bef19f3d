"""A database that stops answering fails closed: 503 + Retry-After, handler not run, nothing lost."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.engine import make_url

from credit_guard import CreditGuard

from .conftest import ledger_rows, reset_postgres, seed_prices
from .tcp_proxy import TcpProxy
from .test_middleware import ORG, build_app, calls, client

pytestmark = pytest.mark.anyio


class Outage:
    """Takes the guard's database away and brings it back, for real, per backend."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.url = db_url
        self._proxy: TcpProxy | None = None
        self._lock: sqlite3.Connection | None = None

    async def __aenter__(self) -> Outage:
        url = make_url(self.db_url)
        if url.get_backend_name() == "postgresql":
            self._proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
            await self._proxy.start()
            self.url = url.set(host="127.0.0.1", port=self._proxy.port).render_as_string(hide_password=False)
        return self

    async def down(self) -> None:
        if self._proxy is not None:
            await self._proxy.stop()
        else:
            # Another process's write lock: every transaction of the guard queues, then times out.
            self._lock = sqlite3.connect(make_url(self.db_url).database, isolation_level=None)
            self._lock.execute("BEGIN EXCLUSIVE")

    async def up(self) -> None:
        if self._proxy is not None:
            await self._proxy.start()
        elif self._lock is not None:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            self._lock = None

    async def __aexit__(self, *exc: object) -> None:
        await self.up()
        if self._proxy is not None:
            await self._proxy.stop()


@pytest.fixture
async def outage(db_url: str) -> AsyncIterator[tuple[Outage, CreditGuard]]:
    async with Outage(db_url) as o, CreditGuard(db_url) as direct:
        await direct.create_schema()
        if direct.engine.dialect.name == "postgresql":
            await reset_postgres(direct)
        await seed_prices(direct)
        await direct.grant_credits("org_1", 100)
        yield o, direct


async def test_database_down_fails_closed_with_503(outage: tuple[Outage, CreditGuard]) -> None:
    o, direct = outage
    calls.clear()
    async with CreditGuard(o.url, timeout=0.5, retry_after=7) as guard:
        app = build_app(guard)
        async with client(app) as c:
            ok = await c.post("/v1/images", headers=ORG)  # warms the pricing cache and the pools
            assert ok.status_code == 200
            await guard.flush()  # its hold settled: only an outage could change the rows now
            before = await ledger_rows(direct)
            await o.down()
            down = await c.post("/v1/images", headers=ORG)
            assert down.status_code == 503
            assert down.headers["retry-after"] == "7"
            assert down.headers["content-type"] == "application/problem+json"
            assert down.json()["type"].endswith("credits-unavailable")
            assert calls == ["images"]  # the handler did not run during the outage
            await o.up()
            assert await ledger_rows(direct) == before
            assert await direct.get_balance("org_1") == 95
            again = await c.post("/v1/images", headers=ORG)
            assert (again.status_code, again.headers["x-credits-remaining"]) == (200, "90")
    assert await direct.audit() == []


async def test_fail_open_serves_free_during_an_outage(outage: tuple[Outage, CreditGuard]) -> None:
    o, direct = outage
    calls.clear()
    async with CreditGuard(o.url, timeout=0.5, fail_open=True) as guard:
        async with client(build_app(guard)) as c:
            assert (await c.post("/v1/images", headers=ORG)).status_code == 200
            await o.down()
            r = await c.post("/v1/images", headers=ORG)
            await o.up()
    assert (r.status_code, r.headers["x-credits-charged"]) == (200, "0")
    assert calls == ["images", "images"]
    assert await direct.get_balance("org_1") == 95
