"""Fixtures shared by every test: each storage test runs on SQLite and on PostgreSQL.

PostgreSQL comes from $CREDIT_GUARD_TEST_POSTGRES_URL (default: the local server at
127.0.0.1:5432). Each run creates its OWN database on that server (``credit_guard_test_``
plus the pid and a random suffix; the URL's database is only where it connects to create
it) and drops it when the run ends, so two runs, or anything else on the same server,
never see each other's tables. When the server cannot be reached the PostgreSQL half is
skipped with the reason, unless $CREDIT_GUARD_REQUIRE_POSTGRES is set (CI sets it), in
which case the whole run fails: a green CI must never hide untested PostgreSQL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from credit_guard import CreditGuard

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
#: Where the run's database is created from (its own database name is only connected to).
PG_SERVER_URL = os.environ.get("CREDIT_GUARD_TEST_POSTGRES_URL", DEFAULT_PG_URL)
#: This run's own database: created by the first PostgreSQL test, dropped at the end.
PG_DATABASE = f"credit_guard_test_{os.getpid()}_{secrets.token_hex(4)}"
PG_URL = make_url(PG_SERVER_URL).set(database=PG_DATABASE).render_as_string(hide_password=False)
REQUIRE_PG = os.environ.get("CREDIT_GUARD_REQUIRE_POSTGRES", "") not in ("", "0")

PRICES = {
    "seedream_text_to_image": ("SeeDream Text to Image", "Image Generation", 5, True),
    "kling_image_to_video": ("Kling Image to Video", "Video Generation", 20, True),
    "retired_feature": ("Retired Feature", "Advanced Tools", 3, False),
}


def _probe_postgres() -> str | None:
    """None once this run's database exists, else why it could not be made."""
    import asyncpg

    from credit_guard._storage.postgres import asyncpg_dsn

    async def create() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(PG_SERVER_URL), timeout=3)
        try:
            await conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
        finally:
            await conn.close()

    try:
        # In a thread of its own: the first test to ask may be running on an event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, create()).result()
    except Exception as exc:  # any failure means "not usable", with its reason
        return f"PostgreSQL at {PG_SERVER_URL} unusable ({type(exc).__name__}: {exc})"
    global _PG_CREATED
    _PG_CREATED = True
    return None


_PG_PROBLEM: str | bool | None = False
_PG_CREATED = False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop this run's database (its connections too: a test killed mid-way leaves some)."""
    if not _PG_CREATED:
        return
    import asyncpg

    from credit_guard._storage.postgres import asyncpg_dsn

    async def drop() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(PG_SERVER_URL), timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)')
        finally:
            await conn.close()

    try:
        asyncio.run(drop())
    except Exception as exc:  # reported, never hidden: a leftover database is worth knowing about
        print(f"\ncould not drop the test database {PG_DATABASE}: {exc}")


def pg_problem() -> str | None:
    global _PG_PROBLEM
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _probe_postgres()
        if _PG_PROBLEM and REQUIRE_PG:
            pytest.exit(f"CREDIT_GUARD_REQUIRE_POSTGRES is set but {_PG_PROBLEM}", returncode=3)
    return _PG_PROBLEM  # type: ignore[return-value]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'credits.db'}"
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    return PG_URL


def kit_base_url(backend: str) -> str | None:
    """For credit_guard.testing's ``credit_guard_base_url`` override: None (a SQLite file)
    or this run's PostgreSQL database (each test then gets a schema of its own there)."""
    if backend == "sqlite":
        return None
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    return PG_URL


_PG_SCHEMA_FRESH = False


async def reset_postgres(guard: CreditGuard) -> None:
    """Empty credit_guard's tables; on the run's first call, rebuild them from the current
    schema (a server kept between runs may hold tables an older version created)."""
    global _PG_SCHEMA_FRESH
    if not _PG_SCHEMA_FRESH:
        from credit_guard.schema import metadata

        async with guard.engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
            await conn.run_sync(metadata.create_all)
        _PG_SCHEMA_FRESH = True
    from credit_guard.schema import metadata

    async with guard.engine.begin() as conn:
        tables = ", ".join(table.name for table in metadata.sorted_tables)
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


async def seed_prices(guard: CreditGuard) -> None:
    for key, (name, category, credits, active) in PRICES.items():
        await guard.create_pricing(
            feature_key=key, feature_name=name, category=category, credits=credits, is_active=active
        )


@pytest.fixture
async def guard(db_url: str) -> AsyncIterator[CreditGuard]:
    # The tables are emptied and priced BEFORE the guard starts: its keeper's first sweep
    # would otherwise race the TRUNCATE for the same tables (a deadlock PostgreSQL broke
    # by failing the setup, once, under load).
    g = CreditGuard(db_url)
    try:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)
        await seed_prices(g)
    except BaseException:
        await g.close()
        raise
    async with g:
        yield g


async def ledger_rows(guard: CreditGuard, organization_id: str | None = None) -> list[dict[str, object]]:
    """The ledger as plain dicts, oldest first: what tests compare before and after.

    Each row also says ``hold_expires_at``: the expiry of the charge's open hold (from
    ``credit_guard_holds``), None for a settled, refunded or non-charge row.
    """
    from sqlalchemy import select

    from credit_guard.schema import holds, ledger

    query = (
        select(ledger, holds.c.expires_at.label("hold_expires_at"))
        .select_from(ledger.outerjoin(holds, holds.c.charge_id == ledger.c.id))
        .order_by(ledger.c.id)
    )
    if organization_id is not None:
        query = query.where(ledger.c.organization_id == organization_id)
    async with guard.engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


async def fresh_tables(db_url: str) -> None:
    """The tables of ``db_url`` created if missing, emptied (PostgreSQL), and priced."""
    g = CreditGuard(db_url)
    try:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)
        await seed_prices(g)
    finally:
        await g.close()


@pytest.fixture
def fresh_db(db_url: str) -> str:
    """For sync tests (a CLI, a TestClient, a subprocess): ``db_url`` with fresh tables."""
    asyncio.run(fresh_tables(db_url))
    return db_url


async def topup_key(guard: CreditGuard, organization_id: str, crossing: int) -> str:
    """The idempotency key an auto top-up's ``crossing`` runs under (its line's id, stored)."""
    from sqlalchemy import select

    from credit_guard.schema import auto_topups

    async with guard.engine.connect() as conn:
        line = await conn.scalar(select(auto_topups.c.line_id).where(auto_topups.c.organization_id == organization_id))
    return f"auto-topup:{line}:{crossing}"
