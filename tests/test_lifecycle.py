"""A guard survives how apps and test clients really run it: start, close and start again,
on the same event loop or a new one; and it never charges when nobody started it.

FastAPI's ``with TestClient(app)`` runs each block on a new event loop (a test client per
test module), so a module-level guard is started and closed on several loops in one run.
``TestClient(app)`` without ``with`` runs no lifespan at all, and each request on a loop
of its own. Both are tested here as users meet them, on both databases.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from credit_guard import CreditGuard, CreditGuardMiddleware, requires_credits
from credit_guard.problems import TYPE_NOT_STARTED

from .conftest import PG_URL, ledger_rows, pg_problem, reset_postgres, seed_prices
from .helpers import OrgFromHeader

IMAGE = "seedream_text_to_image"
ORG = {"x-org": "org_1"}


async def _fresh(db_url: str, *, fund: int = 100) -> None:
    async with CreditGuard(db_url) as g:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)
        await seed_prices(g)
        await g.grant_credits("org_1", fund)


async def _balance_and_ledger(db_url: str) -> tuple[int, list[dict[str, object]]]:
    async with CreditGuard(db_url) as g:
        return await g.get_balance("org_1"), await ledger_rows(g, "org_1")


async def _set_price(db_url: str, credits: int) -> None:
    """Another process changes the price (its own guard, its own connections)."""
    async with CreditGuard(db_url) as other:
        pricing = next(p for p in await other.list_pricing() if p.feature_key == IMAGE)
        await other.update_pricing(pricing.id, credits=credits)


def test_a_module_level_guard_starts_works_and_closes_on_one_new_event_loop_after_another(db_url: str) -> None:
    """``asyncio.run(cycle())`` twice, each cycle starting, using and closing the same guard:
    charges, holds, refunds, hooks and the pricing listener all work on the second loop."""
    anyio.run(_fresh, db_url)
    guard = CreditGuard(db_url, low_balance_threshold=1000)
    seen: list[int] = []

    @guard.on_charge
    async def on_charge(event: Any) -> None:
        seen.append(event.credits)

    async def cycle() -> None:
        await guard.start()
        assert guard.started
        held = await guard.deduct_credits("org_1", IMAGE, hold=True)
        assert held.success, held
        await guard.settle_charge(held.charge_id)  # type: ignore[arg-type]
        refunded = await guard.deduct_credits("org_1", IMAGE)
        assert (await guard.refund_credits(refunded.charge_id)).refunded  # type: ignore[arg-type]
        await guard.flush()
        await guard.close()
        assert not guard.started

    for _ in range(3):
        asyncio.run(cycle())
    assert seen == [5, 5] * 3
    balance, rows = anyio.run(_balance_and_ledger, db_url)
    assert balance == 100 - 3 * 5
    assert [row["kind"] for row in rows] == ["grant"] + ["charge", "charge", "refund"] * 3
    assert all(row["hold_expires_at"] is None for row in rows)


def test_a_restarted_guard_sees_another_processs_price_change_as_fast_as_on_its_first_start() -> None:
    """start(); close(); start() on one loop, then on a new loop: the listener is back each time."""
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    anyio.run(_fresh, PG_URL)
    guard = CreditGuard(PG_URL, pricing_ttl=3600)

    async def price_seen_within(seconds: float, expected: int) -> bool:
        with anyio.move_on_after(seconds):
            while True:
                pricing = await guard.get_feature_pricing(IMAGE)
                if pricing is not None and pricing.credits == expected:
                    return True
                await anyio.sleep(0.02)
        return False

    async def restarts(prices: list[int]) -> None:
        for price in prices:
            await guard.start()
            assert guard.pricing.notifier is not None and guard.pricing.notifier.listening
            assert (await guard.get_feature_pricing(IMAGE)) is not None  # cached for an hour
            await _set_price(PG_URL, price)
            assert await price_seen_within(2.0, price), f"restarted guard never saw the price become {price}"
            charged = await guard.deduct_credits("org_1", IMAGE)
            assert charged.credits_deducted == price
            await guard.close()

    asyncio.run(restarts([7, 8]))  # the second start follows a close on the same loop
    asyncio.run(restarts([9]))  # and on a new loop


def _fastapi_app(guard: CreditGuard, *, decorated: bool, middleware: bool) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with guard:
            app.state.credit_guard = guard
            yield

    app = FastAPI(lifespan=lifespan)

    async def images() -> dict[str, str]:
        return {"url": "https://cdn.example/1.png"}

    app.post("/v1/images")(requires_credits(IMAGE)(images) if decorated else images)
    if middleware:
        app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"POST /v1/images": IMAGE})
    app.add_middleware(OrgFromHeader)
    return app


@pytest.fixture(params=["decorator", "middleware"])
def guarded_app(request: pytest.FixtureRequest, db_url: str) -> Iterator[tuple[FastAPI, str]]:
    anyio.run(_fresh, db_url)
    guard = CreditGuard(db_url, pricing_ttl=3600)  # module level, as apps write it
    decorated = request.param == "decorator"
    yield _fastapi_app(guard, decorated=decorated, middleware=not decorated), db_url


def test_fastapi_testclient_used_twice_in_one_run_charges_both_times(guarded_app: tuple[FastAPI, str]) -> None:
    app, db_url = guarded_app
    for expected_remaining in (95, 90):
        with TestClient(app) as client:  # each block: a new event loop, a new lifespan
            r = client.post("/v1/images", headers=ORG)
            assert r.status_code == 200, r.text
            assert (r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == ("5", str(expected_remaining))
    if db_url.startswith("postgresql"):
        anyio.run(_set_price, db_url, 7)  # while no client runs: the next start must not trust its cache
        with TestClient(app) as client:
            deadline = time.monotonic() + 2
            while (r := client.post("/v1/images", headers=ORG)).headers.get("x-credits-charged") != "7":
                assert time.monotonic() < deadline, "the restarted app never charged the new price"
    balance, rows = anyio.run(_balance_and_ledger, db_url)
    assert balance == 100 - sum(-int(row["amount"]) for row in rows if row["kind"] == "charge")  # type: ignore[call-overload]
    assert all(row["hold_expires_at"] is None for row in rows)  # every hold settled at close


def test_without_a_lifespan_a_paid_route_answers_a_clear_500_and_charges_nothing(
    guarded_app: tuple[FastAPI, str],
) -> None:
    app, db_url = guarded_app
    client = TestClient(app)  # no `with`: no lifespan, and a new event loop per request
    for _ in range(2):
        r = client.post("/v1/images", headers=ORG)
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["type"] == TYPE_NOT_STARTED
        assert "lifespan" in problem["detail"] and "nothing was charged" in problem["detail"]
        assert "x-credits-charged" not in r.headers
    balance, rows = anyio.run(_balance_and_ledger, db_url)
    assert (balance, [row["kind"] for row in rows]) == (100, ["grant"])


def test_a_guard_used_on_a_new_loop_without_close_rebuilds_its_connections(db_url: str) -> None:
    """The engine API without start/close, from one ``asyncio.run`` to the next: what the
    first loop opened is dropped, not awaited from the second (asyncpg would fail)."""
    anyio.run(_fresh, db_url)
    guard = CreditGuard(db_url)

    async def charge() -> int | None:
        r = await guard.deduct_credits("org_1", IMAGE, hold=True)
        return r.remaining_credits

    assert asyncio.run(charge()) == 95
    assert asyncio.run(charge()) == 90

    async def finish() -> None:
        await guard.close()
        async with CreditGuard(db_url) as other:
            assert await other.audit() == []

    asyncio.run(finish())


def test_a_test_funds_and_reads_the_apps_guard_through_its_testclient_portal(fresh_db: str) -> None:
    """What the README's "Testing your app" shows: the guard lives on the client's loop,
    and ``client.portal.call`` runs its coroutines there."""
    guard = CreditGuard(fresh_db)
    app = _fastapi_app(guard, decorated=True, middleware=False)
    with TestClient(app) as client:
        running = client.app.state.credit_guard  # type: ignore[attr-defined]
        client.portal.call(lambda: running.grant_credits("org_9", 100, idempotency_key="test-fund"))
        r = client.post("/v1/images", headers={"x-org": "org_9"})
        assert (r.headers["X-Credits-Charged"], r.headers["X-Credits-Remaining"]) == ("5", "95")
        assert client.portal.call(running.get_balance, "org_9") == 95


@pytest.mark.anyio
async def test_start_names_the_database_in_the_log_with_the_password_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23: ``CreditGuard()`` without a URL writes ``credit_guard.db`` wherever the
    process started; the start says where, as an absolute path (and never a password)."""
    from sqlalchemy.engine import make_url

    from credit_guard._guard import describe_database

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CREDIT_GUARD_DATABASE_URL", raising=False)
    with caplog.at_level(logging.INFO, logger="credit_guard"):
        async with CreditGuard() as guard:
            await guard.create_schema()
    assert f"credit_guard: started on SQLite file {tmp_path / 'credit_guard.db'}" in caplog.messages
    assert (tmp_path / "credit_guard.db").exists()
    named = describe_database(make_url("postgresql+asyncpg://billing:s3cret@db.internal:5432/credits"))
    assert named == "postgresql+asyncpg://billing:***@db.internal:5432/credits"
