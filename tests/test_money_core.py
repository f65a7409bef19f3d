"""Money that cannot lie: the reproductions of issue 19, each on SQLite and PostgreSQL.

Each test drives the real guard and reads real outcomes (balances, grants, ledger rows,
grant moves, ``audit()``): a refund after an overdraft repayment must not outlive the
grant that repaid it, a charge that waited for the account's lock past a grant's expiry
must not spend it, a constraint is the books' last line and never fails innocent charges,
and every way to the database ends within the timeout.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware
from credit_guard._clock import reset_travel, travel, utcnow
from credit_guard.errors import IntegrityViolation, StorageUnavailable
from credit_guard.schema import grant_moves, grants, ledger

from . import conftest
from .conftest import ledger_rows
from .helpers import OrgFromHeader, client

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"  # 5 credits


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    yield
    reset_travel()


@pytest.fixture
def schema_altered() -> Iterator[None]:
    """For a test that alters the tables: the next PostgreSQL test rebuilds them."""
    yield
    conftest._PG_SCHEMA_FRESH = False


def later(**delta: float) -> datetime:
    return utcnow() + timedelta(**delta)


async def moves_of(guard: CreditGuard, ledger_id: int) -> dict[int, int]:
    async with guard.engine.connect() as conn:
        rows = await conn.execute(
            select(grant_moves.c.grant_id, grant_moves.c.amount).where(grant_moves.c.ledger_id == ledger_id)
        )
        return {int(grant_id): int(amount) for grant_id, amount in rows}


async def grant_ids(guard: CreditGuard, org: str = "org_1") -> dict[str, int]:
    """Each grant's id by its reason ("overdraft" for the line)."""
    async with guard.engine.connect() as conn:
        rows = await conn.execute(select(grants.c.reason, grants.c.id).where(grants.c.organization_id == org))
        return {str(reason): int(grant_id) for reason, grant_id in rows}


# -- 1. a refund after an overdraft repayment ---------------------------------------------------


async def test_a_refund_after_a_repayment_goes_back_to_the_repaying_grant_and_expires_with_it(
    guard: CreditGuard,
) -> None:
    """Issue 19, item 1, step by step: the refund used to go back to the overdraft line,
    which never expires, so 50 credits outlived the grant that had paid for them."""
    await guard.create_pricing(feature_key="render_50", feature_name="Render", category="Video", credits=50)
    await guard.set_overdraft_limit("org_1", 100)
    charge = await guard.deduct_credits("org_1", "render_50", hold=True)
    assert (charge.success, charge.remaining_credits) == (True, -50)
    # The grant repays the 50 owed first: 50 of it is left to spend.
    assert await guard.grant_credits("org_1", 100, reason="monthly", expires_at=later(minutes=1)) == 50
    refund = await guard.refund_credits(charge.charge_id or 0)
    assert (refund.refunded, refund.credits_refunded, refund.remaining_credits) == (True, 50, 100)
    ids = await grant_ids(guard)
    # The line owes nothing and holds nothing; the 50 went back to the grant that paid them.
    assert await moves_of(guard, refund.refund_id or 0) == {ids["monthly"]: 50}
    assert await guard.get_overdraft("org_1") == (100, 0)
    assert [(g.reason, g.remaining) for g in await guard.list_grants("org_1")] == [("monthly", 100)]
    assert await guard.audit() == []

    travel(timedelta(minutes=2))
    assert await guard.expire_grants() == 1
    assert await guard.get_balance("org_1") == 0
    assert (await guard.check_credits("org_1", "render_50")).available == 0
    # What the line lends is all that is left: two charges of 50, then a 402.
    outcomes = [await guard.deduct_credits("org_1", "render_50") for _ in range(3)]
    assert [(r.success, r.remaining_credits) for r in outcomes] == [(True, -50), (True, -100), (False, -100)]
    assert await guard.audit() == []


async def test_a_refund_fills_the_debt_still_owed_before_going_back_to_repaying_grants(
    guard: CreditGuard,
) -> None:
    """The line takes back what it still owes; only the rest belongs to the repaying grant."""
    await guard.create_pricing(feature_key="render_30", feature_name="Render", category="Video", credits=30)
    await guard.set_overdraft_limit("org_1", 100)
    first = await guard.deduct_credits("org_1", "render_30")  # line -30
    await guard.grant_credits("org_1", 30, reason="repays", expires_at=later(minutes=1))  # line 0, grant 0 left
    second = await guard.deduct_credits("org_1", "render_30")  # line -30 again
    assert (first.success, second.success) == (True, True)
    refund = await guard.refund_credits(first.charge_id or 0)
    ids = await grant_ids(guard)
    # 30 back: the line owes 30 (the second charge), so it takes all of it; nothing to the grant.
    assert await moves_of(guard, refund.refund_id or 0) == {ids["overdraft"]: 30}
    assert await guard.get_overdraft("org_1") == (100, 0)
    refund = await guard.refund_credits(second.charge_id or 0)
    # The line owes nothing now: the second charge's 30 go to the grant that repaid 30.
    assert await moves_of(guard, refund.refund_id or 0) == {ids["repays"]: 30}
    assert [(g.reason, g.remaining) for g in await guard.list_grants("org_1")] == [("repays", 30)]
    travel(timedelta(minutes=2))
    await guard.expire_grants()
    assert await guard.get_balance("org_1") == 0
    assert await guard.audit() == []


@pytest.mark.usefixtures("schema_altered")
async def test_audit_reports_credits_that_outlive_their_grant(guard: CreditGuard) -> None:
    """The old rule's outcome, written by hand: the refund's move on the overdraft line
    instead of the grant that repaid it. Every sum still adds up, so only the invariant
    that no grant holds more than it was granted (the line: 0) sees it."""
    await guard.create_pricing(feature_key="render_50", feature_name="Render", category="Video", credits=50)
    await guard.set_overdraft_limit("org_1", 100)
    charge = await guard.deduct_credits("org_1", "render_50")
    await guard.grant_credits("org_1", 100, reason="monthly", expires_at=later(minutes=1))
    refund = await guard.refund_credits(charge.charge_id or 0)
    ids = await grant_ids(guard)
    async with guard.engine.begin() as conn:
        if guard.engine.dialect.name == "postgresql":
            await conn.execute(
                text("ALTER TABLE credit_guard_grants DROP CONSTRAINT ck_credit_guard_grants_remaining_at_most_amount")
            )
        else:
            await conn.execute(text("PRAGMA ignore_check_constraints = ON"))
        await conn.execute(
            update(grant_moves)
            .where(grant_moves.c.ledger_id == refund.refund_id, grant_moves.c.grant_id == ids["monthly"])
            .values(grant_id=ids["overdraft"])
        )
        await conn.execute(update(grants).where(grants.c.id == ids["monthly"]).values(remaining=50, repaid=50))
        await conn.execute(update(grants).where(grants.c.id == ids["overdraft"]).values(remaining=50))
    issues = await guard.audit()
    assert [(i.organization_id, i.problem) for i in issues] == [
        ("org_1", f"grant {ids['overdraft']} holds 50, more than its amount 0")
    ]


# -- 2. a charge that waits for the lock past a grant's expiry ----------------------------------


class LockHolder:
    """Another connection holding the account's lock (PostgreSQL: the row; SQLite: the
    file's write lock), as a long transaction of another process would."""

    def __init__(self, guard: CreditGuard, db_url: str) -> None:
        self.guard, self.db_url = guard, db_url
        self.sqlite: sqlite3.Connection | None = None
        self.pg: Any = None

    async def __aenter__(self) -> LockHolder:
        if self.guard.engine.dialect.name == "sqlite":
            self.sqlite = sqlite3.connect(make_url(self.db_url).database or "", isolation_level=None)
            self.sqlite.execute("BEGIN IMMEDIATE")
        else:
            conn = await self.guard.engine.connect()
            await conn.begin()
            await conn.execute(text("SELECT 1 FROM credit_guard_accounts WHERE organization_id = 'org_1' FOR UPDATE"))
            self.pg = conn
        return self

    async def release(self) -> None:
        if self.sqlite is not None:
            self.sqlite.execute("ROLLBACK")
            self.sqlite.close()
            self.sqlite = None
        elif self.pg is not None:
            conn, self.pg = self.pg, None
            await conn.rollback()
            await conn.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


@pytest.mark.parametrize("how", ["deduct", "reserve"])
async def test_a_charge_that_waited_for_the_lock_past_a_grants_expiry_does_not_spend_it(
    guard: CreditGuard, db_url: str, how: str
) -> None:
    """Issue 19, item 2: the charge starts before the trial expires, but the account is
    locked by another transaction until after; it must be judged when it is decided."""
    expiry = later(seconds=1.0)
    await guard.grant_credits("org_1", 10, reason="trial", expires_at=expiry)  # spent first, if live
    await guard.grant_credits("org_1", 5, reason="pack")
    async with LockHolder(guard, db_url) as holder:
        if how == "deduct":
            waiting = asyncio.ensure_future(guard.deduct_credits("org_1", IMAGE, hold=True))
        else:
            waiting = asyncio.ensure_future(guard.reserve("org_1", IMAGE, job_id="job-1", ttl=60))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it waits for the lock
        await asyncio.sleep(max(0.0, (expiry - utcnow()).total_seconds()) + 0.3)
        await holder.release()
        result = await asyncio.wait_for(waiting, 10)
    assert (result.success, result.credits_deducted) == (True, 5)
    ids = await grant_ids(guard)
    assert await moves_of(guard, result.charge_id or 0) == {ids["pack"]: -5}
    (charge,) = [row for row in await ledger_rows(guard, "org_1") if row["kind"] == "charge"]
    assert charge["created_at"].replace(tzinfo=None) >= expiry.replace(tzinfo=None)  # dated when decided
    trial = next(g for g in await guard.list_grants("org_1") if g.reason == "trial")
    assert trial.remaining == 10  # expired, never spent: the sweep writes it off
    assert await guard.audit() == []


# -- 3. charges racing refunds, settles, top-ups, expiry and overdraft changes ------------------


@pytest.mark.slow
async def test_charges_racing_refunds_expiry_and_overdraft_never_fail_or_draw_expired_credits(
    guard: CreditGuard,
) -> None:
    """Issue 19, item 3: 16 tasks charge (as holds) and refund or settle, while top-ups
    with short expiries, the expiry sweep and overdraft changes run beside them. Before,
    tens to hundreds of charges failed with a CHECK violation (a 503 for a whole batch)."""
    await guard.create_pricing(feature_key="step_7", feature_name="Step", category="Tools", credits=7)
    await guard.grant_credits("org_1", 3000)
    rng = random.Random(19)
    counts: Counter[str] = Counter()
    failures: list[BaseException] = []
    stop = time.monotonic() + 4

    async def customer() -> None:
        while time.monotonic() < stop:
            try:
                charged = await guard.deduct_credits("org_1", "step_7", hold=True)
                counts["charges"] += 1
                if not charged.success:
                    counts["refused"] += 1
                    await guard.grant_credits("org_1", 200)
                    continue
                choice = rng.random()
                if choice < 0.4:
                    assert (await guard.refund_credits(charged.charge_id or 0)).refunded
                    counts["refunds"] += 1
                elif choice < 0.7:
                    await guard.settle_charge(charged.charge_id or 0)
                    counts["settled"] += 1
                else:
                    used = rng.choice([0, 3, 7, 12])
                    await guard.settle_charge(charged.charge_id or 0, used_credits=used, max_overage_credits=5)
                    counts["settled at usage"] += 1
            except (StorageUnavailable, IntegrityViolation) as exc:
                failures.append(exc)

    async def operator() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(0.03)
            try:
                await guard.grant_credits("org_1", 150, expires_at=later(seconds=rng.uniform(0.05, 0.4)))
                await guard.expire_grants()
                try:
                    await guard.set_overdraft_limit("org_1", rng.choice([0, 40, 200]))
                except ValueError:
                    counts["limit below debt"] += 1
            except (StorageUnavailable, IntegrityViolation) as exc:
                failures.append(exc)

    await asyncio.gather(*(customer() for _ in range(16)), operator())
    await guard.flush()
    assert failures == []
    assert counts["charges"] > 300 and counts["refunds"] and counts["settled at usage"], counts
    assert await guard.audit() == []
    # No charge drew from a grant at or after the instant it expired.
    async with guard.engine.connect() as conn:
        late = (
            await conn.execute(
                select(ledger.c.id, grants.c.id)
                .select_from(
                    grant_moves.join(ledger, ledger.c.id == grant_moves.c.ledger_id).join(
                        grants, grants.c.id == grant_moves.c.grant_id
                    )
                )
                .where(
                    ledger.c.kind == "charge",
                    grant_moves.c.amount < 0,
                    grants.c.expires_at.isnot(None),
                    ledger.c.created_at >= grants.c.expires_at,
                )
            )
        ).all()
    assert late == []


@pytest.mark.usefixtures("schema_altered")
async def test_a_charge_that_breaks_a_constraint_fails_alone_in_its_batch(guard: CreditGuard) -> None:
    """A constraint the rules did not foresee (here one the test adds: no charge of the
    path /boom) rolls back the batch it was in; the others are decided again and pass."""
    await add_boom_constraint(guard)
    await guard.grant_credits("org_1", 1000)
    paths = ["/ok"] * 10 + ["/boom"] + ["/ok"] * 10
    results = await asyncio.gather(
        *(guard.deduct_credits("org_1", IMAGE, request_path=path) for path in paths), return_exceptions=True
    )
    failed = [path for path, result in zip(paths, results, strict=True) if isinstance(result, BaseException)]
    assert failed == ["/boom"]
    assert all(isinstance(r, IntegrityViolation) for r in results if isinstance(r, BaseException))
    assert await guard.get_balance("org_1") == 1000 - 20 * 5
    assert await guard.audit() == []


async def add_boom_constraint(guard: CreditGuard) -> None:
    """A constraint every charge of the path /boom breaks (a CHECK on PostgreSQL, a
    trigger that aborts on SQLite, which cannot add a CHECK to a table)."""
    async with guard.engine.begin() as conn:
        if guard.engine.dialect.name == "postgresql":
            await conn.execute(
                text(
                    "ALTER TABLE credit_guard_ledger ADD CONSTRAINT ck_test_no_boom"
                    " CHECK (request_path IS NULL OR request_path <> '/boom')"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE TRIGGER test_no_boom BEFORE INSERT ON credit_guard_ledger"
                    " WHEN NEW.request_path = '/boom' BEGIN SELECT RAISE(ABORT, 'no boom'); END"
                )
            )


# -- 4. every wait ends -------------------------------------------------------------------------


async def test_sqlite_binds_datetimes_itself_so_warnings_as_errors_change_nothing(guard: CreditGuard) -> None:
    """On Python 3.12+ sqlite3's default datetime adapter is deprecated; with warnings as
    errors (a common pytest setting) it raised inside the writer thread, which died and
    left every caller waiting. Every money call must work with them on."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await guard.grant_credits("org_1", 50, expires_at=later(days=1))
        charged = await asyncio.wait_for(guard.deduct_credits("org_1", IMAGE, hold=True), 10)
        assert charged.success
        await asyncio.wait_for(guard.settle_charge(charged.charge_id or 0, used_credits=3), 10)
        await asyncio.wait_for(guard.refund_credits(charged.charge_id or 0), 10)
        reserved = await asyncio.wait_for(guard.reserve("org_1", IMAGE, job_id="j", ttl=30), 10)
        await asyncio.wait_for(guard.capture("j", units=1), 10)
        assert reserved.success
        await asyncio.wait_for(guard.expire_grants(), 10)
        await asyncio.wait_for(guard.release_expired_holds(now=later(hours=1)), 10)
    assert await guard.audit() == []


class WriterKilled(BaseException):
    """What no write body catches: it ends the writer thread itself."""


# The killed thread's exception is reported by threading's hook, as it should be.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_sqlite_writer_fails_its_callers_within_the_timeout_and_is_started_again(
    tmp_path: Path,
) -> None:
    guard = CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'dead-writer.db'}", timeout=1.0)
    await guard.create_schema()
    async with guard:
        await guard.create_pricing(feature_key=IMAGE, feature_name="Image", category="Image", credits=5)
        await guard.grant_credits("org_1", 100)
        writer = guard.store.writer  # type: ignore[attr-defined]

        def kill(db: object) -> None:
            time.sleep(0.05)  # the charges below queue behind it
            raise WriterKilled

        killing = asyncio.ensure_future(writer.submit_raw(kill))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        waiting = [asyncio.ensure_future(guard.deduct_credits("org_1", IMAGE)) for _ in range(3)]
        results = await asyncio.gather(killing, *waiting, return_exceptions=True)
        assert time.monotonic() - started < 1.0 + 1.5  # the timeout, and a little
        assert isinstance(results[0], StorageUnavailable)
        for result in results[1:]:  # answered: charged by the new writer, or refused as unavailable
            assert isinstance(result, StorageUnavailable) or result.success, result
        charged = sum(1 for r in results[1:] if not isinstance(r, BaseException))
        # The writer is running again: the next charge goes through at once.
        after = await asyncio.wait_for(guard.deduct_credits("org_1", IMAGE), 2)
        assert after.success
        assert await guard.get_balance("org_1") == 100 - 5 * (charged + 1)
        assert await guard.audit() == []


@pytest.mark.usefixtures("schema_altered")
async def test_fail_open_never_serves_free_a_charge_the_database_refused(guard: CreditGuard) -> None:
    """``fail_open`` serves a request free while the database is DOWN. A constraint that
    refuses a charge is not an outage: the request gets a 500 problem, the handler does
    not run, nothing is charged."""
    ran: list[str] = []

    async def render(request: Request) -> JSONResponse:
        ran.append(request.url.path)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/boom", render, methods=["POST"]), Route("/ok", render, methods=["POST"])])
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"POST /boom": IMAGE, "POST /ok": IMAGE})
    app.add_middleware(OrgFromHeader)
    guard.fail_open = True
    await add_boom_constraint(guard)
    await guard.grant_credits("org_1", 100)
    async with client(app) as c:
        refused = await c.post("/boom", headers={"x-org": "org_1"})
        served = await c.post("/ok", headers={"x-org": "org_1"})
    assert refused.status_code == 500
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:credit-guard:problem:charge-refused-by-database"
    assert "x-credits-charged" not in refused.headers
    assert (served.status_code, served.headers["x-credits-remaining"]) == (200, "95")
    assert ran == ["/ok"]
    await guard.flush()
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge"]
    assert await guard.audit() == []


async def test_a_stuck_sqlite_writer_answers_its_waiting_callers_within_the_timeout(tmp_path: Path) -> None:
    """A writer stuck in one call (a disk that hangs) neither dies nor answers: its watchdog
    answers the writes waiting behind it as unavailable within the timeout and a little,
    and once it is unstuck the writer goes on."""
    guard = CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'stuck-writer.db'}", timeout=0.5)
    await guard.create_schema()
    async with guard:
        await guard.create_pricing(feature_key=IMAGE, feature_name="Image", category="Image", credits=5)
        await guard.grant_credits("org_1", 100)
        writer = guard.store.writer  # type: ignore[attr-defined]
        stuck = asyncio.ensure_future(writer.submit_raw(lambda db: time.sleep(3.0)))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await guard.deduct_credits("org_1", IMAGE)
        assert time.monotonic() - started < 0.5 + 1.0 + 0.6  # timeout, grace, the watchdog's step
        with pytest.raises(StorageUnavailable):
            await stuck
        await asyncio.sleep(3.2)  # unstuck
        assert (await asyncio.wait_for(guard.deduct_credits("org_1", IMAGE), 2)).success
        assert await guard.get_balance("org_1") == 95  # the charge answered as unavailable never ran
        assert await guard.audit() == []
