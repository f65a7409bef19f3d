"""Plans: each period's allowance granted once, in order, whoever renews it and however
late; rollovers exact; a plan change or an ending subscription never revives a credit.
Driven by the library's clock (``_clock.travel``) on both databases, ``audit()`` after
every step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from credit_guard import CreditGuard
from credit_guard._clock import reset_travel, travel, utcnow
from credit_guard._periods import period_index, period_start
from credit_guard.errors import PlanInUse, PlanNotFound
from credit_guard.events import AllowanceIssuedEvent

from .conftest import ledger_rows

pytestmark = pytest.mark.anyio

ORG = "org_plan"


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    reset_travel()
    yield
    reset_travel()


def travel_to(when: datetime) -> None:
    travel(when - utcnow())


@pytest.fixture
async def priced(guard: CreditGuard) -> CreditGuard:
    """The guard with a 1-credit feature, so a test spends any amount as units."""
    await guard.create_pricing(feature_key="llm_token", feature_name="Token", category="Text", credits=1)
    return guard


async def spend(guard: CreditGuard, credits: int, org: str = ORG) -> int:
    result = await guard.deduct_credits(org, "llm_token", units=credits)
    assert result.success, result
    assert result.charge_id is not None
    return result.charge_id


async def allowance_keys(guard: CreditGuard, org: str = ORG) -> list[str]:
    return [str(r["idempotency_key"]) for r in await ledger_rows(guard, org) if r["kind"] == "grant"]


# -- periods --------------------------------------------------------------------------------


def test_months_follow_the_calendar_from_the_anchor_not_from_the_last_start() -> None:
    anchor = datetime(2027, 1, 31, 9, 30, tzinfo=UTC)
    starts = [period_start(anchor, "month", n) for n in range(5)]
    assert [s.date().isoformat() for s in starts] == [
        "2027-01-31",
        "2027-02-28",
        "2027-03-31",
        "2027-04-30",
        "2027-05-31",
    ]
    assert all(s.time() == anchor.time() for s in starts)
    leap = datetime(2028, 2, 29, tzinfo=UTC)
    assert [period_start(leap, "year", n).date().isoformat() for n in range(2)] == ["2028-02-29", "2029-02-28"]
    assert period_start(anchor, "week", 2) == anchor + timedelta(days=14)


def test_the_period_of_an_instant_is_the_last_one_started() -> None:
    anchor = datetime(2027, 1, 31, 12, tzinfo=UTC)
    for unit in ("day", "week", "month", "year"):
        for n in (0, 1, 2, 13, 40):
            start = period_start(anchor, unit, n)  # type: ignore[arg-type]
            assert period_index(anchor, unit, start) == n  # type: ignore[arg-type]
            assert period_index(anchor, unit, start - timedelta(microseconds=1)) == n - 1  # type: ignore[arg-type]
    assert period_index(anchor, "month", anchor - timedelta(seconds=1)) == -1


# -- defining and subscribing ---------------------------------------------------------------


async def test_a_subscription_grants_its_first_period_at_once_and_again_changes_nothing(priced: CreditGuard) -> None:
    guard = priced
    plan = await guard.define_plan("pro", credits=1000, rollover=500, name="Pro")
    assert (plan.credits, plan.period, plan.rollover, plan.name) == (1000, "month", 500, "Pro")
    sub = await guard.subscribe(ORG, "pro")
    assert (sub.plan_key, sub.period) == ("pro", 0)
    assert sub.renews_at == period_start(sub.anchor, "month", 1)
    assert await guard.get_balance(ORG) == 1000
    assert await guard.subscribe(ORG, "pro") == sub  # a login or a webhook calling it again
    assert await allowance_keys(guard) == [f"plan:{await subscription_id(guard)}:0"]
    [grant] = await guard.list_grants(ORG)
    assert (grant.remaining, grant.expires_at) == (1000, sub.renews_at)
    assert await guard.audit() == []


async def subscription_id(guard: CreditGuard, org: str = ORG) -> str:
    from sqlalchemy import select

    from credit_guard.schema import subscriptions

    async with guard.engine.connect() as conn:
        return str(
            (await conn.execute(select(subscriptions.c.id).where(subscriptions.c.organization_id == org))).scalar()
        )


async def test_bad_plans_and_unknown_plans_are_precise_errors_that_change_nothing(priced: CreditGuard) -> None:
    guard = priced
    for bad in ({"credits": 0}, {"credits": 10, "period": "fortnight"}, {"credits": 10, "rollover": -1}):
        with pytest.raises(ValueError):
            await guard.define_plan("pro", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plan_key"):
        await guard.define_plan("Pro Plan", credits=10)
    with pytest.raises(PlanNotFound):
        await guard.subscribe(ORG, "nope")
    with pytest.raises(ValueError, match="on_change"):
        await guard.subscribe(ORG, "nope", on_change="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anchor"):
        await guard.subscribe(ORG, "nope", anchor=datetime(2027, 1, 1))  # naive
    assert await guard.list_plans() == []
    assert await guard.get_balance(ORG) == 0
    await guard.define_plan("pro", credits=10)
    await guard.subscribe(ORG, "pro")
    with pytest.raises(PlanInUse):
        await guard.delete_plan("pro")
    await guard.unsubscribe(ORG)
    await guard.delete_plan("pro")
    with pytest.raises(PlanNotFound):
        await guard.delete_plan("pro")
    assert await guard.audit() == []


# -- fourteen months ------------------------------------------------------------------------


class Model:
    """What the books must say: the allowance and the rollover of the period under way."""

    def __init__(self, credits: int, rollover: int | None) -> None:
        self.credits, self.rollover = credits, rollover
        self.allowance, self.carried = credits, 0

    def spend(self, credits: int) -> None:
        from_rollover = min(credits, self.carried)
        self.carried -= from_rollover
        self.allowance -= credits - from_rollover

    def renew(self) -> None:
        left = self.allowance
        self.carried = left if self.rollover is None else min(left, self.rollover)
        self.allowance = self.credits

    @property
    def balance(self) -> int:
        return self.allowance + self.carried


@pytest.fixture
async def workers(priced: CreditGuard, db_url: str) -> AsyncIterator[list[CreditGuard]]:
    """Four more processes' guards on the same database, their keepers run by hand."""
    guards = [CreditGuard(db_url, sweep=False, max_connections=3) for _ in range(4)]
    for g in guards:
        await g.start()
    yield guards
    for g in guards:
        await g.close()


async def keepers_race(workers: list[CreditGuard]) -> list[int]:
    issued: list[int] = []

    async def keep(g: CreditGuard) -> None:
        issued.append(await g.renew_and_expire())

    async with anyio.create_task_group() as tg:
        for g in workers:
            tg.start_soon(keep, g)
    return issued


async def test_fourteen_months_with_rollover_a_plan_change_and_a_keeper_down_forty_days(
    priced: CreditGuard, workers: list[CreditGuard]
) -> None:
    guard = priced
    announced: list[AllowanceIssuedEvent] = []

    async def seen(event: AllowanceIssuedEvent) -> None:
        announced.append(event)

    for g in (guard, *workers):
        g.on_allowance_issued(seen)

    await guard.define_plan("pro", credits=1000, rollover=500, name="Pro")
    await guard.define_plan("max", credits=3000, rollover=None, name="Max")
    anchor = datetime(2027, 1, 31, 10, tzinfo=UTC)
    travel_to(anchor + timedelta(minutes=1))
    await guard.subscribe(ORG, "pro", anchor=anchor)
    model = Model(1000, 500)
    spending = [300, 900, 0, 1200, 50, 999, 1000, 10, 700, 1499, 0, 250, 640, 5]
    period = 0
    for month, credits in enumerate(spending):
        if credits:
            await spend(guard, credits)
            model.spend(credits)
        assert await guard.get_balance(ORG) == model.balance, month
        if month == 6:  # the plan changes mid-period: Pro's unused credits expire, Max starts now
            sub = await guard.subscribe(ORG, "max")
            anchor, period, model = sub.anchor, 0, Model(3000, None)
            assert await guard.get_balance(ORG) == 3000
            continue
        # Month 9: the keeper is down for 40 days; the periods that began are granted in order when it returns.
        late = timedelta(days=40) if month == 9 else timedelta(hours=1)
        travel_to(period_start(anchor, "month", period + 1) + late)
        due = period_index(anchor, "month", utcnow())
        assert due - period == (2 if month == 9 else 1)
        # The general expiry runs first on one worker: it must not write off the allowance
        # whose rollover the renewal has yet to carry.
        await workers[0].grants.expire()
        assert sum(await keepers_race(workers)) == due - period  # each period once, among four keepers
        while period < due:
            model.renew()
            period += 1
        assert await guard.get_balance(ORG) == model.balance, month
        assert await guard.audit() == []
    keys = await allowance_keys(guard)
    assert len(keys) == len(set(keys))  # no period granted twice
    max_id = await subscription_id(guard)
    assert [k for k in keys if k.startswith(f"plan:{max_id}:") and not k.endswith("rollover")] == [
        f"plan:{max_id}:{n}" for n in range(period + 1)
    ]
    for g in (guard, *workers):
        await g.hooks.drain()
    assert sorted(e.period for e in announced if e.plan_key == "max") == list(range(period + 1))  # once each
    assert await keepers_race(workers) == [0, 0, 0, 0]  # nothing left to grant
    assert await guard.audit() == []


async def test_the_expiry_sweep_running_first_never_loses_a_rollover(priced: CreditGuard) -> None:
    guard = priced
    await guard.define_plan("pro", credits=100, rollover=30)
    sub = await guard.subscribe(ORG, "pro")
    await spend(guard, 60)
    travel_to(sub.renews_at + timedelta(seconds=1))
    assert await guard.grants.expire() == 0  # the allowance waits for its renewal
    assert await guard.renew_and_expire() == 1
    assert await guard.get_balance(ORG) == 100 + 30
    rows = [(r["kind"], r["amount"]) for r in await ledger_rows(guard, ORG)]
    assert rows == [("grant", 100), ("charge", -60), ("expiry", -40), ("grant", 30), ("grant", 100)]
    assert await guard.audit() == []


async def test_a_refund_after_the_renewal_goes_to_the_ended_allowance_and_is_written_off(
    priced: CreditGuard,
) -> None:
    guard = priced
    await guard.define_plan("pro", credits=100, rollover=0)
    sub = await guard.subscribe(ORG, "pro")
    charge = await spend(guard, 80)
    travel_to(sub.renews_at + timedelta(seconds=1))
    await guard.renew_and_expire()
    assert await guard.get_balance(ORG) == 100
    result = await guard.refund_credits(charge)
    assert result.refunded
    assert await guard.get_balance(ORG) == 100  # back to a grant that has ended: never spendable
    await guard.renew_and_expire()
    assert await guard.get_balance(ORG) == 100
    assert not (await spend_or_refused(guard, 101))
    assert await guard.audit() == []


async def spend_or_refused(guard: CreditGuard, credits: int) -> bool:
    return (await guard.deduct_credits(ORG, "llm_token", units=credits)).success


async def test_a_plan_change_keeping_credits_lets_them_last_to_their_own_end(priced: CreditGuard) -> None:
    guard = priced
    await guard.define_plan("pro", credits=100, rollover=0)
    await guard.define_plan("max", credits=300, rollover=0)
    sub = await guard.subscribe(ORG, "pro")
    await spend(guard, 40)
    travel(timedelta(days=3))
    await guard.subscribe(ORG, "max", on_change="keep")
    assert await guard.get_balance(ORG) == 60 + 300
    travel_to(sub.renews_at + timedelta(seconds=1))  # Pro's period ends: its 60 expire by the sweep
    await guard.renew_and_expire()
    assert await guard.get_balance(ORG) == 300
    assert await guard.audit() == []


async def test_unsubscribing_keeps_the_period_under_way_and_grants_no_more(priced: CreditGuard) -> None:
    guard = priced
    await guard.define_plan("pro", credits=100, rollover=None)
    sub = await guard.subscribe(ORG, "pro")
    await guard.grant_credits(ORG, 25, reason="pack")
    assert await guard.unsubscribe(ORG) is not None
    assert await guard.subscription(ORG) is None
    assert await guard.get_balance(ORG) == 125
    travel_to(sub.renews_at + timedelta(days=40))
    assert await guard.renew_and_expire() == 0
    assert await guard.get_balance(ORG) == 25  # the pack never expires; the allowance did
    await guard.subscribe(ORG, "pro")
    await guard.unsubscribe(ORG, on_change="expire")
    assert await guard.get_balance(ORG) == 25
    assert await guard.audit() == []


async def test_a_future_anchor_grants_nothing_until_it_comes(priced: CreditGuard) -> None:
    guard = priced
    await guard.define_plan("daily", credits=10, period="day", rollover=0)
    start = utcnow() + timedelta(days=2)
    sub = await guard.subscribe(ORG, "daily", anchor=start)
    assert (sub.period, sub.renews_at, await guard.get_balance(ORG)) == (-1, start, 0)
    travel_to(start + timedelta(hours=1))
    assert await guard.renew_and_expire() == 1
    assert await guard.get_balance(ORG) == 10
    assert await guard.audit() == []


async def test_an_edit_reaches_subscribers_at_their_next_period(priced: CreditGuard) -> None:
    guard = priced
    await guard.define_plan("pro", credits=100, rollover=0)
    sub = await guard.subscribe(ORG, "pro")
    await guard.define_plan("pro", credits=150, rollover=0)
    assert await guard.get_balance(ORG) == 100  # the period under way is not changed under the user
    travel_to(sub.renews_at + timedelta(seconds=1))
    await guard.renew_and_expire()
    assert await guard.get_balance(ORG) == 150
    assert [p.credits for p in await guard.list_plans()] == [150]
    assert await guard.audit() == []


async def test_a_charge_in_a_periods_first_moments_gets_the_new_allowance_before_any_keeper(
    priced: CreditGuard,
) -> None:
    """No keeper has run since the period began: the refused charge grants the period and
    is tried once more, instead of answering 402 until the next sweep."""
    guard = priced
    await guard.define_plan("pro", credits=100, rollover=10)
    sub = await guard.subscribe(ORG, "pro")
    await spend(guard, 95)
    travel_to(sub.renews_at + timedelta(seconds=1))
    await spend(guard, 50)  # the new period's 100 plus the 5 carried
    assert await guard.get_balance(ORG) == 55
    renewed = await guard.subscription(ORG)
    assert renewed is not None and renewed.period == 1
    assert not await spend_or_refused(guard, 56)  # still refused when it is truly short
    assert await guard.renew_and_expire() == 0
    assert await guard.audit() == []


async def test_a_plans_period_cannot_change_under_its_subscribers(priced: CreditGuard) -> None:
    """Found by the admin page's author: monthly -> daily under a subscriber four months in
    granted 177 periods at once. Subscriptions count periods in the plan's unit."""
    guard = priced
    await guard.define_plan("pro", credits=100, rollover=0)
    await guard.subscribe(ORG, "pro")
    with pytest.raises(PlanInUse, match="changed from month to day"):
        await guard.define_plan("pro", credits=100, period="day", rollover=0)
    assert (await guard.get_plan("pro")).period == "month"  # type: ignore[union-attr]
    await guard.define_plan("pro", credits=120, rollover=10)  # the same period: any other change is fine
    await guard.unsubscribe(ORG)
    await guard.define_plan("pro", credits=120, period="day")  # nobody on it: the unit may change
    assert await guard.audit() == []
