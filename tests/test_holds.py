"""Holds and variable cost, on SQLite and PostgreSQL.

A web charge is a *hold* until its request has been delivered: a process that dies
mid-request must not keep the customer's credits, so the sweeper refunds holds whose
time ran out, while a live process keeps its own holds alive with a heartbeat. A route
may charge per unit (seconds of video) and settle at what the handler really used.
Every test checks the money through the ledger and ``audit()``, never through mocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from sqlalchemy import update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule, current_ticket, requires_credits
from credit_guard.problems import PROBLEM_CONTENT_TYPE
from credit_guard.schema import holds as holds_table

from .conftest import ledger_rows
from .helpers import OrgOnly, client

pytestmark = pytest.mark.anyio

ORG = "org_1"
HEADERS = {"x-org": ORG}
VIDEO = "kling_image_to_video"  # 20 credits per unit (conftest.PRICES)
IMAGE = "seedream_text_to_image"  # 5 credits
ADAPTERS = ["middleware", "decorator"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def far_future() -> datetime:
    """A sweep clock past every hold's expiry: only liveness can keep a hold from the sweeper."""
    return utcnow() + timedelta(days=1)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored in UTC); PostgreSQL aware ones."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


Auth = OrgOnly


def guarded_app(
    guard: CreditGuard,
    adapter: str,
    routes: dict[str, tuple[Callable[[Request], Awaitable[JSONResponse]], Rule]],
) -> Starlette:
    """The same endpoints charged by CreditGuardMiddleware rules or by @requires_credits."""
    if adapter == "decorator":
        app = Starlette(
            routes=[
                Route(
                    path,
                    requires_credits(
                        rule.feature_key,
                        guard=guard,
                        units=rule.units,
                        idempotency=rule.idempotency,
                        max_overage=rule.max_overage,
                    )(endpoint),
                    methods=["POST"],
                )
                for path, (endpoint, rule) in routes.items()
            ]
        )
    else:
        app = Starlette(routes=[Route(path, endpoint, methods=["POST"]) for path, (endpoint, _) in routes.items()])
        app.add_middleware(
            CreditGuardMiddleware, guard=guard, rules={f"POST {path}": rule for path, (_, rule) in routes.items()}
        )
    app.add_middleware(Auth)
    return app


async def ledger(guard: CreditGuard) -> list[dict[str, Any]]:
    """The organization's ledger rows, oldest first."""
    return [dict(row) for row in await ledger_rows(guard, ORG)]


async def refunds_of(guard: CreditGuard, charge_id: int) -> list[dict[str, Any]]:
    return [row for row in await ledger(guard) if row["refund_of"] == charge_id]


async def surcharges_of(guard: CreditGuard, charge_id: int) -> list[dict[str, Any]]:
    return [row for row in await ledger(guard) if row["extra_of"] == charge_id]


async def charge_row(guard: CreditGuard, charge_id: int) -> dict[str, Any]:
    (row,) = [row for row in await ledger(guard) if row["id"] == charge_id]
    return row


async def assert_books(guard: CreditGuard, balance: int) -> None:
    """The balance is what the test expects, equals its ledger's sum, and audit() is clean."""
    assert await guard.get_balance(ORG) == balance
    assert sum(int(row["amount"]) for row in await ledger(guard)) == balance
    assert await guard.audit() == []


# -- 1. a web charge is a hold while its handler runs -------------------------------------


class Gate:
    """Holds a handler mid-request so the test can look at the ledger meanwhile."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def endpoint(self, request: Request) -> JSONResponse:
        self.started.set()
        await self.release.wait()
        fail = request.query_params.get("fail")
        if fail == "raise":
            raise RuntimeError("model server exploded")
        if fail == "500":
            return JSONResponse({"error": "model failed"}, status_code=500)
        return JSONResponse({"ok": True})


async def run_gated(
    c: httpx.AsyncClient, gate: Gate, url: str, while_blocked: Callable[[], Awaitable[None]]
) -> httpx.Response:
    """Send one request, run ``while_blocked`` while its handler waits, then let it finish."""
    responses: list[httpx.Response] = []

    async def call() -> None:
        responses.append(await c.post(url, headers=HEADERS))

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await gate.started.wait()
            try:
                await while_blocked()
            finally:
                gate.release.set()
    return responses[0]


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_web_charge_is_a_hold_until_the_response_is_delivered(guard: CreditGuard, adapter: str) -> None:
    """Taken before the handler runs, held while it runs, settled (kept) once delivered."""
    await guard.grant_credits(ORG, 100)
    gate = Gate()
    app = guarded_app(guard, adapter, {"/v1/job": (gate.endpoint, Rule(IMAGE))})
    seen: dict[str, Any] = {}

    async def while_blocked() -> None:
        (charge,) = [row for row in await ledger(guard) if row["kind"] == "charge"]
        seen["charge"] = charge
        seen["holds"] = await guard.open_holds()
        seen["balance"] = await guard.get_balance(ORG)

    async with client(app) as c:
        r = await run_gated(c, gate, "/v1/job", while_blocked)

    charge = seen["charge"]
    assert seen["holds"] == [charge["id"]]
    assert charge["hold_expires_at"] is not None and charge["amount"] == -5
    assert seen["balance"] == 95  # the credits are taken while the handler runs, not after

    assert r.status_code == 200
    assert (r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == ("5", "95")
    await guard.flush()
    assert await guard.open_holds() == []
    assert (await charge_row(guard, charge["id"]))["hold_expires_at"] is None
    assert await refunds_of(guard, charge["id"]) == []
    await assert_books(guard, 95)
    # A settled hold is no longer the sweeper's business, however late it runs.
    assert await guard.release_expired_holds(now=far_future()) == 0
    await assert_books(guard, 95)


@pytest.mark.parametrize("fail", ["raise", "500"])
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_failed_handler_refunds_and_closes_its_hold(guard: CreditGuard, adapter: str, fail: str) -> None:
    """A failure is refunded at once (no batching) and the refund closes the hold."""
    await guard.grant_credits(ORG, 100)
    gate = Gate()
    app = guarded_app(guard, adapter, {"/v1/job": (gate.endpoint, Rule(IMAGE))})
    held: list[int] = []

    async def while_blocked() -> None:
        held.extend(await guard.open_holds())

    async with client(app) as c:
        r = await run_gated(c, gate, f"/v1/job?fail={fail}", while_blocked)

    assert r.status_code == 500
    (charge_id,) = held
    assert await guard.open_holds() == []  # closed by the refund itself, before any flush
    (refund,) = await refunds_of(guard, charge_id)
    assert refund["amount"] == 5
    await guard.flush()
    assert await guard.open_holds() == []
    assert len(await refunds_of(guard, charge_id)) == 1
    await assert_books(guard, 100)


async def test_the_keeper_settles_on_its_own(guard: CreditGuard) -> None:
    """Without any flush() the batched settlement still happens, a settle_delay later."""
    guard.holds.settle_delay = 0.05  # the default, which the autouse fixture parks
    await guard.grant_credits(ORG, 100)

    async def image(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async with client(guarded_app(guard, "middleware", {"/v1/image": (image, Rule(IMAGE))})) as c:
        r = await c.post("/v1/image", headers=HEADERS)
    assert r.status_code == 200
    with anyio.fail_after(10):  # polls the ledger: nothing here signals the keeper's commit
        while True:
            if not await guard.open_holds():
                break
            await anyio.sleep(0.02)
    assert [row["kind"] for row in await ledger(guard)] == ["grant", "charge"]
    await assert_books(guard, 95)


async def test_flush_waits_for_a_settlement_batch_in_flight(guard: CreditGuard, db_url: str) -> None:
    """A lock held by another connection keeps the keeper's batch waiting; flush() must wait too."""
    guard.holds.settle_delay = 0.05
    await guard.grant_credits(ORG, 100)
    r = await guard.deduct_credits(ORG, IMAGE, hold=True)
    assert r.charge_id is not None
    returned = False
    async with CreditGuard(db_url, sweep=False) as other, other.engine.connect() as conn:
        tx = await conn.begin()
        # A write to the hold's row: its row lock on PostgreSQL, the database's write lock on SQLite.
        await conn.execute(
            update(holds_table)
            .where(holds_table.c.charge_id == r.charge_id)
            .values(expires_at=holds_table.c.expires_at)
        )
        guard.holds.settle_later(r.charge_id)
        await anyio.sleep(0.3)  # the keeper's batch (after settle_delay) now waits on that lock
        with anyio.move_on_after(1):
            await guard.flush()
            returned = True
        await tx.rollback()
    assert not returned, "flush() returned while the hold it was asked to settle was still being written"


# -- 2. the sweeper -------------------------------------------------------------------------


async def test_abandoned_hold_is_refunded_exactly_once(guard: CreditGuard) -> None:
    """A hold its process no longer keeps is released once expired, and only once."""
    await guard.grant_credits(ORG, 100)
    r = await guard.deduct_credits(ORG, VIDEO, hold=True)
    assert r.success and r.charge_id is not None
    charge_id = r.charge_id
    assert await guard.open_holds() == [charge_id]

    # Live in this process: never swept, whatever the clock says.
    assert await guard.release_expired_holds(now=far_future()) == 0
    assert await guard.open_holds() == [charge_id]
    await assert_books(guard, 80)

    guard.holds.forget(charge_id)  # as if the request's process had died
    # Not expired yet at the real time: still not swept.
    assert await guard.release_expired_holds() == 0
    assert await guard.open_holds() == [charge_id]
    await assert_books(guard, 80)

    assert await guard.release_expired_holds(now=far_future()) == 1
    (refund,) = await refunds_of(guard, charge_id)
    assert (refund["amount"], refund["reason"]) == (20, "hold expired")
    assert await guard.open_holds() == []
    await assert_books(guard, 100)

    rows = await ledger(guard)
    assert await guard.release_expired_holds(now=far_future()) == 0
    assert not (await guard.refund_credits(charge_id)).refunded
    assert await ledger(guard) == rows
    await assert_books(guard, 100)


async def test_sweep_releases_a_dead_process_hold_but_not_settled_or_live_ones(guard: CreditGuard, db_url: str) -> None:
    """Another guard on the same database plays the process that died mid-request."""
    await guard.grant_credits(ORG, 100)
    async with CreditGuard(db_url, sweep=False) as dead:
        abandoned = await dead.deduct_credits(ORG, VIDEO, hold=True)
        finished = await dead.deduct_credits(ORG, VIDEO, hold=True)
        assert abandoned.charge_id is not None and finished.charge_id is not None
        assert await dead.settle_charge(finished.charge_id) == (0, 0)
    # ``dead`` is gone without settling ``abandoned``: its hold stays open in the database.
    live = await guard.deduct_credits(ORG, VIDEO, hold=True)
    assert live.charge_id is not None
    assert await guard.open_holds(ORG) == [abandoned.charge_id, live.charge_id]
    await assert_books(guard, 40)

    assert await guard.release_expired_holds(now=far_future()) == 1
    assert [r["refund_of"] for r in await ledger(guard) if r["kind"] == "refund"] == [abandoned.charge_id]
    assert await guard.open_holds(ORG) == [live.charge_id]
    await assert_books(guard, 60)

    assert await guard.release_expired_holds(now=far_future()) == 0
    await assert_books(guard, 60)

    await guard.settle_charge(live.charge_id)
    assert await guard.open_holds(ORG) == []
    async with CreditGuard(db_url, sweep=False) as other:  # nothing is live there: only settlement protects
        assert await other.release_expired_holds(now=far_future()) == 0
    assert len([r for r in await ledger(guard) if r["kind"] == "refund"]) == 1
    await assert_books(guard, 60)


RACE_ROUNDS = 24
_jitter = random.Random(4)


async def staggered(contestant: Callable[[], Awaitable[Any]]) -> Any:
    """Start after 0-3 ms, so that each contestant sometimes gets there first (without it
    the sweep, which first reads which holds expired, would almost never win on PostgreSQL)."""
    await asyncio.sleep(_jitter.choice((0, 0, 0.001, 0.002, 0.003)))
    return await contestant()


async def test_settle_sweep_and_refund_race_has_exactly_one_winner(guard: CreditGuard, db_url: str) -> None:
    """Settling at usage, the sweeper (another process) and a refund, all at once on one hold.

    Settling at 15 of 20 credits leaves a partial-refund row when it wins, so each
    outcome is visible in the ledger: exactly one contestant may report success and
    exactly one refund row may exist, whoever wins.
    """
    await guard.grant_credits(ORG, 10_000)
    balance = 10_000
    winners: set[str] = set()
    async with CreditGuard(db_url, sweep=False) as sweeper:
        for round_no in range(RACE_ROUNDS):
            r = await guard.deduct_credits(ORG, VIDEO, hold=True)
            assert r.charge_id is not None
            charge_id = r.charge_id
            results = dict(
                zip(
                    ("settle", "sweep", "refund"),
                    await asyncio.gather(
                        staggered(functools.partial(guard.settle_charge, charge_id, used_credits=15)),
                        staggered(functools.partial(sweeper.release_expired_holds, now=far_future())),
                        staggered(functools.partial(guard.refund_credits, charge_id)),
                    ),
                    strict=True,
                )
            )
            won = {
                "settle": results["settle"] == (5, 0),
                "sweep": results["sweep"] == 1,
                "refund": results["refund"].refunded,
            }
            assert results["settle"] in ((5, 0), (0, 0)) and results["sweep"] in (0, 1)
            assert sum(won.values()) == 1, (round_no, results)
            (refund,) = await refunds_of(guard, charge_id)
            winner = next(name for name, w in won.items() if w)
            winners.add(winner)
            assert refund["amount"] == (5 if winner == "settle" else 20)
            balance -= 20 - refund["amount"]
            assert await guard.open_holds() == []
            await assert_books(guard, balance)
    # Staggered starts let more than one path win: the race really ran, not one path 24 times.
    assert len(winners) >= 2, winners


async def test_batched_settlement_and_sweep_never_both_win(
    guard: CreditGuard, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The web path's settlement (queued, then flushed: PostgreSQL's one-statement fast path)
    against another process's sweep: either the hold is kept or it is refunded, and a
    settlement that lost says so instead of counting a refunded hold as kept."""
    caplog.set_level(logging.WARNING, logger="credit_guard")
    await guard.grant_credits(ORG, 10_000)
    balance = 10_000
    async with CreditGuard(db_url, sweep=False) as sweeper:
        for _ in range(RACE_ROUNDS):
            r = await guard.deduct_credits(ORG, VIDEO, hold=True)
            assert r.charge_id is not None
            charge_id = r.charge_id
            caplog.clear()

            async def settle(charge_id: int = charge_id) -> int:
                guard.holds.settle_later(charge_id)
                await guard.flush()
                return 0

            async def sweep() -> int:
                return await sweeper.release_expired_holds(now=far_future())

            swept = sum(await asyncio.gather(staggered(settle), staggered(sweep)))
            lost = [rec for rec in caplog.records if "refunded before they could be settled" in rec.getMessage()]
            refunds = await refunds_of(guard, charge_id)
            if swept:
                assert len(refunds) == 1 and refunds[0]["amount"] == 20
                assert len(lost) == 1 and str(charge_id) in lost[0].getMessage()
            else:
                assert refunds == [] and lost == []
                balance -= 20
            assert await guard.open_holds() == []
            await assert_books(guard, balance)


# -- 3. the heartbeat -----------------------------------------------------------------------


async def test_heartbeat_keeps_a_long_request_from_the_sweeper(guard: CreditGuard, db_url: str) -> None:
    """A request outliving hold_timeout several times over is neither swept nor refunded:
    its process pushes the hold's expiry forward while the other process keeps sweeping."""
    await guard.grant_credits(ORG, 100)
    hold_timeout = 0.4
    gate = Gate()
    swept: list[int] = []
    expiries: list[datetime] = []
    # settle_delay parked as in only_flush_settles: short.flush() below is the only settler.
    async with CreditGuard(db_url, hold_timeout=hold_timeout, settle_delay=3600.0) as short:
        app = guarded_app(short, "decorator", {"/v1/job": (gate.endpoint, Rule(IMAGE))})

        async def while_blocked() -> None:
            (charge_id,) = await guard.open_holds()
            first = aware((await charge_row(guard, charge_id))["hold_expires_at"])
            expiries.append(first)
            # Sweep (as the other process, on the real clock) until the hold has been
            # expired by its first deadline for a whole hold_timeout more.
            while utcnow() < first + timedelta(seconds=2 * hold_timeout) or len(expiries) < 3:
                swept.append(await guard.release_expired_holds())
                expiry = (await charge_row(guard, charge_id))["hold_expires_at"]
                if expiry is None:
                    break  # swept from under the running request: the assertions below say so
                expiries.append(aware(expiry))
                await anyio.sleep(0.05)

        async with client(app) as c:
            r = await run_gated(c, gate, "/v1/job", while_blocked)
        assert r.status_code == 200 and r.headers["x-credits-charged"] == "5"
        await short.flush()

    assert sum(swept) == 0
    assert expiries[-1] > expiries[0]  # the heartbeat moved the deadline (ledger, not timing)
    assert expiries[-1] > expiries[0] + timedelta(seconds=hold_timeout)
    assert [row["kind"] for row in await ledger(guard)] == ["grant", "charge"]
    assert await guard.open_holds() == []
    await assert_books(guard, 95)


# -- 4 and 5. variable cost, by decorator and by middleware Rule -----------------------------


def seconds(request: Request) -> str:
    return request.query_params["seconds"]


async def video(request: Request) -> JSONResponse:
    """Renders the video; ``used`` is what it really took, ``fail`` makes it crash after."""
    used = request.query_params.get("used")
    if used is not None:
        ticket = current_ticket(request)
        assert ticket is not None
        ticket.report_usage(used)
    if request.query_params.get("fail"):
        raise RuntimeError("renderer crashed")
    return JSONResponse({"ok": True})


def video_app(guard: CreditGuard, adapter: str) -> Starlette:
    return guarded_app(
        guard,
        adapter,
        {
            "/v1/video": (video, Rule(VIDEO, units=seconds)),
            "/v1/video-overage": (video, Rule(VIDEO, units=seconds, max_overage=0.5)),
        },
    )


async def the_charge(guard: CreditGuard) -> dict[str, Any]:
    (charge,) = [row for row in await ledger(guard) if row["kind"] == "charge" and row["extra_of"] is None]
    return charge


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_units_multiply_the_price_rounded_up(guard: CreditGuard, adapter: str) -> None:
    """2.5 s at 20 credits/s is 50, 0.1 s is 2; a fraction of a credit is paid for:
    0.01 s costs 1, 0.33 s (6.6) costs 7."""
    await guard.grant_credits(ORG, 100)
    async with client(video_app(guard, adapter)) as c:
        r = await c.post("/v1/video?seconds=2.5", headers=HEADERS)
        assert r.status_code == 200
        assert (r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == ("50", "50")
        r = await c.post("/v1/video?seconds=0.1", headers=HEADERS)
        assert r.headers["x-credits-charged"] == "2"
        r = await c.post("/v1/video?seconds=0.01", headers=HEADERS)
        assert r.headers["x-credits-charged"] == "1"
        r = await c.post("/v1/video?seconds=0.33", headers=HEADERS)
        assert r.headers["x-credits-charged"] == "7"
    await guard.flush()
    charges = [-row["amount"] for row in await ledger(guard) if row["kind"] == "charge"]
    assert charges == [50, 2, 1, 7]
    assert await guard.open_holds() == []
    await assert_books(guard, 40)


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("seconds=0", "above 0"),
        ("seconds=-1", "above 0"),
        ("seconds=abc", "must be a number"),
        ("seconds=1e9", "at most 1000000"),
        ("seconds=nan", "above 0"),
        ("seconds=inf", "above 0"),
        ("other=1", "missing 'seconds'"),
        ("seconds=1_0", "must be a number"),
    ],
)
async def test_bad_units_are_refused_with_422_and_charge_nothing(
    guard: CreditGuard, adapter: str, query: str, says: str
) -> None:
    await guard.grant_credits(ORG, 100)
    rows = await ledger(guard)
    async with client(video_app(guard, adapter)) as c:
        r = await c.post(f"/v1/video?{query}", headers=HEADERS)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    problem = r.json()
    assert problem["status"] == 422 and "units" in problem["errors"]
    assert says in problem["detail"], problem
    assert "x-credits-charged" not in r.headers
    assert await ledger(guard) == rows
    await assert_books(guard, 100)


async def test_missing_units_parameter_is_called_missing(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    async with client(video_app(guard, "middleware")) as c:
        r = await c.post("/v1/video", headers=HEADERS)
    assert r.status_code == 422
    assert "missing" in r.json()["detail"].lower(), r.json()["detail"]


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_reported_usage_refunds_the_unused_reserve_once(guard: CreditGuard, adapter: str, db_url: str) -> None:
    """Reserve 2.5 s (50), use 1 s (20): 30 come back, as a refund of that charge, once."""
    await guard.grant_credits(ORG, 100)
    async with client(video_app(guard, adapter)) as c:
        r = await c.post("/v1/video?seconds=2.5&used=1", headers=HEADERS)
    assert r.status_code == 200 and r.headers["x-credits-charged"] == "50"
    await guard.flush()
    charge = await the_charge(guard)
    assert charge["amount"] == -50
    (refund,) = await refunds_of(guard, charge["id"])
    assert refund["amount"] == 30
    assert await guard.open_holds() == []
    await assert_books(guard, 80)

    # Nothing may settle or release it a second time.
    await guard.flush()
    assert await guard.settle_charge(charge["id"], used_credits=0) == (0, 0)
    async with CreditGuard(db_url, sweep=False) as other:
        assert await other.release_expired_holds(now=far_future()) == 0
    assert len(await refunds_of(guard, charge["id"])) == 1
    await assert_books(guard, 80)


async def test_usage_settlement_is_not_reported_as_a_lost_hold(
    guard: CreditGuard, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator alarm must mean something: settling at usage is not a hold lost to the sweeper."""
    caplog.set_level(logging.WARNING, logger="credit_guard")
    await guard.grant_credits(ORG, 100)
    async with client(video_app(guard, "middleware")) as c:
        r = await c.post("/v1/video?seconds=2.5&used=1", headers=HEADERS)
    assert r.status_code == 200
    await guard.flush()
    await assert_books(guard, 80)
    assert [rec.getMessage() for rec in caplog.records if "before they could be settled" in rec.getMessage()] == []


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_usage_equal_to_the_reserve_or_over_it_without_overage_moves_nothing(
    guard: CreditGuard, adapter: str
) -> None:
    await guard.grant_credits(ORG, 100)
    async with client(video_app(guard, adapter)) as c:
        r1 = await c.post("/v1/video?seconds=2&used=2", headers=HEADERS)
        r2 = await c.post("/v1/video?seconds=1&used=10", headers=HEADERS)  # max_overage 0: the reserve caps it
    assert (r1.status_code, r2.status_code) == (200, 200)
    await guard.flush()
    assert [(row["kind"], row["amount"]) for row in await ledger(guard)] == [
        ("grant", 100),
        ("charge", -40),
        ("charge", -20),
    ]
    assert await guard.open_holds() == []
    await assert_books(guard, 40)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_overage_is_charged_up_to_max_overage_of_the_reserve(guard: CreditGuard, adapter: str) -> None:
    """Reserve 2 s (40), use 10 s (200): max_overage=0.5 allows 20 more, as a surcharge row."""
    await guard.grant_credits(ORG, 100)
    async with client(video_app(guard, adapter)) as c:
        r = await c.post("/v1/video-overage?seconds=2&used=10", headers=HEADERS)
    assert r.status_code == 200 and r.headers["x-credits-charged"] == "40"
    await guard.flush()
    charge = await the_charge(guard)
    (extra,) = await surcharges_of(guard, charge["id"])
    assert (extra["kind"], extra["amount"], extra["refund_of"]) == ("charge", -20, None)
    assert await refunds_of(guard, charge["id"]) == []
    assert await guard.open_holds() == []
    await assert_books(guard, 40)
    assert await guard.settle_charge(charge["id"], used_credits=200, max_overage_credits=20) == (0, 0)
    await assert_books(guard, 40)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_overage_never_takes_more_than_the_balance(guard: CreditGuard, adapter: str) -> None:
    """Balance 10 after the reserve, cap 20: the surcharge is 10 and the balance 0, never below."""
    await guard.grant_credits(ORG, 50)
    async with client(video_app(guard, adapter)) as c:
        r = await c.post("/v1/video-overage?seconds=2&used=10", headers=HEADERS)
    assert r.status_code == 200 and r.headers["x-credits-remaining"] == "10"
    await guard.flush()
    charge = await the_charge(guard)
    (extra,) = await surcharges_of(guard, charge["id"])
    assert (extra["amount"], extra["balance_after"]) == (-10, 0)
    await assert_books(guard, 0)


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_failed_request_with_reported_usage_is_refunded_in_full(guard: CreditGuard, adapter: str) -> None:
    await guard.grant_credits(ORG, 100)
    async with client(video_app(guard, adapter)) as c:
        r = await c.post("/v1/video-overage?seconds=2.5&used=1&fail=1", headers=HEADERS)
    assert r.status_code == 500
    await guard.flush()
    charge = await the_charge(guard)
    (refund,) = await refunds_of(guard, charge["id"])
    assert refund["amount"] == 50
    assert await surcharges_of(guard, charge["id"]) == []
    assert await guard.open_holds() == []
    await assert_books(guard, 100)


async def test_engine_units_are_exact_decimals(guard: CreditGuard) -> None:
    """0.07 units at 100 credits cost 7: in floats 100 * 0.07 is 7.000000000000001, rounded up to 8."""
    await guard.create_pricing(feature_key="voice_clone", feature_name="Voice", category="Audio", credits=100)
    await guard.grant_credits(ORG, 100)
    for units in (0.07, "0.07"):
        r = await guard.deduct_credits(ORG, "voice_clone", units=units)
        assert r.credits_deducted == 7, units
    await assert_books(guard, 86)


async def test_engine_settle_charge_at_usage_exactly_once(guard: CreditGuard) -> None:
    """The engine's settle_charge follows the same rules as reported usage on a web route."""
    await guard.grant_credits(ORG, 100)

    under = await guard.deduct_credits(ORG, VIDEO, units=2.5, hold=True)
    assert (under.credits_deducted, under.remaining_credits) == (50, 50) and under.charge_id is not None
    assert await guard.settle_charge(under.charge_id, used_credits=20) == (30, 0)
    assert await guard.settle_charge(under.charge_id, used_credits=20) == (0, 0)
    assert [r["amount"] for r in await refunds_of(guard, under.charge_id)] == [30]
    await assert_books(guard, 80)

    over = await guard.deduct_credits(ORG, VIDEO, units=2, hold=True)
    assert over.charge_id is not None
    assert await guard.settle_charge(over.charge_id, used_credits=200, max_overage_credits=20) == (0, 20)
    assert await guard.settle_charge(over.charge_id, used_credits=200, max_overage_credits=20) == (0, 0)
    assert [r["amount"] for r in await surcharges_of(guard, over.charge_id)] == [-20]
    await assert_books(guard, 20)

    short = await guard.deduct_credits(ORG, VIDEO, units="0.5", hold=True)
    assert short.charge_id is not None and short.remaining_credits == 10
    assert await guard.settle_charge(short.charge_id, used_credits=100, max_overage_credits=50) == (0, 10)
    await assert_books(guard, 0)

    # A refunded hold cannot be settled afterwards, and bad arguments write nothing.
    await guard.grant_credits(ORG, 20)
    refunded = await guard.deduct_credits(ORG, VIDEO, hold=True)
    assert refunded.charge_id is not None
    assert (await guard.refund_credits(refunded.charge_id)).refunded
    assert await guard.settle_charge(refunded.charge_id, used_credits=0) == (0, 0)
    rows = await ledger(guard)
    with pytest.raises(ValueError):
        await guard.settle_charge(refunded.charge_id, used_credits=-1)
    for bad in (0, -1, "abc", "1_0", 10**9, float("nan")):
        with pytest.raises(ValueError):
            await guard.deduct_credits(ORG, VIDEO, units=bad, hold=True)
    assert await ledger(guard) == rows
    assert await guard.open_holds() == []
    await assert_books(guard, 20)


# -- FastAPI: units on a path operation ------------------------------------------------------


def fastapi_app(guard: CreditGuard) -> FastAPI:
    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/v1/video")
    @requires_credits(VIDEO, units=seconds)
    async def render(request: FastAPIRequest) -> dict[str, bool]:
        used = request.query_params.get("used")
        ticket = current_ticket(request)
        assert ticket is not None
        if used is not None:
            ticket.report_usage(used)
        return {"ok": True}

    app.add_middleware(Auth)
    return app


async def test_fastapi_units_and_reported_usage(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    async with client(fastapi_app(guard)) as c:
        bad = await c.post("/v1/video?seconds=abc", headers=HEADERS)
        r = await c.post("/v1/video?seconds=2.5&used=1", headers=HEADERS)
    assert bad.status_code == 422 and bad.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    assert "units" in bad.json()["detail"]
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert r.headers["x-credits-charged"] == "50"
    await guard.flush()
    charge = await the_charge(guard)
    assert charge["amount"] == -50
    assert [row["amount"] for row in await refunds_of(guard, charge["id"])] == [30]
    assert await guard.open_holds() == []
    await assert_books(guard, 80)


async def test_refunding_a_charge_gives_back_its_surcharge_and_frees_its_key(guard: CreditGuard) -> None:
    """A request settled above its reserve and then refunded (a complaint, a late failure)
    gets everything back, reserve and surcharge, once; its idempotency key is free again."""
    await guard.grant_credits(ORG, 100)
    first = await guard.deduct_credits(ORG, VIDEO, hold=True, idempotency_key="job-1")
    assert first.charge_id is not None
    assert await guard.settle_charge(first.charge_id, used_credits=24, max_overage_credits=4) == (0, 4)
    await assert_books(guard, 100 - 20 - 4)

    refund = await guard.refund_credits(first.charge_id)
    assert refund.refunded and refund.credits_refunded == 24 and refund.remaining_credits == 100
    await assert_books(guard, 100)
    surcharge = [row for row in await ledger(guard) if row["extra_of"] == first.charge_id]
    assert len(surcharge) == 1 and len(await refunds_of(guard, int(surcharge[0]["id"]))) == 1
    assert not (await guard.refund_credits(first.charge_id)).refunded  # once
    await assert_books(guard, 100)

    again = await guard.deduct_credits(ORG, VIDEO, hold=True, idempotency_key="job-1")
    assert again.success and not again.replayed and again.charge_id != first.charge_id
    await assert_books(guard, 80)


async def test_settle_charge_with_bad_arguments_leaves_the_hold_alive(guard: CreditGuard) -> None:
    """A ValueError must not cost the request its heartbeat (and its hold, to the sweeper)."""
    await guard.grant_credits(ORG, 100)
    held = await guard.deduct_credits(ORG, VIDEO, hold=True)
    assert held.charge_id is not None
    with pytest.raises(ValueError):
        await guard.settle_charge(held.charge_id, used_credits=-1)
    assert held.charge_id in guard.holds.live
    assert await guard.release_expired_holds(now=far_future()) == 0
    assert await guard.open_holds() == [held.charge_id]


async def test_a_hold_settled_by_another_process_leaves_this_ones_heartbeat(guard: CreditGuard, db_url: str) -> None:
    """Charge in the web process, settle in a worker: the web process's live set must not
    keep (and heartbeat) the settled id forever."""
    await guard.grant_credits(ORG, 100)
    held = await guard.deduct_credits(ORG, IMAGE, hold=True)
    kept = await guard.deduct_credits(ORG, IMAGE, hold=True)
    assert held.charge_id is not None and kept.charge_id is not None
    async with CreditGuard(db_url, sweep=False) as worker:
        assert await worker.settle_charge(held.charge_id) == (0, 0)
    await guard.holds._heartbeat()
    assert guard.holds.live == {kept.charge_id}
    assert await guard.open_holds() == [kept.charge_id]
    await assert_books(guard, 90)


def test_cost_is_exact_for_any_number_of_digits() -> None:
    """Rounded up exactly: a client-chosen 1.0000000000000000000000000001 units is more
    than one unit, so it costs one credit more (Decimal's 28 digits would round it away)."""
    from decimal import Decimal

    from credit_guard._units import cost_of, units_value

    assert cost_of(5, units_value("1.0000000000000000000000000001")) == 6
    assert cost_of(20, units_value("1.4")) == 28
    assert cost_of(20, units_value(Decimal("0.05"))) == 1
    assert cost_of(3, units_value(7)) == 21


async def test_a_file_sent_by_the_server_itself_is_delivered_and_kept(guard: CreditGuard) -> None:
    """Servers with the ``http.response.pathsend`` extension send a FileResponse's bytes
    themselves: that message is the delivery, so the charge is kept, not refunded."""
    from credit_guard import CreditGuardMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/etc/hostname"})

    await guard.grant_credits(ORG, 100)
    middleware = CreditGuardMiddleware(app, guard=guard, rules={"GET /file": IMAGE})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/file",
        "headers": [],
        "query_string": b"",
        "extensions": {"http.response.pathsend": {}},
        "state": {"organization_id": ORG},
    }
    await middleware(scope, receive, send)
    await guard.flush()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.pathsend"]
    assert dict(sent[0]["headers"])[b"x-credits-charged"] == b"5"
    assert await guard.open_holds() == []
    assert [row["kind"] for row in await ledger(guard)] == ["grant", "charge"]
    await assert_books(guard, 95)


async def test_a_failed_free_request_frees_its_idempotency_key(guard: CreditGuard) -> None:
    """A feature priced 0 still leaves a charge row of 0 when the org has an account; if the
    request fails, its hold closes and its key is freed (not locked until the sweeper)."""
    await guard.create_pricing(feature_key="free_preview", feature_name="Free", category="c", credits=0)
    await guard.grant_credits(ORG, 10)
    first = await guard.deduct_credits(ORG, "free_preview", hold=True, idempotency_key="free-1")
    assert first.success and first.charge_id is not None
    result = await guard.refund_credits(first.charge_id, reason="handler raised")
    assert not result.refunded and result.error == "nothing to refund"
    assert await guard.open_holds() == []
    again = await guard.deduct_credits(ORG, "free_preview", hold=True, idempotency_key="free-1")
    assert again.success and not again.replayed and again.charge_id != first.charge_id


async def test_settle_charge_still_takes_the_old_max_extra_name_with_a_warning(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    held = await guard.deduct_credits(ORG, IMAGE, hold=True)
    assert held.charge_id is not None
    with pytest.warns(DeprecationWarning, match="max_overage_credits"):
        assert await guard.settle_charge(held.charge_id, used_credits=7, max_extra=1) == (0, 1)
    assert await guard.get_balance(ORG) == 100 - 5 - 1
