"""Charges decided together keep every guarantee of charges decided one by one.

PostgreSQL batches the charges that queue while others are in flight into one statement
(``_storage/batching.py``); SQLite commits every write waiting for its one writer in one
transaction (``_storage/sqlite.py``). Both: thousands of concurrent charges on one account
funded for a prime number of them succeed exactly that many times; charges of different
prices on one account are decided in arrival order; a write that fails in a batch fails
alone; a writer killed mid-batch loses nothing it answered and charges nothing twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from credit_guard import CreditGuard, DuplicateFeature
from credit_guard._storage.base import ChargeRequest
from credit_guard._storage.batching import ChargeBatcher
from credit_guard._storage.postgres import PostgresStore
from credit_guard._storage.sqlite import SqliteStore

from .conftest import PG_URL, fresh_tables, ledger_rows, pg_problem, reset_postgres, seed_prices

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"  # 5 credits
PRIME = 997


@pytest.fixture
async def pg_guard() -> AsyncIterator[CreditGuard]:
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    async with CreditGuard(PG_URL) as g:
        await g.create_schema()
        await reset_postgres(g)
        await seed_prices(g)
        yield g


@pytest.fixture
async def sqlite_guard(tmp_path: Path) -> AsyncIterator[CreditGuard]:
    async with CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'batch.db'}") as g:
        await g.create_schema()
        await seed_prices(g)
        yield g


async def test_thousands_of_concurrent_charges_on_one_account_succeed_exactly_as_often_as_it_is_funded(
    guard: CreditGuard,
) -> None:
    await guard.grant_credits("hot", PRIME * 5)
    outcomes: list[bool] = []

    async def charge() -> None:
        result = await guard.deduct_credits("hot", IMAGE, hold=True)
        outcomes.append(result.success)
        if result.success:
            assert result.remaining_credits is not None and result.remaining_credits >= 0
        else:
            assert result.error_code == "insufficient_credits" and result.remaining_credits == 0

    async with anyio.create_task_group() as tg:
        for _ in range(3000):
            tg.start_soon(charge)
    assert outcomes.count(True) == PRIME
    assert await guard.get_balance("hot") == 0
    rows = [row for row in await ledger_rows(guard, "hot") if row["kind"] == "charge"]
    assert len(rows) == PRIME and len({row["id"] for row in rows}) == PRIME
    assert sorted(row["balance_after"] for row in rows) == [5 * n for n in range(PRIME)]  # each one distinct
    assert len(await guard.open_holds("hot")) == PRIME
    assert await guard.audit() == []
    batcher = getattr(guard.store, "_batcher", None)
    if batcher is not None:  # PostgreSQL: the load really was decided in batches
        assert batcher.batches > 0 and batcher.batched > batcher.batches


async def test_a_batch_decides_charges_of_different_prices_in_arrival_order() -> None:
    """One by one, 5 then 20 then 5 on a balance of 12: the 20 is refused with 7 left, and
    the second 5 still fits. A batch must say exactly that."""
    decided: list[tuple[str, int]] = []
    balance = {"org": 12}

    async def one(request: ChargeRequest, claim: object) -> object:
        raise AssertionError("queued charges must go out as one batch")

    async def many(items: list[tuple[ChargeRequest, object]]) -> list[object]:
        from credit_guard._storage.base import ChargeOutcome

        out = []
        for r, _ in items:  # the rule the charge statement implements, stated plainly
            ok = r.credits <= balance["org"]
            balance["org"] -= r.credits if ok else 0
            decided.append((r.feature_key, balance["org"]))
            out.append(ChargeOutcome(1 if ok else None, balance["org"]))
        return out

    batcher = ChargeBatcher(one, many, max_in_flight=1)  # type: ignore[arg-type]
    batcher._in_flight = 1  # as if a statement were in flight: the next ones queue
    requests = [ChargeRequest("org", price, f"c{n}") for n, price in enumerate((5, 20, 5))]
    waiting = [asyncio.ensure_future(batcher.charge(r)) for r in requests]
    await asyncio.sleep(0)
    batcher._in_flight = 0
    batcher._launch()
    results = await asyncio.gather(*waiting)
    assert [r.charge_id is not None for r in results] == [True, False, True]
    assert [r.spendable for r in results] == [7, 7, 2]


async def test_the_batch_statement_decides_in_arrival_order_on_postgresql(pg_guard: CreditGuard) -> None:
    guard, store = pg_guard, pg_guard.store
    assert isinstance(store, PostgresStore)
    await guard.grant_credits("org_1", 12)
    await guard.grant_credits("org_2", 3)
    requests = [
        ChargeRequest("org_1", 5, IMAGE, "u", "POST", "/a"),
        ChargeRequest("org_2", 5, IMAGE, "u", "POST", "/b"),  # short
        ChargeRequest("org_1", 20, IMAGE, "u", "POST", "/c"),  # short: 7 left at its turn
        ChargeRequest("nobody", 1, IMAGE, "u", "POST", "/d"),  # no account
        ChargeRequest("org_1", 5, IMAGE, "u", "POST", "/e"),  # fits in what is left
    ]
    outcomes = await store._decide([(request, None) for request in requests])
    assert [(o.charge_id is not None, o.spendable) for o in outcomes] == [  # type: ignore[union-attr]
        (True, 7),
        (False, 3),
        (False, 7),
        (False, 0),
        (True, 2),
    ]
    assert (await guard.get_balance("org_1"), await guard.get_balance("org_2")) == (2, 3)
    charges = [row for row in await ledger_rows(guard) if row["kind"] == "charge"]
    assert [(row["request_path"], row["balance_after"]) for row in charges] == [("/a", 7), ("/e", 2)]
    assert await guard.audit() == []


async def test_a_grant_committed_while_the_charge_waited_for_the_lock_is_seen(pg_guard: CreditGuard) -> None:
    """The charge statement's snapshot predates its wait for the account lock, so a grant
    committed meanwhile is not in the grants it reads: it refuses, sees that the locked
    account no longer matches the grants it read (stale), and looks again: charged, not a 402.
    Without that second look this charge would be refused with credits in the account."""
    from sqlalchemy import select, text

    from credit_guard._storage.writes import grant_in
    from credit_guard.schema import accounts

    guard, store = pg_guard, pg_guard.store
    assert isinstance(store, PostgresStore)
    await guard.grant_credits("org_1", 2)
    async with guard.engine.connect() as conn:
        tx = await conn.begin()
        await conn.execute(select(accounts.c.balance).where(accounts.c.organization_id == "org_1").with_for_update())
        charging = asyncio.create_task(store.charge(ChargeRequest("org_1", 5, IMAGE, "u", "POST", "/a")))
        await asyncio.sleep(0.3)  # the statement has its snapshot and waits for the lock
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        )
        assert waiting == 1
        await conn.run_sync(lambda sync: grant_in(sync, "postgresql", "org_1", 10, "late", None))
        await tx.commit()
    outcome = await charging
    assert (outcome.charge_id is not None, outcome.spendable) == (True, 7)
    assert await guard.get_balance("org_1") == 7
    assert await guard.audit() == []


async def test_a_write_that_fails_inside_a_sqlite_batch_fails_alone(sqlite_guard: CreditGuard) -> None:
    guard = sqlite_guard
    assert isinstance(guard.store, SqliteStore)
    writer = guard.store.writer
    await guard.grant_credits("org_1", 1000)

    def broken(db: sqlite3.Connection) -> None:
        raise sqlite3.IntegrityError("a raw write that fails")

    async def charge() -> bool:
        return (await guard.deduct_credits("org_1", IMAGE)).success

    async def duplicate() -> None:
        await guard.create_pricing(feature_key=IMAGE, feature_name="Twin", category="X", credits=1)

    tasks = [charge() for _ in range(40)]
    results = await asyncio.gather(
        *tasks[:20], writer.submit_raw(broken), duplicate(), *tasks[20:], return_exceptions=True
    )
    charges = [r for n, r in enumerate(results) if n not in (20, 21)]
    assert charges == [True] * 40
    assert isinstance(results[20], sqlite3.IntegrityError)
    assert isinstance(results[21], DuplicateFeature)
    assert await guard.get_balance("org_1") == 1000 - 40 * 5
    assert await guard.audit() == []


@pytest.mark.slow
def test_a_sqlite_writer_killed_mid_batch_loses_nothing_it_answered_and_charges_nothing_twice(tmp_path: Path) -> None:
    fresh_db = f"sqlite+aiosqlite:///{tmp_path / 'killed.db'}"
    asyncio.run(fresh_tables(fresh_db))

    async def fund() -> None:
        async with CreditGuard(fresh_db) as guard:
            await guard.grant_credits("org_1", 10**9)

    anyio.run(fund)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from credit_guard import CreditGuard
        async def main():
            async with CreditGuard({fresh_db!r}) as guard:
                async def charge():
                    while True:
                        r = await guard.deduct_credits("org_1", "seedream_text_to_image", hold=True)
                        print(r.charge_id, flush=True)
                await asyncio.gather(*(charge() for _ in range(32)))
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    answered: list[int] = []
    deadline = time.monotonic() + 30
    while len(answered) < 3000 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip().isdigit():
            answered.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)  # mid-batch: the writer thread is always busy by now
    proc.wait()
    answered += [int(line) for line in proc.stdout.read().split() if line.isdigit()]
    assert len(answered) >= 3000

    async def books() -> None:
        async with CreditGuard(fresh_db, sweep=False) as guard:
            rows = await ledger_rows(guard, "org_1")
            charges = {row["id"] for row in rows if row["kind"] == "charge"}
            assert set(answered) <= charges  # every charge a caller was told of is in the ledger
            assert len(answered) == len(set(answered))  # and none was told twice
            assert await guard.audit() == []  # no batch half-written: balance == ledger
            assert await guard.get_balance("org_1") == 10**9 - 5 * len(charges)
            # Every charge is a hold of the dead process: the sweeper gives them all back, once.
            released = await guard.release_expired_holds(now=_far_future())
            assert released == len(charges)
            assert await guard.get_balance("org_1") == 10**9
            assert await guard.audit() == []

    anyio.run(books)
    assert Path(fresh_db.split("///", 1)[1]).exists()


def _far_future() -> object:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(days=1)
