"""Credit pools: a feature priced in a pool (``pool="video"``) draws only from grants given
to that pool, then from general ones if its pricing row falls back to them; general
features never touch a pool's credits. Decided by the same charge as every other (one
statement per batch on PostgreSQL, the conditional debit on SQLite), so races, refunds,
surcharges and the overdraft line keep to each charge's lane. Both databases."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from starlette.requests import Request

from credit_guard import CreditGuard, InvalidPricing, requires_credits
from credit_guard._clock import utcnow
from credit_guard.schema import grant_moves, grants, ledger

from .conftest import ledger_rows
from .helpers import OrgFromHeader, client

pytestmark = pytest.mark.anyio

ORG = "acme"
IMAGE = "seedream_text_to_image"  # 5 credits, general
STRICT = "pooled_clip"  # 10 credits, pool "video", no fallback
FALLBACK = "pooled_render"  # 10 credits, pool "video", falls back to general


async def price_pools(guard: CreditGuard) -> None:
    await guard.create_pricing(feature_key=STRICT, feature_name="Clip", category="Video", credits=10, pool="video")
    await guard.create_pricing(
        feature_key=FALLBACK, feature_name="Render", category="Video", credits=10, pool="video", pool_fallback=True
    )


async def drawn_from(guard: CreditGuard, charge_id: int | None) -> dict[str | None, int]:
    """What a charge took from each pool, from its grant moves."""
    async with guard.engine.connect() as conn:
        rows = await conn.execute(
            select(grants.c.pool, grant_moves.c.amount)
            .join(grants, grants.c.id == grant_moves.c.grant_id)
            .where(grant_moves.c.ledger_id == charge_id)
        )
        taken: dict[str | None, int] = {}
        for pool, amount in rows:
            taken[pool] = taken.get(pool, 0) - int(amount)
        return taken


async def test_a_pools_credits_pay_only_its_features_and_general_features_never_touch_them(guard: CreditGuard) -> None:
    await price_pools(guard)
    await guard.grant_credits(ORG, 15, pool="video")
    await guard.grant_credits(ORG, 7)
    assert await guard.get_pool_balances(ORG) == {"video": 15, None: 7}
    assert await guard.get_balance(ORG) == 22 and await guard.get_balance(ORG, pool="video") == 15

    image = await guard.deduct_credits(ORG, IMAGE)
    assert image.success and image.remaining_credits == 2 and image.pool is None  # general only: 7 - 5
    assert await drawn_from(guard, image.charge_id) == {None: 5}
    assert not (await guard.deduct_credits(ORG, IMAGE)).success  # 2 general left; the pool's 15 are not its

    clip = await guard.deduct_credits(ORG, STRICT)
    assert clip.success and clip.pool == "video" and clip.remaining_credits == 5
    refused = await guard.deduct_credits(ORG, STRICT)  # 5 in the pool, and it does not fall back
    assert not refused.success and refused.error_code == "insufficient_credits"
    assert (refused.required, refused.remaining_credits, refused.pool) == (10, 5, "video")
    assert "in pool 'video'" in (refused.error or "")

    render = await guard.deduct_credits(ORG, FALLBACK)  # the pool's 5 first, then general's 2... not enough
    assert not render.success and render.remaining_credits == 7
    await guard.grant_credits(ORG, 10)
    render = await guard.deduct_credits(ORG, FALLBACK)
    assert render.success and render.remaining_credits == 17 - 10
    assert await drawn_from(guard, render.charge_id) == {"video": 5, None: 5}  # its pool first
    assert await guard.get_pool_balances(ORG) == {"video": 0, None: 7}
    assert await guard.audit() == []


async def test_a_refund_goes_back_to_the_pools_it_came_from(guard: CreditGuard) -> None:
    await price_pools(guard)
    await guard.grant_credits(ORG, 4, pool="video")
    await guard.grant_credits(ORG, 20)
    render = await guard.deduct_credits(ORG, FALLBACK)
    assert await drawn_from(guard, render.charge_id) == {"video": 4, None: 6}
    assert render.charge_id is not None
    refund = await guard.refund_credits(render.charge_id, reason="failed")
    assert refund.refunded and refund.pool == "video" and refund.remaining_credits == 24  # the feature's lane
    assert await guard.get_pool_balances(ORG) == {"video": 4, None: 20}
    assert await guard.audit() == []


async def test_the_overdraft_line_serves_general_and_falling_back_charges_and_no_pool_repays_it(
    guard: CreditGuard,
) -> None:
    await price_pools(guard)
    await guard.set_overdraft_limit(ORG, 30)
    assert not (await guard.deduct_credits(ORG, STRICT)).success  # a strict pool has no overdraft
    render = await guard.deduct_credits(ORG, FALLBACK)
    assert render.success and render.remaining_credits == -10
    assert (await guard.get_overdraft(ORG))[1] == 10
    await guard.grant_credits(ORG, 25, pool="video")  # a pool's credits never pay the general debt
    assert (await guard.get_overdraft(ORG))[1] == 10
    assert await guard.get_pool_balances(ORG) == {"video": 25, None: -10}
    await guard.grant_credits(ORG, 4)  # a general grant does
    assert (await guard.get_overdraft(ORG))[1] == 6
    assert await guard.audit() == []


async def test_an_expired_pool_grant_is_never_spent_and_a_surcharge_keeps_to_its_lane(guard: CreditGuard) -> None:
    from credit_guard.testing import Clock

    clock = Clock()
    await price_pools(guard)
    try:
        await guard.grant_credits(ORG, 10, pool="video", expires_at=utcnow() + timedelta(minutes=5))
        await guard.grant_credits(ORG, 50, pool="video")
        await guard.grant_credits(ORG, 100)
        clock.travel(timedelta(minutes=6))
        clip = await guard.reserve(ORG, STRICT, job_id="job-1", units=2, ttl=60, max_overage=2.0)
        assert clip.success and clip.remaining_credits == 30 and clip.pool == "video"  # 20 of the live 50
        done = await guard.capture("job-1", units=6)  # 60 used: 40 more allowed, the pool has 30 left
        assert done.state == "captured"
        assert await guard.get_pool_balances(ORG) == {
            "video": 0,
            None: 100,
        }  # the expired 10 (unswept) are not spendable
        assert await guard.get_balance(ORG, pool="video") == 0
        [surcharge] = [r for r in await ledger_rows(guard, ORG) if r["extra_of"] is not None]
        assert surcharge["amount"] == -30 and surcharge["pool"] == "video"
        assert await drawn_from(guard, int(surcharge["id"])) == {"video": 30}  # type: ignore[call-overload]
        assert await guard.expire_grants() == 1
        assert await guard.audit() == []
    finally:
        clock.reset()


async def test_bad_pool_names_are_precise_errors(guard: CreditGuard) -> None:
    with pytest.raises(ValueError, match="pool must be lowercase letters"):
        await guard.grant_credits(ORG, 5, pool="Video!")
    with pytest.raises(ValueError, match="pool must be a string or null"):
        await guard.grant_credits(ORG, 5, pool=7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pool must be at most 64"):
        await guard.get_balance(ORG, pool="v" * 65)
    with pytest.raises(InvalidPricing) as caught:
        await guard.create_pricing(
            feature_key="bad_pool",
            feature_name="B",
            category="C",
            credits=1,
            pool="a b",
            pool_fallback="yes",  # type: ignore[arg-type]
        )
    assert set(caught.value.errors) == {"pool", "pool_fallback"}
    assert await guard.get_balance(ORG) == 0 and await ledger_rows(guard, ORG) == []


async def test_audit_finds_a_charge_that_drew_outside_its_lane(guard: CreditGuard) -> None:
    await price_pools(guard)
    await guard.grant_credits(ORG, 30, pool="video")
    await guard.grant_credits(ORG, 30)
    clip = await guard.deduct_credits(ORG, STRICT)
    assert await guard.audit() == []
    async with guard.engine.begin() as conn:  # as if the charge had been decided as a general one
        await conn.execute(update(ledger).where(ledger.c.id == clip.charge_id).values(pool=None, pool_fallback=None))
    [issue] = await guard.audit()
    assert issue.problem == f"charge {clip.charge_id} of pool general drew from grant 1 of pool video"


def pooled_app(guard: CreditGuard) -> FastAPI:
    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/v1/images")
    @requires_credits(IMAGE)
    async def images(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/clips")
    @requires_credits(STRICT)
    async def clips(request: Request) -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/renders")
    @requires_credits(FALLBACK)
    async def renders(request: Request) -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(OrgFromHeader)
    return app


async def test_headers_and_the_402_say_which_pool(guard: CreditGuard) -> None:
    await price_pools(guard)
    await guard.grant_credits(ORG, 12, pool="video")
    await guard.grant_credits(ORG, 6)
    async with client(pooled_app(guard)) as http:
        clip = await http.post("/v1/clips", headers={"x-org": ORG})
        image = await http.post("/v1/images", headers={"x-org": ORG})
        short = await http.post("/v1/clips", headers={"x-org": ORG})
        render = await http.post("/v1/renders", headers={"x-org": ORG})
    assert clip.status_code == 200 and clip.headers["x-credits-pool"] == "video"
    assert (clip.headers["x-credits-charged"], clip.headers["x-credits-remaining"]) == ("10", "2")
    assert image.status_code == 200 and "x-credits-pool" not in image.headers
    assert image.headers["x-credits-remaining"] == "1"
    assert short.status_code == 402 and short.headers["x-credits-pool"] == "video"
    body = short.json()
    assert (body["pool"], body["required"], body["available"]) == ("video", 10, 2)
    assert body["detail"] == "'pooled_clip' costs 10 credits of pool 'video'; the organization has 2."
    assert render.status_code == 402 and render.json()["available"] == 3  # the pool's 2 and general's 1
    check = await guard.check_credits(ORG, FALLBACK)
    assert (check.has_enough, check.required, check.available) == (False, 10, 3)
    assert await guard.get_pool_balances(ORG) == {"video": 2, None: 1}
    assert await guard.audit() == []


async def test_two_hundred_racing_requests_of_five_members_against_caps_and_a_pool(guard: CreditGuard) -> None:
    """Five members race general and pooled features of one organization at once, three of
    them under caps: each cap, the pool and the general credits end exactly spent, and no
    charge drew from another lane (PostgreSQL splits a batch that mixes lanes per org)."""
    await price_pools(guard)
    await guard.grant_credits(ORG, 300, pool="video")
    await guard.grant_credits(ORG, 200)
    caps = {"ann": 60, "bob": 45, "cy": 100}
    for member, credits in caps.items():
        await guard.set_member_limit(ORG, member, credits, per="day")
    members = [*caps, "dee", "eve"]
    routes = ["/v1/clips", "/v1/images", "/v1/renders"]
    answers: list[tuple[str, str, int]] = []
    async with client(pooled_app(guard)) as http:

        async def call(member: str, route: str) -> None:
            answer = await http.post(route, headers={"x-org": ORG, "x-user": member})
            answers.append((member, route, answer.status_code))

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(call, members[n % 5], routes[n % 3])
    assert len(answers) == 200 and {status for _, _, status in answers} <= {200, 402}
    for member, credits in caps.items():
        usage = await guard.get_member_usage(ORG, member)
        assert usage is not None and usage.used <= credits
        spent = sum(
            {"/v1/clips": 10, "/v1/images": 5, "/v1/renders": 10}[route]
            for who, route, status in answers
            if who == member and status == 200
        )
        assert usage.used == spent, member
    charged = sum(
        {"/v1/clips": 10, "/v1/images": 5, "/v1/renders": 10}[route] for _, route, status in answers if status == 200
    )
    assert charged == 500 - await guard.get_balance(ORG)
    rows: list[dict[str, Any]] = [r for r in await ledger_rows(guard, ORG) if r["kind"] == "charge"]
    assert sum(-int(r["amount"]) for r in rows) == charged
    assert {r["pool"] for r in rows if r["feature_key"] == IMAGE} <= {None}
    assert {r["pool"] for r in rows if r["feature_key"] != IMAGE} <= {"video"}
    assert [status for _, _, status in answers].count(402) > 0  # 1,665 credits asked of 500
    assert await guard.audit() == []


async def test_the_auto_top_up_judges_general_credits_and_a_falling_back_charge_can_trigger_it(
    guard: CreditGuard,
) -> None:
    """A top-up buys general credits, so it watches general credits: a charge that fell
    back to them sets it off (its own spendable counts the pool), and 500 video credits
    do not hide a general balance below its line."""
    await price_pools(guard)
    bought: list[tuple[str, int]] = []

    async def card(organization_id: str, credits: int, *, key: str) -> str:
        bought.append((organization_id, credits))
        await guard.grant_credits(organization_id, credits, reason="auto top-up", idempotency_key=key)
        return "pi_1"

    async def drain() -> None:
        for _ in range(3):
            await guard.topups.run_once()
            await anyio.sleep(0.05)

    await guard.grant_credits(ORG, 5, pool="video")
    await guard.grant_credits(ORG, 30)
    await guard.set_auto_topup(ORG, below=28, credits=100, charge=card)
    render = await guard.deduct_credits(ORG, FALLBACK)  # 5 video, then 5 general: 25 general left
    assert render.success and render.remaining_credits == 25
    await drain()
    assert bought == [(ORG, 100)]

    rich = "rich_in_video"
    await guard.grant_credits(rich, 500, pool="video")
    await guard.grant_credits(rich, 30)
    await guard.set_auto_topup(rich, below=28, credits=100, charge=card)
    assert (await guard.deduct_credits(rich, STRICT)).success  # the pool only: general untouched
    await drain()
    assert bought == [(ORG, 100)]
    assert (await guard.deduct_credits(rich, IMAGE)).success  # 25 general: below the line, 490 video or not
    await drain()
    assert bought == [(ORG, 100), (rich, 100)]
    assert await guard.get_pool_balances(rich) == {"video": 490, None: 125}
    assert await guard.audit() == []
