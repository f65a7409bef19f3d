"""Credits kept as grants: spending order, expiry, refunds to their grants, overdraft.

Every test runs on SQLite and PostgreSQL and reads real outcomes: balances, grants'
remaining credits, ledger rows and ``audit()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from credit_guard import CreditGuard
from credit_guard._clock import reset_travel, travel, utcnow
from credit_guard.events import GrantExpiredEvent, LowBalanceEvent

from .conftest import ledger_rows

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"  # 5 credits
VIDEO = "kling_image_to_video"  # 20 credits


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    yield
    reset_travel()


def later(**delta: float) -> datetime:
    return utcnow() + timedelta(**delta)


async def remaining(guard: CreditGuard, org: str = "org_1") -> list[tuple[str | None, int]]:
    return [(g.reason, g.remaining) for g in await guard.list_grants(org)]


async def test_a_charge_draws_lower_priority_first_then_soonest_expiry_then_oldest(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 10, reason="pack")  # never expires
    await guard.grant_credits("org_1", 10, reason="monthly", expires_at=later(days=30))
    await guard.grant_credits("org_1", 10, reason="weekly", expires_at=later(days=7))
    await guard.grant_credits("org_1", 10, reason="promo", priority=-1, expires_at=later(days=90))
    await guard.grant_credits("org_1", 10, reason="pack 2")
    # Spending order: promo (priority -1), weekly, monthly, pack, pack 2.
    assert [reason for reason, _ in await remaining(guard)] == ["promo", "weekly", "monthly", "pack", "pack 2"]
    result = await guard.deduct_credits("org_1", VIDEO)  # 20: promo and weekly
    assert (result.success, result.remaining_credits) == (True, 30)
    # Live ones in spending order, then the spent ones, newest first.
    assert await remaining(guard) == [("monthly", 10), ("pack", 10), ("pack 2", 10), ("promo", 0), ("weekly", 0)]
    result = await guard.deduct_credits("org_1", IMAGE, units=3)  # 15: monthly, then 5 of pack
    assert result.remaining_credits == 15
    assert await remaining(guard) == [("pack", 5), ("pack 2", 10), ("promo", 0), ("weekly", 0), ("monthly", 0)]
    assert await guard.audit() == []


async def test_expired_credits_are_never_spendable_even_before_the_sweep(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 10, reason="trial", expires_at=later(hours=1))
    await guard.grant_credits("org_1", 3, reason="pack")
    assert await guard.get_balance("org_1") == 13
    travel(timedelta(hours=1, seconds=1))
    # No sweep has run: the charge, the balance and the check leave the expired 10 out.
    assert await guard.get_balance("org_1") == 3
    check = await guard.check_credits("org_1", IMAGE)
    assert (check.has_enough, check.available) == (False, 3)
    result = await guard.deduct_credits("org_1", IMAGE)
    assert (result.success, result.remaining_credits, result.error_code) == (False, 3, "insufficient_credits")
    assert await guard.audit() == []
    # The sweep writes them off: one expiry row, the books still exact.
    assert await guard.expire_grants() == 1
    assert await guard.expire_grants() == 0
    expiry = [row for row in await ledger_rows(guard, "org_1") if row["kind"] == "expiry"]
    assert [(row["amount"], row["balance_after"]) for row in expiry] == [(-10, 3)]
    assert await remaining(guard) == [("pack", 3), ("trial", 0)]
    assert await guard.get_balance("org_1") == 3
    assert await guard.audit() == []


async def test_the_instant_of_expiry_is_already_too_late(guard: CreditGuard) -> None:
    expires = later(minutes=5)
    await guard.grant_credits("org_1", 5, expires_at=expires)
    travel(expires - utcnow())
    assert (await guard.deduct_credits("org_1", IMAGE)).success is False


async def test_a_refund_goes_back_to_the_grants_the_charge_drew_from(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 3, reason="promo", priority=-1)
    await guard.grant_credits("org_1", 10, reason="pack")
    charge = await guard.deduct_credits("org_1", IMAGE)  # 3 from promo, 2 from pack
    assert await remaining(guard) == [("pack", 8), ("promo", 0)]
    refund = await guard.refund_credits(charge.charge_id or 0)
    assert (refund.refunded, refund.credits_refunded, refund.remaining_credits) == (True, 5, 13)
    assert await remaining(guard) == [("promo", 3), ("pack", 10)]
    assert await guard.audit() == []


async def test_a_partial_refund_gives_back_the_last_drawn_first(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 3, reason="promo", priority=-1)
    await guard.grant_credits("org_1", 10, reason="pack")
    held = await guard.deduct_credits("org_1", VIDEO, hold=True)  # 3 promo + 17 pack... short
    assert held.success is False
    held = await guard.deduct_credits("org_1", IMAGE, units=2, hold=True)  # 10: 3 promo + 7 pack
    assert await guard.settle_charge(held.charge_id or 0, used_credits=6) == (4, 0)
    assert await remaining(guard) == [("pack", 7), ("promo", 0)]  # the 4 went back to pack
    assert await guard.audit() == []


async def test_a_refund_landing_on_an_expired_grant_is_expired_with_it(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 5, reason="trial", expires_at=later(minutes=10))
    await guard.grant_credits("org_1", 1, reason="pack")
    charge = await guard.deduct_credits("org_1", IMAGE)  # all 5 from the trial
    travel(timedelta(minutes=11))
    refund = await guard.refund_credits(charge.charge_id or 0)
    # Refunded to the trial grant, which has expired: not spendable, never resurrected.
    assert (refund.refunded, refund.remaining_credits) == (True, 1)
    assert await guard.get_balance("org_1") == 1
    assert (await guard.deduct_credits("org_1", IMAGE)).success is False
    assert await guard.expire_grants() == 1
    assert [row["amount"] for row in await ledger_rows(guard, "org_1") if row["kind"] == "expiry"] == [-5]
    assert await guard.audit() == []


async def test_overdraft_lets_the_balance_go_negative_to_the_limit_and_no_further(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 3)
    assert (await guard.deduct_credits("org_1", IMAGE)).success is False
    await guard.set_overdraft_limit("org_1", 10)
    first = await guard.deduct_credits("org_1", IMAGE)
    assert (first.success, first.remaining_credits) == (True, -2)
    second = await guard.deduct_credits("org_1", IMAGE)
    assert (second.success, second.remaining_credits) == (True, -7)
    third = await guard.deduct_credits("org_1", IMAGE)  # would be -12
    assert (third.success, third.remaining_credits) == (False, -7)
    assert await guard.get_overdraft("org_1") == (10, 7)
    # The limit cannot go below what is owed.
    with pytest.raises(ValueError, match="owes"):
        await guard.set_overdraft_limit("org_1", 6)
    # The next grant repays the debt first.
    assert await guard.grant_credits("org_1", 20, reason="top-up") == 13
    assert await guard.get_overdraft("org_1") == (10, 0)
    assert await remaining(guard) == [("top-up", 13), (None, 0)]
    # A refund of a charge that went into debt gives it back where it came from.
    await guard.refund_credits(second.charge_id or 0)
    assert await guard.get_balance("org_1") == 18
    await guard.set_overdraft_limit("org_1", 0)
    assert await guard.audit() == []


async def test_grant_arguments_are_checked_precisely(guard: CreditGuard) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await guard.grant_credits("org_1", 5, expires_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="has passed"):
        await guard.grant_credits("org_1", 5, expires_at=utcnow() - timedelta(seconds=1))
    with pytest.raises(ValueError, match="priority"):
        await guard.grant_credits("org_1", 5, priority=2**40)
    with pytest.raises(ValueError, match="overdraft limit"):
        await guard.set_overdraft_limit("org_1", -1)
    assert await guard.list_grants("org_1") == []
    assert await guard.audit() == []


async def test_expiry_in_another_timezone_is_the_same_instant(guard: CreditGuard) -> None:
    tokyo = timezone(timedelta(hours=9))
    expires = (utcnow() + timedelta(hours=2)).astimezone(tokyo)
    await guard.grant_credits("org_1", 5, expires_at=expires)
    [grant] = await guard.list_grants("org_1")
    assert grant.expires_at is not None
    assert abs(grant.expires_at - expires) < timedelta(milliseconds=1)
    assert grant.expires_at.tzinfo is not None and grant.expires_at.utcoffset() == timedelta(0)
    assert grant.expires_at.tzinfo in (UTC, UTC) or grant.expires_at.utcoffset() == timedelta(0)


async def test_expiry_fires_its_hooks_and_the_low_balance_hook(db_url: str) -> None:
    from .conftest import fresh_tables

    await fresh_tables(db_url)
    async with CreditGuard(db_url, low_balance_threshold=5) as guard:
        expired: list[GrantExpiredEvent] = []
        low: list[LowBalanceEvent] = []

        @guard.on_grant_expired
        async def _expired(event: GrantExpiredEvent) -> None:
            expired.append(event)

        @guard.on_low_balance
        async def _low(event: LowBalanceEvent) -> None:
            low.append(event)

        await guard.grant_credits("org_1", 8, expires_at=later(minutes=1))
        await guard.grant_credits("org_1", 2)
        travel(timedelta(minutes=2))
        assert await guard.expire_grants() == 1
        await guard.flush()
        assert [(e.organization_id, e.credits, e.balance) for e in expired] == [("org_1", 8, 2)]
        assert [(e.organization_id, e.balance, e.threshold, e.feature_key) for e in low] == [("org_1", 2, 5, None)]


async def test_the_keepers_sweep_expires_grants(db_url: str) -> None:
    from .conftest import fresh_tables

    await fresh_tables(db_url)
    async with CreditGuard(db_url) as guard:
        await guard.grant_credits("org_1", 4, expires_at=later(minutes=1))
        travel(timedelta(minutes=2))
        await guard.release_expired_holds()
        assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "expiry"]
        assert await guard.audit() == []


async def test_an_idempotent_grant_keeps_its_expiry_and_grants_once(guard: CreditGuard) -> None:
    expires = later(days=30)
    for _ in range(3):
        assert await guard.grant_credits("org_1", 7, expires_at=expires, idempotency_key="evt_1") == 7
    assert [(g.amount, g.remaining) for g in await guard.list_grants("org_1")] == [(7, 7)]
    assert await guard.audit() == []


async def test_three_hundred_concurrent_charges_across_grants_leave_exact_grants(db_url: str) -> None:
    """Two guards (two pools, batches on PostgreSQL) charge one organization whose credits
    lie in four grants: exactly as many succeed as the grants fund, each grant ends exactly
    where the spending order puts it, none below zero, and the books balance."""
    import asyncio

    from .conftest import fresh_tables

    await fresh_tables(db_url)
    async with CreditGuard(db_url) as one, CreditGuard(db_url) as two:
        await one.grant_credits("org_1", 97, reason="promo", priority=-1)
        await one.grant_credits("org_1", 101, reason="weekly", expires_at=later(days=7))
        await one.grant_credits("org_1", 103, reason="pack")
        await one.grant_credits("org_1", 500, reason="pack 2")  # 801 in all: 160 charges of 5
        results = await asyncio.gather(
            *(
                (one if i % 2 else two).deduct_credits("org_1", IMAGE, hold=bool(i % 3), user_id=f"u{i}")
                for i in range(300)
            )
        )
        assert sum(r.success for r in results) == 160
        assert sorted(r.remaining_credits for r in results if r.success) == list(range(1, 801, 5))
        assert await one.get_balance("org_1") == 1
        grants = {g.reason: g.remaining for g in await one.list_grants("org_1")}
        assert grants == {"promo": 0, "weekly": 0, "pack": 0, "pack 2": 1}
        await one.flush()
        await two.flush()
        assert await one.audit() == []


async def test_expiry_writes_off_every_organization_each_in_its_own_transaction(guard: CreditGuard) -> None:
    for i in range(5):
        await guard.grant_credits(f"org_{i}", 10 + i, expires_at=later(minutes=1))
        await guard.grant_credits(f"org_{i}", 1)
    travel(timedelta(minutes=2))
    assert await guard.expire_grants() == 5
    assert [await guard.get_balance(f"org_{i}") for i in range(5)] == [1] * 5
    rows = [row for row in await ledger_rows(guard) if row["kind"] == "expiry"]
    assert sorted((row["organization_id"], row["amount"]) for row in rows) == [
        (f"org_{i}", -(10 + i)) for i in range(5)
    ]
    assert await guard.expire_grants() == 0
    assert await guard.audit() == []
