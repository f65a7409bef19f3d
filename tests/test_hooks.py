"""The guard's async hooks (events.py and CreditGuard.on_*), on SQLite and PostgreSQL.

Hooks feed metrics, e-mails and webhooks, so two things must hold at once: every money
event reaches them with the numbers the ledger shows, and nothing a hook does (raise,
hang, fall behind) can slow, break or change the paid request that triggered it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule, current_ticket
from credit_guard._clock import utcnow
from credit_guard._hooks import HookDispatcher
from credit_guard.events import (
    ChargeEvent,
    InsufficientCreditsEvent,
    LowBalanceEvent,
    RefundEvent,
    crossed_below,
)

from .conftest import ledger_rows, reset_postgres, seed_prices
from .helpers import OrgFromHeader, client

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"  # 5 credits
VIDEO = "kling_image_to_video"  # 20 credits
ORG = {"x-org": "org_1"}
#: A bound for waits that succeed at once when the code is right; only hit when it is not.
NEVER = 10.0


class Recorder:
    """An async hook (a callable object, the form a metrics client usually takes) that keeps what it saw."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def __call__(self, event: Any) -> None:
        self.events.append(event)


Auth = OrgFromHeader


def build_app(guard: CreditGuard, gate: asyncio.Event | None = None) -> Starlette:
    """A paid API: a plain route, two failing ones, a metered one, and one that waits on ``gate``."""

    async def images(request: Request) -> JSONResponse:
        return JSONResponse({"url": "https://cdn.example/1.png"})

    async def crash(request: Request) -> JSONResponse:
        raise RuntimeError("model server exploded")

    async def upstream(request: Request) -> JSONResponse:
        return JSONResponse({"error": "upstream"}, status_code=502)

    async def render(request: Request) -> JSONResponse:
        ticket = current_ticket(request)
        assert ticket is not None
        ticket.report_usage(request.query_params["used"])
        return JSONResponse({"rendered": True})

    async def gated(request: Request) -> JSONResponse:
        assert gate is not None
        with anyio.fail_after(NEVER):
            await gate.wait()
        return JSONResponse({"ok": True})

    def reserve(conn: HTTPConnection) -> str:
        return conn.query_params["reserve"]

    app = Starlette(
        routes=[
            Route("/v1/images", images, methods=["POST"]),
            Route("/v1/crash", crash, methods=["POST"]),
            Route("/v1/upstream", upstream, methods=["POST"]),
            Route("/v1/render", render, methods=["POST"]),
            Route("/v1/gated", gated, methods=["POST"]),
        ]
    )
    rules: dict[str, str | Rule] = {
        "POST /v1/images": IMAGE,
        "POST /v1/crash": IMAGE,
        "POST /v1/upstream": IMAGE,
        "POST /v1/render": Rule(IMAGE, units=reserve, max_overage=0.5),
        "POST /v1/gated": IMAGE,
    }
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules=rules)
    app.add_middleware(Auth)  # outermost: auth runs before the guard
    return app


@asynccontextmanager
async def fresh_guard(db_url: str, **options: Any) -> AsyncIterator[CreditGuard]:
    """A guard built with ``options`` on the test's database, emptied and priced like the ``guard`` fixture."""
    async with CreditGuard(db_url, **options) as g:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)
        await seed_prices(g)
        yield g


def rows_of(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["kind"] == kind]


def hook_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "credit_guard" and r.levelno >= logging.ERROR and "hook" in r.msg]


# -- 1. each event, with the ledger's numbers ------------------------------------------------


async def test_web_charge_fires_on_charge_with_the_ledger_numbers(guard: CreditGuard) -> None:
    """A paid request reports who paid what, the balance left and the ledger row it wrote."""
    charges = guard.on_charge(Recorder())
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/images", headers=ORG)
    assert r.status_code == 200
    await guard.flush()
    [charge] = rows_of(await ledger_rows(guard, "org_1"), "charge")
    assert charges.events == [ChargeEvent("org_1", IMAGE, 5, 7, charge["id"], "user_9", False)]
    assert charge["hold_expires_at"] is None  # and flush() settled the hold


async def test_engine_deduct_fires_on_charge(guard: CreditGuard) -> None:
    """deduct_credits reports like a web charge, with the units multiplied into the credits."""
    charges = guard.on_charge(Recorder())
    await guard.grant_credits("org_2", 100)
    result = await guard.deduct_credits("org_2", VIDEO, "user_3", units=3)
    assert result.success and result.charge_id is not None
    await guard.flush()
    assert charges.events == [ChargeEvent("org_2", VIDEO, 60, 40, result.charge_id, "user_3", False)]


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [("/v1/crash", 500, "handler raised RuntimeError"), ("/v1/upstream", 502, "handler answered 502")],
)
async def test_failed_request_fires_on_refund_with_its_reason(
    guard: CreditGuard, path: str, status: int, reason: str
) -> None:
    """The refund of a failed request is reported once, with the refund row and the reason."""
    charges = guard.on_charge(Recorder())
    refunds = guard.on_refund(Recorder())
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        r = await c.post(path, headers=ORG)
    assert r.status_code == status
    await guard.flush()
    rows = await ledger_rows(guard, "org_1")
    [charge], [refund] = rows_of(rows, "charge"), rows_of(rows, "refund")
    assert refund["refund_of"] == charge["id"]
    assert [e.charge_id for e in charges.events] == [charge["id"]]
    assert refunds.events == [RefundEvent("org_1", IMAGE, 5, 12, charge["id"], refund["id"], reason)]


async def test_expired_hold_of_another_instance_fires_on_refund(db_url: str, guard: CreditGuard) -> None:
    """A hold left open by a process that died is released by this guard's sweep, which reports it."""
    refunds = guard.on_refund(Recorder())
    await guard.grant_credits("org_1", 12)
    async with CreditGuard(db_url, sweep=False) as other:
        held = await other.deduct_credits("org_1", IMAGE, hold=True)
        assert held.success and held.charge_id is not None
        # other closes without settling: its request never finished (the process "died").
    assert await guard.open_holds("org_1") == [held.charge_id]
    assert await guard.release_expired_holds(now=utcnow() + timedelta(hours=1)) == 1
    await guard.flush()
    [refund] = rows_of(await ledger_rows(guard, "org_1"), "refund")
    assert refunds.events == [RefundEvent("org_1", IMAGE, 5, 12, held.charge_id, refund["id"], "hold expired")]
    assert await guard.get_balance("org_1") == 12


async def test_unused_reserve_fires_on_refund(guard: CreditGuard) -> None:
    """A request that reserved 4 units and used 1 gets 3 back, and the hook hears of those 15 credits."""
    charges = guard.on_charge(Recorder())
    refunds = guard.on_refund(Recorder())
    await guard.grant_credits("org_1", 100)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/render?reserve=4&used=1", headers=ORG)
    assert r.status_code == 200
    await guard.flush()
    rows = await ledger_rows(guard, "org_1")
    [charge], [refund] = rows_of(rows, "charge"), rows_of(rows, "refund")
    assert (charge["amount"], refund["amount"], refund["refund_of"]) == (-20, 15, charge["id"])
    assert charges.events == [ChargeEvent("org_1", IMAGE, 20, 80, charge["id"], "user_9", False)]
    [event] = refunds.events
    assert (event.organization_id, event.feature_key, event.credits, event.charge_id, event.reason) == (
        "org_1",
        IMAGE,
        15,
        charge["id"],
        "unused reserve",
    )
    assert event.balance == 95
    assert event.refund_id == refund["id"]
    assert await guard.get_balance("org_1") == 95


async def test_engine_settle_charge_fires_the_same_hooks(guard: CreditGuard) -> None:
    """settle_charge at the usage really measured reports the unused part as a refund, the overage as a surcharge."""
    charges = guard.on_charge(Recorder())
    refunds = guard.on_refund(Recorder())
    await guard.grant_credits("org_2", 100)
    under = await guard.deduct_credits("org_2", VIDEO, "user_3", hold=True)
    over = await guard.deduct_credits("org_2", VIDEO, "user_3", hold=True)
    assert under.charge_id is not None and over.charge_id is not None
    assert await guard.settle_charge(under.charge_id, used_credits=5) == (15, 0)  # 60 -> 75
    assert await guard.settle_charge(over.charge_id, used_credits=30, max_overage_credits=8) == (0, 8)  # 75 -> 67
    assert await guard.settle_charge(over.charge_id, used_credits=40, max_overage_credits=8) == (
        0,
        0,
    )  # settled already
    await guard.flush()
    rows = await ledger_rows(guard, "org_2")
    [refund] = rows_of(rows, "refund")
    [surcharge] = [row for row in rows_of(rows, "charge") if row["extra_of"] is not None]
    assert (refund["refund_of"], refund["amount"], surcharge["extra_of"], surcharge["amount"]) == (
        under.charge_id,
        15,
        over.charge_id,
        -8,
    )
    [back] = refunds.events
    assert (back.organization_id, back.feature_key, back.credits, back.balance, back.charge_id) == (
        "org_2",
        VIDEO,
        15,
        75,
        under.charge_id,
    )
    assert back.refund_id == refund["id"]
    *_, extra = charges.events
    assert (extra.credits, extra.balance, extra.charge_id, extra.surcharge) == (8, 67, over.charge_id, True)
    # The ledger row knows the user; the engine path reports None today (settle_charge passes no user).
    assert extra.user_id == "user_3"
    assert len(charges.events) == 3 and len(refunds.events) == 1


async def test_usage_beyond_the_reserve_fires_a_surcharge(guard: CreditGuard) -> None:
    """Usage above the reserve (within max_overage) is charged after the fact and reported as a surcharge."""
    charges = guard.on_charge(Recorder())
    await guard.grant_credits("org_1", 100)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/render?reserve=4&used=6", headers=ORG)
    assert r.status_code == 200
    await guard.flush()
    rows = rows_of(await ledger_rows(guard, "org_1"), "charge")
    [reserve] = [row for row in rows if row["extra_of"] is None]
    [extra] = [row for row in rows if row["extra_of"] == reserve["id"]]
    assert extra["amount"] == -10  # 30 used, 20 reserved, max_overage 0.5 allows 10 more
    assert charges.events == [
        ChargeEvent("org_1", IMAGE, 20, 80, reserve["id"], "user_9", False),
        ChargeEvent("org_1", IMAGE, 10, 70, reserve["id"], "user_9", True),
    ]


async def test_each_402_fires_on_insufficient_credits(guard: CreditGuard) -> None:
    """Every refusal is reported with what was required and what the balance held; no charge event."""
    charges = guard.on_charge(Recorder())
    short = guard.on_insufficient_credits(Recorder())
    await guard.grant_credits("org_1", 7)
    async with client(build_app(guard)) as c:
        assert (await c.post("/v1/images", headers=ORG)).status_code == 200
        assert (await c.post("/v1/images", headers=ORG)).status_code == 402
        assert (await c.post("/v1/images", headers=ORG)).status_code == 402
    result = await guard.deduct_credits("org_broke", VIDEO)  # no account at all
    assert not result.success
    await guard.flush()
    assert short.events == [
        InsufficientCreditsEvent("org_1", IMAGE, 5, 2),
        InsufficientCreditsEvent("org_1", IMAGE, 5, 2),
        InsufficientCreditsEvent("org_broke", VIDEO, 20, 0),
    ]
    assert len(charges.events) == 1


# -- 2. low balance: once per crossing ---------------------------------------------------


def test_crossed_below_means_strictly_below() -> None:
    """Landing exactly on the threshold is not below it; the next charge that goes under is the crossing."""
    assert not crossed_below(50, 50, 25)
    assert crossed_below(50, 25, 25)
    assert crossed_below(50, 49, 1)
    assert not crossed_below(50, 25, 25 - 1)  # started below already
    assert not crossed_below(None, 0, 100)
    assert not crossed_below(50, 40, 0)


async def test_low_balance_fires_once_per_crossing_and_a_grant_rearms_it(db_url: str) -> None:
    """100 -> 80 -> 60 -> 40 (fires) -> 20 -> 0 (silent); a top-up to 60 re-arms: -> 40 fires again."""
    async with fresh_guard(db_url, low_balance_threshold=50) as guard:
        low = guard.on_low_balance(Recorder())
        await guard.grant_credits("org_1", 100)
        for _ in range(5):
            assert (await guard.deduct_credits("org_1", VIDEO)).success
        await guard.flush()
        assert low.events == [LowBalanceEvent("org_1", 40, 50, VIDEO)]
        assert await guard.get_balance("org_1") == 0

        assert await guard.grant_credits("org_1", 60) == 60
        assert (await guard.deduct_credits("org_1", VIDEO)).success
        assert (await guard.deduct_credits("org_1", VIDEO)).success  # 40 -> 20: no second event
        await guard.flush()
        assert low.events == [LowBalanceEvent("org_1", 40, 50, VIDEO)] * 2


async def test_low_balance_fires_once_under_concurrent_charges(db_url: str) -> None:
    """40 charges racing from 230 to 30 cross 50 exactly once, whatever order they commit in."""
    async with fresh_guard(db_url, low_balance_threshold=50) as guard:
        low = guard.on_low_balance(Recorder())
        charges = guard.on_charge(Recorder())
        await guard.grant_credits("org_1", 230)
        results = await asyncio.gather(*(guard.deduct_credits("org_1", IMAGE, f"user_{i}") for i in range(40)))
        assert all(r.success for r in results)
        await guard.flush()
        assert await guard.get_balance("org_1") == 30
        # Each charge saw its own balance_after: 225, 220, ... 30, each exactly once.
        assert sorted(e.balance for e in charges.events) == list(range(30, 230, 5))
        assert low.events == [LowBalanceEvent("org_1", 45, 50, IMAGE)]


# -- 3. a hook cannot hurt the request ------------------------------------------------------


async def test_a_raising_hook_is_logged_and_the_request_is_untouched(
    guard: CreditGuard, caplog: pytest.LogCaptureFixture
) -> None:
    """The response, its headers and the ledger are as if no hook existed; the error is logged, other hooks run."""
    caplog.set_level(logging.ERROR, logger="credit_guard")

    async def broken_metrics(event: ChargeEvent) -> None:
        raise RuntimeError("metrics backend down")

    guard.on_charge(broken_metrics)
    after = guard.on_charge(Recorder())
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/images", headers=ORG)
    assert r.status_code == 200
    assert (r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == ("5", "7")
    await guard.flush()
    [charge] = rows_of(await ledger_rows(guard, "org_1"), "charge")
    assert (charge["amount"], charge["balance_after"], charge["hold_expires_at"]) == (-5, 7, None)
    assert await guard.get_balance("org_1") == 7
    [record] = hook_errors(caplog)
    assert "broken_metrics" in record.getMessage() and "metrics backend down" in record.getMessage()
    assert record.exc_info is not None
    assert [e.charge_id for e in after.events] == [charge["id"]]


async def test_a_hanging_hook_does_not_hold_the_response_and_is_abandoned(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The response comes back while the hook still hangs; after hook_timeout it is cancelled and
    logged, and hooks keep running for later events."""
    caplog.set_level(logging.ERROR, logger="credit_guard")
    started = asyncio.Event()
    never = asyncio.Event()
    outcome: list[str] = []

    async def stuck_webhook(event: ChargeEvent) -> None:
        if started.is_set():
            outcome.append("second call ran")
            return
        started.set()
        try:
            await never.wait()
            outcome.append("finished")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    async with fresh_guard(db_url, hook_timeout=0.2) as guard:
        guard.on_charge(stuck_webhook)
        after = guard.on_charge(Recorder())
        await guard.grant_credits("org_1", 12)
        # The handler waits until the hook is running, so the hook is surely in flight when
        # the response is built: if the request waited for hooks it would see "cancelled".
        async with client(build_app(guard, gate=started)) as c:
            r = await c.post("/v1/gated", headers=ORG)
            at_response = (started.is_set(), list(outcome), len(hook_errors(caplog)))
            await guard.flush()  # waits for the hook queue: the stuck call is abandoned meanwhile
            assert r.status_code == 200 and r.headers["x-credits-charged"] == "5"
            assert at_response == (True, [], 0)  # the hook had started, and neither finished nor was abandoned
            assert outcome == ["cancelled"]
            [record] = hook_errors(caplog)
            assert "stuck_webhook" in record.getMessage() and "abandoned" in record.getMessage()

            assert (await c.post("/v1/images", headers=ORG)).status_code == 200
            await guard.flush()
        assert outcome == ["cancelled", "second call ran"]
        assert [e.balance for e in after.events] == [7, 2]
        assert await guard.get_balance("org_1") == 2


async def test_an_abandoned_hook_frees_its_worker() -> None:
    """With a single worker, the events queued behind a hung hook still run once it is abandoned."""
    dispatcher = HookDispatcher(timeout=0.2, workers=1)
    seen = Recorder()

    async def hang(event: ChargeEvent) -> None:
        await asyncio.Event().wait()

    dispatcher.add(ChargeEvent, hang)
    dispatcher.add(ChargeEvent, seen)
    event = ChargeEvent("org_1", IMAGE, 5, 7, 1)
    dispatcher.emit(event)
    try:
        await dispatcher.drain()
        assert seen.events == [event]
    finally:
        await dispatcher.close()


def sync_hook(event: Any) -> None:
    pass


class SyncCallable:
    def __call__(self, event: Any) -> None:
        pass


async def async_hook(event: Any, *, tag: str = "") -> None:
    pass


async def test_sync_hooks_are_refused_at_registration(tmp_path: Path) -> None:
    """A sync hook would run on the event loop's thread and block it: refused up front, for every event."""
    async with CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", low_balance_threshold=10) as guard:
        for register in (guard.on_charge, guard.on_refund, guard.on_insufficient_credits, guard.on_low_balance):
            for hook in (sync_hook, SyncCallable(), lambda event: None):
                with pytest.raises(TypeError, match="async"):
                    register(hook)  # type: ignore[type-var]  # mypy refuses it too; untyped apps get the TypeError
            # Async functions and async callable objects are accepted, and returned (decorator use).
            assert register(async_hook) is async_hook
            recorder = Recorder()
            assert register(recorder) is recorder


async def test_a_partial_of_an_async_hook_is_accepted(tmp_path: Path) -> None:
    """functools.partial is the usual way to bind a webhook URL to a hook; inspect sees through it."""
    async with CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}") as guard:
        guard.on_charge(functools.partial(async_hook, tag="billing"))


async def test_on_low_balance_needs_a_threshold(tmp_path: Path) -> None:
    """Without low_balance_threshold the hook could never fire: say so at registration."""
    async with CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}") as guard:
        with pytest.raises(ValueError, match="low_balance_threshold"):
            guard.on_low_balance(async_hook)


# -- 4. overflow: drop, never wait ---------------------------------------------------------


async def test_a_full_queue_drops_events_without_blocking_emit(caplog: pytest.LogCaptureFixture) -> None:
    """Hooks far slower than traffic: events beyond the queue are dropped and counted, emit() returns."""
    caplog.set_level(logging.WARNING, logger="credit_guard")
    dispatcher = HookDispatcher(queue_size=2, workers=1)
    busy = asyncio.Event()
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(event: ChargeEvent) -> None:
        busy.set()
        await release.wait()
        assert event.charge_id is not None
        seen.append(event.charge_id)

    dispatcher.add(ChargeEvent, slow)
    try:
        dispatcher.emit(ChargeEvent("org_1", IMAGE, 5, 100, 1))
        with anyio.fail_after(NEVER):
            await busy.wait()  # the only worker now holds event 1; the queue is empty
        for charge_id in range(2, 7):  # 2 and 3 fill the queue, 4, 5 and 6 find it full
            dispatcher.emit(ChargeEvent("org_1", IMAGE, 5, 100, charge_id))
        assert dispatcher.dropped == 3
        assert sum("queue full" in r.getMessage() for r in caplog.records) == 3
        release.set()
        await dispatcher.drain()
        assert seen == [1, 2, 3]
    finally:
        release.set()
        await dispatcher.close()
