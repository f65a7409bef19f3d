"""Cross-process pricing invalidation (LISTEN/NOTIFY): two guards on one PostgreSQL
database stand in for two worker processes. PostgreSQL only: SQLite has no NOTIFY, and
there a second process sees a change within its pricing TTL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest
from sqlalchemy import text

from credit_guard import CreditGuard
from credit_guard._notify import APPLICATION_NAME
from credit_guard.schema import feature_pricing

from .conftest import PG_URL, pg_problem, reset_postgres, seed_prices

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"
LONG_TTL = 3600.0  # far longer than any test: only an invalidation can refresh the cache


@pytest.fixture
def pg_url() -> str:
    """PostgreSQL or a skip with the reason (a failure when CREDIT_GUARD_REQUIRE_POSTGRES is set)."""
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    return PG_URL


@pytest.fixture
async def two_processes(pg_url: str) -> AsyncIterator[tuple[CreditGuard, CreditGuard]]:
    # B starts listening only once the seeding has committed: NOTIFY is delivered
    # asynchronously, so a seeding notification could otherwise reach B after a test had
    # cached a price and clear it, as if the test's own (silent) change had been announced.
    async with CreditGuard(PG_URL, pricing_ttl=LONG_TTL) as a:
        await a.create_schema()
        await reset_postgres(a)
        await seed_prices(a)
        async with CreditGuard(PG_URL, pricing_ttl=LONG_TTL) as b:
            yield a, b


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 15.0) -> bool:
    """Poll until ``check`` holds or ``within`` seconds pass; no fixed sleep decides the outcome."""
    with anyio.move_on_after(within):
        while True:
            if await check():
                return True
            await anyio.sleep(0.02)
    return False


async def credits_seen_by(guard: CreditGuard, key: str = IMAGE) -> int | None:
    pricing = await guard.get_feature_pricing(key)
    return None if pricing is None else pricing.credits


async def test_a_price_change_in_one_process_reaches_the_other_without_waiting_for_the_ttl(
    two_processes: tuple[CreditGuard, CreditGuard],
) -> None:
    a, b = two_processes
    await b.start()
    assert b.pricing.notifier is not None and b.pricing.notifier.listening
    assert await credits_seen_by(b) == 5  # now cached in B for an hour
    image = next(p for p in await a.list_pricing() if p.feature_key == IMAGE)

    await a.update_pricing(image.id, credits=7)
    assert await eventually(lambda: _equals(credits_seen_by(b), 7))
    assert b.pricing.notifier.received >= 1 and b.pricing.notifier.connects == 1  # by notification, not by a reconnect
    assert (await b.deduct_credits("org_x", IMAGE)).error_code == "insufficient_credits"  # charged at the new price
    await b.grant_credits("org_x", 10)
    assert (await b.deduct_credits("org_x", IMAGE)).credits_deducted == 7

    await a.update_pricing(image.id, is_active=False)
    assert await eventually(lambda: _equals(credits_seen_by(b), None))
    await a.delete_pricing(image.id)
    await a.create_pricing(feature_key=IMAGE, feature_name="Images v2", category="Image Generation", credits=9)
    assert await eventually(lambda: _equals(credits_seen_by(b), 9))


async def test_after_losing_its_connection_a_listener_forgets_every_cached_price(
    two_processes: tuple[CreditGuard, CreditGuard],
) -> None:
    """A change made while B was not listening was announced to no one; B must not keep the old price."""
    a, b = two_processes
    await b.start()
    assert b.pricing.notifier is not None and b.pricing.notifier.connects == 1
    assert await credits_seen_by(b) == 5
    # A write that sends no notification (raw SQL): B keeps the cached price, nothing told it.
    async with a.engine.begin() as conn:
        await conn.execute(feature_pricing.update().where(feature_pricing.c.feature_key == IMAGE).values(credits=11))
    assert await credits_seen_by(b) == 5
    # Then the listener's connection dies (B may notice at once, so nothing is asserted in between).
    async with a.engine.begin() as conn:
        killed = await conn.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :name AND datname = current_database() AND pid <> pg_backend_pid()"
            ),
            {"name": APPLICATION_NAME},
        )
    assert killed >= 1
    assert await eventually(lambda: _equals(credits_seen_by(b), 11))
    assert b.pricing.notifier.connects >= 2 and b.pricing.notifier.listening
    # And it listens again after the reconnect.
    image = next(p for p in await a.list_pricing() if p.feature_key == IMAGE)
    await a.update_pricing(image.id, credits=12)
    assert await eventually(lambda: _equals(credits_seen_by(b), 12))


async def test_a_guard_built_without_notify_keeps_its_cache_for_the_ttl(
    two_processes: tuple[CreditGuard, CreditGuard],
) -> None:
    """The switch for PgBouncer's transaction pooling: no listener, so the TTL alone bounds staleness."""
    a, b = two_processes
    async with CreditGuard(PG_URL, pricing_ttl=LONG_TTL, pricing_notify=False) as quiet:
        assert quiet.pricing.notifier is None
        await b.start()
        assert await credits_seen_by(quiet) == 5 and await credits_seen_by(b) == 5
        image = next(p for p in await a.list_pricing() if p.feature_key == IMAGE)
        await a.update_pricing(image.id, credits=8)
        # Once a listening guard has had the notification, the quiet one still serves its cache.
        assert await eventually(lambda: _equals(credits_seen_by(b), 8))
        assert await credits_seen_by(quiet) == 5


async def _equals(value: Awaitable[int | None], expected: int | None) -> bool:
    return await value == expected


async def test_a_bulk_change_too_big_for_one_notify_still_reaches_the_other_process(
    two_processes: tuple[CreditGuard, CreditGuard],
) -> None:
    """PostgreSQL refuses NOTIFY payloads of 8000 bytes; 200 long keys need several."""
    a, b = two_processes
    await b.start()
    assert await credits_seen_by(b) == 5
    rows = [
        {
            "feature_key": f"bulk_feature_number_{i:04d}_" + "x" * 30,
            "feature_name": "Bulk",
            "category": "Bulk",
            "credits": 1,
        }
        for i in range(200)
    ]
    rows.append({"feature_key": IMAGE, "feature_name": "SeeDream", "category": "Image Generation", "credits": 8})
    await a.import_pricing(rows, update_existing=True)
    assert await eventually(lambda: _equals(credits_seen_by(b), 8))
    assert b.pricing.notifier is not None and b.pricing.notifier.connects == 1  # by notification, not by a reconnect
