"""Auto top-up: the app's charge runs once per crossing of the line, whatever races it
(200 charges over two processes), outside the request; what it returned or raised is on
the row; a runner that died is replaced under the same crossing (and payment key). Both
databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import anyio
import pytest

from credit_guard import CreditGuard
from credit_guard._clock import reset_travel, travel, utcnow

from .conftest import topup_key

pytestmark = pytest.mark.anyio

ORG = "org_topup"


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    reset_travel()
    yield
    reset_travel()


class Card:
    """The app's charge: pays (here, always or never) and grants, keyed by the crossing."""

    def __init__(self, guard: CreditGuard, *, declines: bool = False) -> None:
        self.guard, self.declines = guard, declines
        self.calls: list[tuple[str, int, str]] = []

    async def __call__(self, organization_id: str, credits: int, *, key: str) -> str:
        self.calls.append((organization_id, credits, key))
        await anyio.sleep(0.05)  # the payment provider
        if self.declines:
            raise RuntimeError("card_declined")
        await self.guard.grant_credits(organization_id, credits, reason="auto top-up", idempotency_key=key)
        return f"pi_{key}"


@pytest.fixture
async def priced(guard: CreditGuard) -> CreditGuard:
    await guard.create_pricing(feature_key="llm_token", feature_name="Token", category="Text", credits=1)
    return guard


@pytest.fixture
async def other(priced: CreditGuard, db_url: str) -> AsyncIterator[CreditGuard]:
    """A second process's guard on the same database."""
    async with CreditGuard(db_url, sweep=False, max_connections=4) as g:
        yield g


async def drain(*guards: CreditGuard) -> None:
    for _ in range(3):
        for g in guards:
            await g.topups.run_once()
        await anyio.sleep(0.1)


async def test_two_hundred_racing_charges_over_two_processes_top_up_once(
    priced: CreditGuard, other: CreditGuard
) -> None:
    guard = priced
    card = Card(guard)
    await guard.grant_credits(ORG, 150)
    await guard.set_auto_topup(ORG, below=100, credits=500, charge=card)
    other.topups.register(card)
    await other.topups.refresh()  # what its keeper does each round: learn the lines others set
    charged = 0

    async def charge(g: CreditGuard) -> None:
        nonlocal charged
        if (await g.deduct_credits(ORG, "llm_token")).success:
            charged += 1

    async with anyio.create_task_group() as tg:
        for n in range(200):
            tg.start_soon(charge, guard if n % 2 else other)
    await drain(guard, other)
    assert card.calls == [(ORG, 500, await topup_key(guard, ORG, 1))]
    assert await guard.get_balance(ORG) == 150 + 500 - charged
    topup = await guard.auto_topup(ORG)
    assert topup is not None
    assert (topup.state, topup.crossings, topup.last_result, topup.last_error) == (
        "armed",  # back above the line: the next crossing tops up again
        1,
        "pi_" + await topup_key(guard, ORG, 1),
        None,
    )
    assert await guard.audit() == []


async def test_each_crossing_tops_up_and_a_failure_waits_for_the_next_one(priced: CreditGuard) -> None:
    guard = priced
    card = Card(guard)
    await guard.grant_credits(ORG, 120)
    await guard.set_auto_topup(ORG, below=100, credits=50, charge=card)
    for crossing in (1, 2):
        assert (await guard.deduct_credits(ORG, "llm_token", units=45)).success  # 75, then 125 -> 80
        await drain(guard)
        assert len(card.calls) == crossing
    assert await guard.get_balance(ORG) == 120 - 90 + 100
    card.declines = True
    assert (await guard.deduct_credits(ORG, "llm_token", units=80)).success  # 50: below again
    await drain(guard)
    assert (await guard.deduct_credits(ORG, "llm_token", units=10)).success  # still below: no new crossing
    await drain(guard)
    topup = await guard.auto_topup(ORG)
    assert topup is not None
    assert (topup.state, topup.crossings, topup.last_error) == ("fired", 3, "RuntimeError: card_declined")
    assert len(card.calls) == 3 and await guard.get_balance(ORG) == 40
    await guard.grant_credits(ORG, 100)  # the customer pays by hand: 140, armed again
    await drain(guard)
    assert (await guard.auto_topup(ORG)).state == "armed"  # type: ignore[union-attr]
    assert await guard.audit() == []


async def test_a_line_set_below_the_balance_tops_up_at_once(priced: CreditGuard) -> None:
    guard = priced
    card = Card(guard)
    await guard.grant_credits(ORG, 10)
    await guard.set_auto_topup(ORG, below=100, credits=200, charge=card)
    await drain(guard)
    assert [call[1] for call in card.calls] == [200] and await guard.get_balance(ORG) == 210


async def test_a_runner_that_died_is_replaced_under_the_same_crossing(priced: CreditGuard) -> None:
    guard = priced
    card = Card(guard)
    await guard.grant_credits(ORG, 150)
    await guard.set_auto_topup(ORG, below=100, credits=500)
    assert (await guard.deduct_credits(ORG, "llm_token", units=60)).success
    now = utcnow()
    claimed = await guard.store.claim_topup(ORG, now, now + guard.topups.lease)  # then it died
    assert claimed == (1, 500, await topup_key(guard, ORG, 1))
    guard.topups.register(card)
    guard.topups.moved(ORG, None, -1)
    await drain(guard)
    assert card.calls == []  # its lease still runs
    travel(guard.topups.lease + timedelta(seconds=1))
    guard.topups.moved(ORG, None, -1)
    await drain(guard)
    assert card.calls == [(ORG, 500, await topup_key(guard, ORG, 1))]  # the same key: the payment is not made twice
    assert await guard.get_balance(ORG) == 590
    assert await guard.audit() == []


async def test_a_line_removed_and_set_again_never_reuses_an_earlier_key(priced: CreditGuard) -> None:
    """Its count starts again, but its keys are a new line's: a key an earlier top-up used
    would make the payment provider and the grant answer "done" while nothing was bought."""
    guard = priced
    card = Card(guard)
    await guard.grant_credits(ORG, 10)
    await guard.set_auto_topup(ORG, below=100, credits=200, charge=card)
    await drain(guard)
    first = await topup_key(guard, ORG, 1)
    assert await guard.remove_auto_topup(ORG)
    assert (await guard.deduct_credits(ORG, "llm_token", units=150)).success  # 210 -> 60: below again
    await guard.set_auto_topup(ORG, below=100, credits=200)
    await drain(guard)
    second = await topup_key(guard, ORG, 1)
    assert [call[2] for call in card.calls] == [first, second] and first != second
    assert await guard.get_balance(ORG) == 60 + 200  # bought and granted again, not answered "done"
    assert await guard.audit() == []


async def test_bad_lines_are_precise_errors(priced: CreditGuard) -> None:
    for below, credits in ((0, 10), (10, 0), (True, 10)):
        with pytest.raises(ValueError):
            await priced.set_auto_topup(ORG, below=below, credits=credits)
    with pytest.raises(TypeError):
        priced.topups.register("not callable")  # type: ignore[arg-type]
    assert await priced.auto_topup(ORG) is None
    assert await priced.remove_auto_topup(ORG) is False


async def test_claimers_racing_for_one_crossing_claim_it_once(priced: CreditGuard, other: CreditGuard) -> None:
    """Twenty claims of the same crossing at once, from two processes: one wins. (The line
    was once read before the account's lock: on PostgreSQL two claimers both saw it armed
    and both ran crossing 1 with the same key.)"""
    guard = priced
    await guard.grant_credits(ORG, 150)
    await guard.set_auto_topup(ORG, below=100, credits=500)
    assert (await guard.deduct_credits(ORG, "llm_token", units=60)).success
    now = utcnow()
    claims: list[Any] = []

    async def claim(g: CreditGuard) -> None:
        claims.append(await g.store.claim_topup(ORG, now, now + g.topups.lease))

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(claim, (guard, other)[n % 2])
    assert [c for c in claims if c is not None] == [(1, 500, await topup_key(guard, ORG, 1))]
    topup = await guard.auto_topup(ORG)
    assert topup is not None and (topup.state, topup.crossings) == ("running", 1)
