"""Several processes at once, as ``uvicorn --workers 4`` runs an app: schema creation and
seeding at startup, the connections each process opens, and SQLite under load.

Real processes throughout (subprocesses and uvicorn), on both databases where storage is
involved; load comes from wrk over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from examples.demo import POOLED_PRICING, PRICING
from sqlalchemy.engine import make_url

from credit_guard import CreditGuard
from credit_guard._storage.postgres import asyncpg_dsn

from .conftest import PG_SERVER_URL, PG_URL, fresh_tables, ledger_rows, pg_problem
from .field_app import DB_ENV, FEATURE
from .helpers import ROOT, UvicornServer

pytestmark = pytest.mark.slow

WORKERS = 4


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with NO tables yet: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    name = f"{make_url(PG_URL).database}_{request.node.name.split('[')[0][-20:]}_{time.monotonic_ns() % 10**6}"
    server = asyncpg_dsn(PG_SERVER_URL)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_create_schema_from_four_processes_at_once_on_a_fresh_database(empty_db: str) -> None:
    """It used to crash workers on PostgreSQL (``duplicate key ... pg_type_typname_nsp_index``)."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from credit_guard import CreditGuard
        async def main():
            async with CreditGuard({empty_db!r}) as guard:
                await guard.create_schema()
        sys.stdin.read()  # everyone waits here, then all go at once
        asyncio.run(main())
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(WORKERS)
    ]
    time.sleep(1.0)  # every interpreter up and waiting
    for process in processes:
        assert process.stdin is not None
        process.stdin.close()
    errors = []
    for process in processes:
        assert process.stderr is not None
        errors.append(process.stderr.read().decode())
        process.wait(timeout=60)
    assert [process.returncode for process in processes] == [0] * WORKERS, "\n".join(errors)  # whole tracebacks

    async def check() -> None:
        async with CreditGuard(empty_db) as guard:
            await guard.grant_credits("org_1", 1)
            assert await guard.audit() == []

    anyio.run(check)


def test_four_workers_starting_the_example_on_a_fresh_database_seed_it_once(empty_db: str, tmp_path: Path) -> None:
    """The FastAPI example seeds prices and funds its demo orgs in every worker's lifespan:
    with grant idempotency keys, 4 workers fund each org once, and subscribe org_pro once."""
    env = {"CREDIT_GUARD_DATABASE_URL": empty_db}
    server = UvicornServer(
        "examples.fastapi_app.app:app", env, tmp_path / "uvicorn.log", workers=WORKERS, factory=False
    )
    with server.start(health="/api/features/pricing"):
        log = server.log()

    async def books() -> None:
        async with CreditGuard(empty_db) as guard:
            assert await guard.get_balance("org_demo") == 100
            assert await guard.get_balance("org_poor") == 3
            assert await guard.get_balance("org_pro") == 1000  # its Pro plan's first month, granted once
            assert await guard.get_pool_balances("org_studio") == {None: 10, "video": 50}
            assert [row["kind"] for row in await ledger_rows(guard)] == ["grant"] * 5
            assert len(await guard.list_pricing()) == len(PRICING) + len(POOLED_PRICING)
            assert [plan.plan_key for plan in await guard.list_plans()] == ["pro"]
            assert await guard.audit() == []

    anyio.run(books)
    assert "Traceback" not in log, log


def test_four_workers_take_a_redelivered_stripe_event_and_a_retried_job_completion_once(
    empty_db: str, tmp_path: Path
) -> None:
    """What Stripe and a video provider do: deliver the same event again while the first is
    still in flight, and call a completion twice. Under 4 real worker processes, 8 copies of
    one paid-checkout event grant its pack once, and 8 completions of one job capture once."""
    import concurrent.futures
    import hashlib
    import hmac
    import json

    import httpx

    session = {"payment_status": "paid", "metadata": {"organization_id": "org_demo", "credits": "250"}}
    event = {"id": "evt_twice", "object": "event", "type": "checkout.session.completed", "data": {"object": session}}
    payload = json.dumps(event).encode()
    stamp = int(time.time())
    mac = hmac.new(b"whsec_demo", f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    rich = {"X-API-Key": "demo-key-rich"}
    server = UvicornServer(
        "examples.fastapi_app.app:app",
        {"CREDIT_GUARD_DATABASE_URL": empty_db},
        tmp_path / "uvicorn.log",
        workers=WORKERS,
        factory=False,
    )
    with server.start(health="/api/features/pricing"):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            webhook = [
                pool.submit(
                    httpx.post,
                    server.base + "/webhooks/stripe",
                    content=payload,
                    headers={"Stripe-Signature": f"t={stamp},v1={mac}"},
                    timeout=30,
                )
                for _ in range(8)
            ]
            assert [f.result().status_code for f in webhook] == [200] * 8
            started = httpx.post(
                server.base + "/v1/videos", json={"image_url": "https://e.x/a.png", "seconds": 10}, headers=rich
            )
            assert (started.status_code, started.headers["x-credits-charged"]) == (202, "40")
            job = started.json()["job_id"]
            done = [
                pool.submit(
                    httpx.post,
                    f"{server.base}/v1/videos/{job}/complete",
                    json={"status": "succeeded", "seconds_rendered": 5},
                    timeout=30,
                )
                for _ in range(8)
            ]
            answers = [f.result().json() for f in done]
        log = server.log()
    assert all(a["state"] == "captured" for a in answers), answers
    assert sorted(a["credits_refunded"] for a in answers) == [0] * 7 + [20]  # one close moved money

    async def books() -> None:
        async with CreditGuard(empty_db) as guard:
            rows = await ledger_rows(guard, "org_demo")
            assert [row["amount"] for row in rows if row["kind"] == "grant"] == [100, 250]
            assert [row["amount"] for row in rows if row["kind"] == "refund"] == [20]
            assert await guard.get_balance("org_demo") == 100 + 250 - 40 + 20
            assert await guard.open_holds() == []
            assert await guard.audit() == []

    anyio.run(books)
    assert "Traceback" not in log, log


# -- connections ------------------------------------------------------------------------------


def _pg_url() -> str:
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    return PG_URL


class ConnectionWatch:
    """Samples how many connections the run's database has (not counting itself) until stopped."""

    def __init__(self, db_url: str) -> None:
        self.dsn = asyncpg_dsn(db_url)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._watch()))

    async def _watch(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self._stop.is_set():
                count = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                self.peak = max(self.peak, int(count))
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_one_guard_never_opens_more_connections_than_its_budget() -> None:
    db_url = _pg_url()
    asyncio.run(fresh_tables(db_url))

    async def busy() -> tuple[int, int]:
        async with CreditGuard(db_url) as guard:  # the default budget: 12
            await guard.grant_credits("org_1", 10**6)

            async def work(n: int) -> None:
                charge = await guard.deduct_credits("org_1", FEATURE, hold=n % 2 == 0)
                assert charge.charge_id is not None
                if n % 3 == 0:
                    await guard.refund_credits(charge.charge_id)
                elif n % 2 == 0:
                    await guard.settle_charge(charge.charge_id)
                await guard.list_pricing()
                await guard.get_balance("org_1")

            for _ in range(3):
                async with anyio.create_task_group() as tg:
                    for n in range(200):
                        tg.start_soon(work, n)
            assert await guard.audit() == []
            return guard.connection_budget.total, len(await ledger_rows(guard))

    with ConnectionWatch(db_url) as watch:
        budget, rows = asyncio.run(busy())
    assert budget == 12
    assert rows > 600
    assert 2 <= watch.peak <= budget, watch.peak


def _wrk(url: str, *, connections: int, seconds: int) -> dict[str, int]:
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.fail("wrk is not installed (scripts/ci-system-deps installs it)")
    command = [wrk, "-t4", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s"]
    command += ["-s", str(ROOT / "benchmarks" / "orgs.lua"), url, "--", "rotate", "1000"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = re.search(r"WRK_JSON (\{.*\})", out)
    assert found is not None, out
    result: dict[str, int] = json.loads(found.group(1))
    return result


def _funded(db_url: str) -> None:
    async def fund() -> None:
        await fresh_tables(db_url)
        async with CreditGuard(db_url) as guard:
            for n in range(1000):
                await guard.grant_credits(f"org-{n}", 10**6)

    asyncio.run(fund())


def test_four_workers_under_load_stay_inside_four_budgets(tmp_path: Path) -> None:
    db_url = _pg_url()
    _funded(db_url)
    server = UvicornServer("tests.field_app:create_app", {DB_ENV: db_url}, tmp_path / "uvicorn.log", workers=WORKERS)
    with ConnectionWatch(db_url) as watch, server:
        result = _wrk(f"{server.base}/mw/fast", connections=64, seconds=3)
    assert result["non2xx"] == result["socket_errors"] == 0, (result, server.log())
    assert 4 <= watch.peak <= WORKERS * 12, watch.peak


# -- SQLite under several workers ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/dec/fast", "/mw/fast"])
def test_sqlite_under_four_workers_and_400_connections_fails_no_request(tmp_path: Path, path: str) -> None:
    """It used to answer 503 "database is locked" (and a p99 of 15 s): pooled connections of
    each process raced SQLite's unfair busy handler. Now each process has one writer."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'load.db'}"
    _funded(db_url)
    server = UvicornServer("tests.field_app:create_app", {DB_ENV: db_url}, tmp_path / "uvicorn.log", workers=WORKERS)
    with server:
        result = _wrk(f"{server.base}{path}", connections=400, seconds=4)
    assert result["non2xx"] == result["socket_errors"] == 0, (result, server.log())
    assert "database is locked" not in server.log()

    async def books() -> None:
        async with CreditGuard(db_url) as guard:
            rows = await ledger_rows(guard)
            paid = sum(row["kind"] == "charge" for row in rows) - sum(row["kind"] == "refund" for row in rows)
            # Every answer wrk counted was paid, once; the (at most 400) requests in flight
            # when wrk stopped were paid if they were delivered, else refunded.
            assert result["requests"] <= paid <= result["requests"] + 400
            assert {row["reason"] for row in rows if row["kind"] == "refund"} <= {"client disconnected"}
            assert await guard.open_holds() == []  # settled at shutdown
            assert await guard.audit() == []

    anyio.run(books)
