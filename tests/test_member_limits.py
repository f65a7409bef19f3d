"""Member caps inside an organization: a member (the request's user id) may spend at most
so many of the organization's credits per day, per month or in all. Decided by the charge
itself, in the same statement as the organization's debit; refunds give the cap back; a
new period starts it again. Both databases, with races of many members against their caps
and the organization's balance at once."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from credit_guard import CreditGuard, requires_credits
from credit_guard.testing import Clock

from .conftest import ledger_rows
from .helpers import OrgFromHeader, client

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"  # 5 credits
ORG = "acme"


CLOCK = Clock()


def travel_to(when: datetime) -> None:
    CLOCK.travel_to(when)


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    travel_to(datetime(2026, 3, 31, 23, 0, tzinfo=UTC))  # an hour before a day and a month end
    yield
    CLOCK.reset()


async def spent_by(guard: CreditGuard, member: str) -> int:
    """What the member's charges net of their refunds took, from the ledger."""
    rows = await ledger_rows(guard, ORG)
    charges = {int(r["id"]): -int(r["amount"]) for r in rows if r["kind"] == "charge" and r["user_id"] == member}  # type: ignore[call-overload]
    refunds = sum(int(r["amount"]) for r in rows if r["kind"] == "refund" and r["refund_of"] in charges)  # type: ignore[call-overload]
    return sum(charges.values()) - refunds


async def test_a_member_spends_up_to_its_cap_and_the_others_are_not_touched(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    cap = await guard.set_member_limit(ORG, "ann", 12, per="day")
    assert (cap.credits, cap.per, cap.used, cap.remaining) == (12, "day", 0, 12)
    assert cap.resets_at == datetime(2026, 4, 1, tzinfo=UTC)
    first = await guard.deduct_credits(ORG, IMAGE, user_id="ann")
    second = await guard.deduct_credits(ORG, IMAGE, user_id="ann")
    third = await guard.deduct_credits(ORG, IMAGE, user_id="ann")
    assert first.success and second.success and not third.success
    assert third.error_code == "member_limit_reached" and third.required == 5
    assert "'ann' may spend 12 credits a day; 2 left" in (third.error or "")
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="bob")).success  # no cap
    assert (await guard.deduct_credits(ORG, IMAGE)).success  # no member at all
    usage = await guard.get_member_usage(ORG, "ann")
    assert usage is not None and (usage.used, usage.remaining) == (10, 2)
    assert await guard.get_balance(ORG) == 100 - 4 * 5
    assert await guard.audit() == []


async def test_a_refund_gives_the_cap_back_and_a_new_day_starts_it_again(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    await guard.set_member_limit(ORG, "ann", 10, per="day")
    taken = [await guard.deduct_credits(ORG, IMAGE, user_id="ann") for _ in range(2)]
    assert all(r.success for r in taken)
    assert not (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    assert taken[1].charge_id is not None
    assert (await guard.refund_credits(taken[1].charge_id)).refunded
    assert (await guard.get_member_usage(ORG, "ann")).used == 5  # type: ignore[union-attr]
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    # past midnight UTC: a new day, a new cap; yesterday's refund gives nothing of today's back
    travel_to(datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC))
    assert (await guard.get_member_usage(ORG, "ann")).used == 0  # type: ignore[union-attr]
    today = [await guard.deduct_credits(ORG, IMAGE, user_id="ann") for _ in range(3)]
    assert [r.success for r in today] == [True, True, False]
    assert taken[0].charge_id is not None
    assert (await guard.refund_credits(taken[0].charge_id)).refunded  # a charge of yesterday's
    assert (await guard.get_member_usage(ORG, "ann")).used == 10  # type: ignore[union-attr]
    assert await guard.audit() == []


async def test_a_monthly_cap_and_a_cap_in_all(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 200)
    await guard.set_member_limit(ORG, "ann", 10, per="month")
    await guard.set_member_limit(ORG, "bob", 10)  # in all
    for member in ("ann", "bob"):
        assert [(await guard.deduct_credits(ORG, IMAGE, user_id=member)).success for _ in range(3)] == [
            True,
            True,
            False,
        ]
    travel_to(datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC))  # April: ann's month starts again, bob's cap never does
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    assert not (await guard.deduct_credits(ORG, IMAGE, user_id="bob")).success
    caps = {c.member: c for c in await guard.list_member_limits(ORG)}
    assert (caps["ann"].used, caps["ann"].resets_at) == (5, datetime(2026, 5, 1, tzinfo=UTC))
    assert (caps["bob"].used, caps["bob"].resets_at) == (10, None)
    assert await guard.audit() == []


async def test_changing_a_cap_keeps_its_use_changing_its_period_restarts_it(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    await guard.set_member_limit(ORG, "ann", 20, per="day")
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann", units=3)).success  # 15
    lowered = await guard.set_member_limit(ORG, "ann", 10, per="day")
    assert (lowered.used, lowered.remaining) == (15, 0)
    assert not (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    monthly = await guard.set_member_limit(ORG, "ann", 10, per="month")
    assert (monthly.used, monthly.remaining) == (0, 10)
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    assert await guard.remove_member_limit(ORG, "ann") and not await guard.remove_member_limit(ORG, "ann")
    assert await guard.get_member_usage(ORG, "ann") is None
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann", units=10)).success  # no cap now
    assert await guard.audit() == []


async def test_reported_usage_past_the_reserve_stops_at_the_members_cap(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    await guard.set_member_limit(ORG, "ann", 12)
    charged = await guard.deduct_credits(ORG, IMAGE, user_id="ann", hold=True)  # 5 held
    assert charged.charge_id is not None
    refunded, overage = await guard.settle_charge(charged.charge_id, used_credits=20, max_overage_credits=20)
    assert (refunded, overage) == (0, 7)  # 5 + 7 = the cap of 12, not the 20 used
    assert (await guard.get_member_usage(ORG, "ann")).remaining == 0  # type: ignore[union-attr]
    assert await spent_by(guard, "ann") == 12
    assert await guard.audit() == []


async def test_bad_caps_are_precise_errors(guard: CreditGuard) -> None:
    with pytest.raises(ValueError, match="credits must be a whole number from 0"):
        await guard.set_member_limit(ORG, "ann", -1)
    with pytest.raises(ValueError, match="per must be one of day, month or None"):
        await guard.set_member_limit(ORG, "ann", 5, per="week")
    with pytest.raises(ValueError, match="member must be a non-empty string"):
        await guard.set_member_limit(ORG, "", 5)
    with pytest.raises(ValueError, match="member must be a non-empty string"):
        await guard.get_member_usage(ORG, "a\x00b")
    assert await guard.list_member_limits(ORG) == []


def paid_app(guard: CreditGuard) -> FastAPI:
    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/v1/images")
    @requires_credits(IMAGE)
    async def images(request: Request) -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(OrgFromHeader)
    return app


async def test_over_its_cap_a_member_gets_a_402_that_names_the_limit(guard: CreditGuard) -> None:
    await guard.grant_credits(ORG, 100)
    await guard.set_member_limit(ORG, "ann", 7, per="day")
    async with client(paid_app(guard)) as http:
        ok = await http.post("/v1/images", headers={"x-org": ORG, "x-user": "ann"})
        refused = await http.post("/v1/images", headers={"x-org": ORG, "x-user": "ann"})
        other = await http.post("/v1/images", headers={"x-org": ORG, "x-user": "bob"})
    assert ok.status_code == 200 and other.status_code == 200
    assert refused.status_code == 402 and refused.headers["content-type"] == "application/problem+json"
    body = refused.json()
    assert body["type"] == "urn:credit-guard:problem:member-limit-reached"
    assert (body["limit"], body["member"], body["cap"], body["per"], body["available"]) == (
        "member",
        "ann",
        7,
        "day",
        2,
    )
    assert body["required"] == 5 and body["resets_at"] == "2026-04-01T00:00:00+00:00"
    assert "Nothing was charged" in body["detail"]
    assert (refused.headers["x-credits-required"], refused.headers["x-credits-remaining"]) == ("5", "2")
    assert await guard.get_balance(ORG) == 90
    assert await guard.audit() == []


async def test_two_hundred_racing_requests_of_five_members_stop_exactly_at_their_caps(guard: CreditGuard) -> None:
    """Caps 20, 35, 50 and 0 and one member without a cap, against an organization of 150:
    every member spends exactly up to its cap (in 5s) and the organization exactly its
    balance, whatever the interleaving (PostgreSQL batches them into shared statements)."""
    await guard.grant_credits(ORG, 150)
    caps = {"ann": 20, "bob": 35, "cy": 50, "dee": 0}
    for member, credits in caps.items():
        await guard.set_member_limit(ORG, member, credits, per="day")
    members = [*caps, "eve"]
    statuses: dict[str, list[int]] = {m: [] for m in members}
    async with client(paid_app(guard)) as http:

        async def call(member: str) -> None:
            answer = await http.post("/v1/images", headers={"x-org": ORG, "x-user": member})
            statuses[member].append(answer.status_code)

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(call, members[n % 5])
    for member, credits in caps.items():
        assert statuses[member].count(200) == credits // 5, member
        assert (await guard.get_member_usage(ORG, member)).used == credits == await spent_by(guard, member)  # type: ignore[union-attr]
    assert statuses["eve"].count(200) == (150 - 105) // 5  # what the capped members left of the balance
    assert await guard.get_balance(ORG) == 0
    assert await guard.audit() == []


async def test_a_batch_of_one_members_charges_in_one_statement_respects_the_cap(guard: CreditGuard) -> None:
    """Many charges of one member decided together (a batch on PostgreSQL): the walk counts
    what the batch already gave that member, not only what the row held before it."""
    await guard.grant_credits(ORG, 500)
    await guard.set_member_limit(ORG, "ann", 23, per="month")
    results: list[Any] = []

    async def charge() -> None:
        results.append(await guard.deduct_credits(ORG, IMAGE, user_id="ann"))

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(charge)
    assert sum(r.success for r in results) == 4  # 4 x 5 = 20 <= 23 < 25
    assert {r.error_code for r in results if not r.success} == {"member_limit_reached"}
    assert (await guard.get_member_usage(ORG, "ann")).used == 20 == await spent_by(guard, "ann")  # type: ignore[union-attr]
    assert await guard.get_balance(ORG) == 480
    assert await guard.audit() == []


async def test_audit_finds_a_cap_whose_use_is_not_its_members_charges(guard: CreditGuard) -> None:
    from sqlalchemy import update

    from credit_guard.schema import member_limits

    await guard.grant_credits(ORG, 100)
    await guard.deduct_credits(ORG, IMAGE, user_id="ann")  # before the cap: not the cap's
    await guard.set_member_limit(ORG, "ann", 50, per="day")
    await guard.deduct_credits(ORG, IMAGE, user_id="ann")
    assert (await guard.get_member_usage(ORG, "ann")).used == 5  # type: ignore[union-attr]
    assert await guard.audit() == []
    async with guard.engine.begin() as conn:
        await conn.execute(update(member_limits).values(used=3))
    [issue] = await guard.audit()
    assert issue.organization_id == ORG and "member 'ann' has used 3 of its cap, its charges say 5" in issue.problem
