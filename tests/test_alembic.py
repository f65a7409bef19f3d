"""credit_guard's tables inside an application's own Alembic environment, on both databases.

Autogenerate compares ``target_metadata`` with the live database, so these tests prove
two things docs/alembic.md promises: the public ``metadata`` describes exactly the tables
``create_schema()`` builds (no drift either way), and the recipe in the docs (a list of
metadatas, or an ``include_name`` filter) generates, applies and leaves alone what it says.
Each PostgreSQL test gets a throwaway database so an empty schema really is empty.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, text
from sqlalchemy.engine import make_url

from credit_guard import CreditGuard
from credit_guard.schema import TABLE_PREFIX
from credit_guard.schema import metadata as credit_guard_metadata

from .conftest import PG_URL, pg_problem
from .helpers import ROOT

TABLES = {
    "credit_guard_accounts",
    "credit_guard_feature_pricing",
    "credit_guard_ledger",
    "credit_guard_idempotency_keys",
    "credit_guard_holds",
    "credit_guard_grants",
    "credit_guard_grant_moves",
    "credit_guard_reservations",
    "credit_guard_plans",
    "credit_guard_subscriptions",
    "credit_guard_outbox",
    "credit_guard_balance_alerts",
    "credit_guard_auto_topups",
    "credit_guard_member_limits",
}
INDEXES = {
    "ix_credit_guard_grants_organization_id",
    "ix_credit_guard_grants_expires_at",
    "ix_credit_guard_grant_moves_grant_id",
    "ix_credit_guard_ledger_org_created",
    "ix_credit_guard_ledger_feature_created",
    "ix_credit_guard_idempotency_keys_charge_id",
    "ix_credit_guard_idempotency_keys_expires_at",
    "ix_credit_guard_subscriptions_renews_at",
    "ix_credit_guard_outbox_next_attempt_at",
}

APP_MODELS = """
from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()
widgets = Table("widgets", metadata, Column("id", Integer, primary_key=True), Column("name", String(50)))
"""

# The env.py of docs/alembic.md, trimmed to the online mode a test runs.
ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

from app_models import metadata as app_metadata
from credit_guard.schema import metadata as credit_guard_metadata

config = context.config
target_metadata = [app_metadata, credit_guard_metadata]

connectable = engine_from_config(
    config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
"""


class Db:
    """One empty database seen through a sync driver (Alembic) and the library's async one."""

    def __init__(self, sync_url: str, async_url: str) -> None:
        self.sync_url = sync_url
        self.async_url = async_url

    def diffs(self, target: Any, **opts: Any) -> list[Any]:
        engine = create_engine(self.sync_url)
        try:
            with engine.connect() as conn:
                return list(compare_metadata(MigrationContext.configure(conn, opts=opts), target))
        finally:
            engine.dispose()

    def create_schema(self) -> None:
        async def go() -> None:
            async with CreditGuard(self.async_url) as guard:
                await guard.create_schema()

        anyio.run(go)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        yield Db(f"sqlite:///{tmp_path / 'app.db'}", f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
        return
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    base = make_url(PG_URL)
    name = f"{base.database}_alembic"
    admin = create_engine(base.set(drivername="postgresql+psycopg", database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield Db(
            base.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False),
            base.set(database=name).render_as_string(hide_password=False),
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def ops(diffs: list[Any]) -> set[tuple[str, str]]:
    return {(diff[0], diff[1].name) for diff in diffs}


def test_autogenerate_on_an_empty_database_adds_every_table(db: Db) -> None:
    assert ops(db.diffs(credit_guard_metadata)) == {("add_table", t) for t in TABLES} | {
        ("add_index", i) for i in INDEXES
    }


def test_after_create_schema_autogenerate_finds_no_difference(db: Db) -> None:
    db.create_schema()
    assert db.diffs(credit_guard_metadata) == []


def test_an_app_that_leaves_the_tables_out_must_filter_them_or_alembic_drops_them(db: Db) -> None:
    """The ``credit-guard init`` path: without the docs' include_name filter, the app's
    next autogenerate would emit DROP TABLE for the credit tables."""
    db.create_schema()
    app = MetaData()
    Table("widgets", app, Column("id", Integer, primary_key=True), Column("name", String(50)))
    assert {("remove_table", t) for t in TABLES} <= ops(db.diffs(app))

    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        return not (type_ == "table" and (name or "").startswith(TABLE_PREFIX))

    assert ops(db.diffs(app, include_name=include_name)) == {("add_table", "widgets")}


def test_documented_env_generates_and_applies_a_migration_the_library_can_use(
    db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "app_models.py").write_text(APP_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("app_models", None))
    config = Config(str(tmp_path / "alembic.ini"))
    command.init(config, str(tmp_path / "migrations"))
    (tmp_path / "migrations" / "env.py").write_text(textwrap.dedent(ENV_PY))
    config.set_main_option("script_location", str(tmp_path / "migrations"))
    config.set_main_option("sqlalchemy.url", db.sync_url.replace("%", "%%"))

    command.revision(config, message="initial", autogenerate=True)
    [migration] = (tmp_path / "migrations" / "versions").glob("*.py")
    source = migration.read_text()
    for table in (*TABLES, "widgets"):
        assert f"op.create_table('{table}'" in source or f'op.create_table("{table}"' in source

    command.upgrade(config, "head")
    app_metadata = importlib.import_module("app_models").metadata
    assert db.diffs([app_metadata, credit_guard_metadata]) == []

    async def use_the_tables() -> tuple[int, int, list[Any]]:
        async with CreditGuard(db.async_url) as guard:
            await guard.create_schema()  # a no-op on tables Alembic made
            await guard.create_pricing(feature_key="ping", feature_name="Ping", category="c", credits=3)
            await guard.grant_credits("org_1", 10)
            result = await guard.deduct_credits("org_1", "ping")
            assert result.charge_id is not None
            refund = await guard.refund_credits(result.charge_id)
            assert refund.refunded
            again = await guard.refund_credits(result.charge_id)
            return await guard.get_balance("org_1"), int(again.refunded), await guard.audit()

    assert anyio.run(use_the_tables) == (10, 0, [])


#: What docs/alembic.md tells an app that created its tables before grants had idempotency keys.
GRANT_KEY_COLUMN = "idempotency_key"
GRANT_KEY_UNIQUE = "uq_credit_guard_ledger_organization_id_idempotency_key"


def documented_upgrade(mentioning: str) -> Any:
    """The ``upgrade()`` of docs/alembic.md whose code mentions ``mentioning``, as written
    there, run the way Alembic runs a migration file."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "alembic.md").read_text(), re.S | re.M)
    [code] = [block for block in blocks if "def upgrade" in block and mentioning in block]

    def run(op: Any) -> None:
        from alembic.operations import Operations

        namespace: dict[str, Any] = {}
        with Operations.context(op.migration_context):  # what `from alembic import op` reaches, as in a migration
            exec(compile(code, "docs/alembic.md", "exec"), namespace)
            namespace["upgrade"]()

    return run


def _migrate(db: Db, steps: Any) -> None:
    from alembic.operations import Operations

    engine = create_engine(db.sync_url)
    try:
        with engine.begin() as conn:
            steps(Operations(MigrationContext.configure(conn)))
    finally:
        engine.dispose()


def test_upgrading_tables_made_before_grant_keys_keeps_every_balance(db: Db) -> None:
    """Tables of the previous version (a ledger without ``idempotency_key``) holding money:
    autogenerate finds exactly the new column and its unique constraint, the documented
    batch migration adds them, and every balance and ledger row is kept."""

    async def before() -> None:
        async with CreditGuard(db.async_url) as guard:
            await guard.create_schema()
            await guard.create_pricing(feature_key="ping", feature_name="Ping", category="c", credits=3)
            await guard.grant_credits("org_1", 10)
            assert (await guard.deduct_credits("org_1", "ping")).success

    anyio.run(before)

    def downgrade(op: Any) -> None:  # back to the previous version's ledger
        with op.batch_alter_table("credit_guard_ledger") as batch:
            batch.drop_constraint(GRANT_KEY_UNIQUE, type_="unique")
            batch.drop_column(GRANT_KEY_COLUMN)

    _migrate(db, downgrade)
    found = db.diffs(credit_guard_metadata)
    assert sorted(diff[0] for diff in found) == ["add_column", "add_constraint"]

    upgrade = documented_upgrade("idempotency_key")  # the migration docs/alembic.md shows, run as written

    _migrate(db, upgrade)
    assert db.diffs(credit_guard_metadata) == []

    async def after() -> tuple[int, int, list[Any]]:
        async with CreditGuard(db.async_url) as guard:
            assert await guard.get_balance("org_1") == 7
            for _ in range(2):
                await guard.grant_credits("org_1", 5, idempotency_key="stripe-evt-1")
            return await guard.get_balance("org_1"), len(await guard.open_holds()), await guard.audit()

    assert anyio.run(after) == (12, 0, [])


def test_upgrading_tables_made_before_grants_keeps_every_balance_as_a_grant(db: Db) -> None:
    """Tables of the previous version (no grants, a non-negative balance CHECK, a ledger
    without 'expiry') holding money: the documented migration adds the three tables,
    relaxes the two CHECKs, and ``create_schema()`` turns each balance into one
    never-expiring grant; then charges, refunds, expiry and overdraft all work."""

    from credit_guard._clock import reset_travel, travel

    async def before() -> None:
        async with CreditGuard(db.async_url) as guard:
            await guard.create_schema()
            await guard.create_pricing(feature_key="ping", feature_name="Ping", category="c", credits=3)
            await guard.grant_credits("org_1", 10)
            assert (await guard.deduct_credits("org_1", "ping")).success

    anyio.run(before)

    def downgrade(op: Any) -> None:  # back to the previous version: no grants, the old checks
        for table in ("credit_guard_grant_moves", "credit_guard_grants", "credit_guard_reservations"):
            op.drop_table(table)
        with op.batch_alter_table("credit_guard_accounts") as batch:
            batch.create_check_constraint("ck_credit_guard_accounts_balance_non_negative", "balance >= 0")
        with op.batch_alter_table("credit_guard_ledger") as batch:
            batch.drop_constraint("ck_credit_guard_ledger_kind_known", type_="check")
            batch.create_check_constraint("ck_credit_guard_ledger_kind_known", "kind IN ('grant', 'charge', 'refund')")
            batch.create_check_constraint("ck_credit_guard_ledger_balance_after_non_negative", "balance_after >= 0")

    _migrate(db, downgrade)
    assert sorted(diff[0] for diff in db.diffs(credit_guard_metadata)) == ["add_index"] * 3 + ["add_table"] * 3

    upgrade = documented_upgrade(
        "grant_moves, grants, reservations"
    )  # the migration docs/alembic.md shows, run as written

    _migrate(db, upgrade)
    assert db.diffs(credit_guard_metadata) == []

    async def after() -> tuple[Any, ...]:
        async with CreditGuard(db.async_url) as guard:
            await guard.create_schema()  # the opening grants (once: a second call finds none)
            await guard.create_schema()
            opening = [(g.amount, g.remaining, g.expires_at, g.reason) for g in await guard.list_grants("org_1")]
            charge = await guard.deduct_credits("org_1", "ping")
            assert (await guard.refund_credits(charge.charge_id or 0)).refunded
            await guard.set_overdraft_limit("org_1", 5)
            spent = [(await guard.deduct_credits("org_1", "ping")).remaining_credits for _ in range(4)]
            assert await guard.grant_credits("org_1", 10) == 5  # repays the 5 owed first
            await guard.grant_credits("org_1", 4, expires_at=datetime.now(UTC) + timedelta(minutes=1))
            travel(timedelta(minutes=2))
            try:
                expired = await guard.expire_grants()
            finally:
                reset_travel()
            return opening, spent, expired, await guard.get_balance("org_1"), await guard.audit()

    opening, spent, expired, balance, issues = anyio.run(after)
    assert opening == [(7, 7, None, "balance before grants")]
    assert spent == [4, 1, -2, -5]  # down to the overdraft limit of 5
    assert (expired, balance, issues) == (1, 5, [])


def downgrade_pools(op: Any) -> None:
    """Back to the version before credit pools: no pool columns, no pool CHECKs."""
    with op.batch_alter_table("credit_guard_grants") as batch:
        batch.drop_constraint("ck_credit_guard_grants_overdraft_line_is_general", type_="check")
        batch.drop_constraint("ck_credit_guard_grants_pools_never_repay", type_="check")
        batch.drop_column("pool")
    for table in ("credit_guard_ledger", "credit_guard_feature_pricing"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("pool")
            batch.drop_column("pool_fallback")


def test_upgrading_to_credit_pools_keeps_every_balance_and_pools_work(db: Db) -> None:
    """Tables of the version before credit pools, holding money: autogenerate finds the
    five new columns, the documented migration adds them (and the two CHECKs); balances,
    grants and the overdraft line are kept, and pooled features then charge their pool."""

    async def before() -> None:
        async with CreditGuard(db.async_url) as guard:
            await guard.create_schema()
            await guard.create_pricing(feature_key="ping", feature_name="Ping", category="c", credits=3)
            await guard.grant_credits("org_1", 10)
            await guard.set_overdraft_limit("org_1", 5)
            assert (await guard.deduct_credits("org_1", "ping")).success

    anyio.run(before)
    _migrate(db, downgrade_pools)
    assert [diff[0] for diff in db.diffs(credit_guard_metadata)] == ["add_column"] * 5
    _migrate(db, documented_upgrade("pool_fallback"))
    assert db.diffs(credit_guard_metadata) == []

    async def after() -> tuple[Any, ...]:
        async with CreditGuard(db.async_url) as guard:
            old = await guard.get_feature_pricing("ping")
            await guard.create_pricing(feature_key="clip", feature_name="Clip", category="v", credits=4, pool="video")
            refused = await guard.deduct_credits("org_1", "clip")  # general credits are not the pool's
            await guard.grant_credits("org_1", 6, pool="video")
            clip = await guard.deduct_credits("org_1", "clip")
            return (
                (old.pool, old.pool_fallback) if old else None,
                refused.success,
                clip.remaining_credits,
                await guard.get_pool_balances("org_1"),
                await guard.audit(),
            )

    assert anyio.run(after) == ((None, False), False, 2, {None: 7, "video": 2}, [])


def test_upgrading_grants_made_before_repaid_keeps_each_repayment(db: Db) -> None:
    """Tables of the previous version (grants without ``repaid``, no ``remaining <= amount``
    CHECK) with a grant that repaid an overdraft: the documented migration adds the column,
    fills it from each grant's repayment move and adds the two CHECKs; then a refund of the
    charge the grant paid for goes back to that grant, and expires with it."""
    from credit_guard._clock import reset_travel, travel

    async def before() -> int:
        async with CreditGuard(db.async_url) as guard:
            await guard.create_schema()
            await guard.create_pricing(feature_key="ping", feature_name="Ping", category="c", credits=30)
            await guard.set_overdraft_limit("org_1", 50)
            charge = await guard.deduct_credits("org_1", "ping")
            assert charge.remaining_credits == -30
            soon = datetime.now(UTC) + timedelta(minutes=1)
            assert await guard.grant_credits("org_1", 40, reason="monthly", expires_at=soon) == 10
            return charge.charge_id or 0

    charge_id = anyio.run(before)

    def downgrade(op: Any) -> None:  # back to the previous version's grants
        downgrade_pools(op)
        with op.batch_alter_table("credit_guard_grants") as batch:
            batch.drop_constraint("ck_credit_guard_grants_remaining_at_most_amount", type_="check")
            batch.drop_constraint("ck_credit_guard_grants_repaid_non_negative", type_="check")
            batch.drop_column("repaid")

    _migrate(db, downgrade)
    assert [diff[0] for diff in db.diffs(credit_guard_metadata)] == ["add_column"] * 6  # repaid, 5 of pools

    # The migrations docs/alembic.md shows, run as written, in the order they came.
    _migrate(db, documented_upgrade("UPDATE credit_guard_grants SET repaid"))
    _migrate(db, documented_upgrade("pool_fallback"))
    assert db.diffs(credit_guard_metadata) == []

    async def after() -> tuple[Any, ...]:
        async with CreditGuard(db.async_url) as guard:
            first_audit = await guard.audit()
            refund = await guard.refund_credits(charge_id)
            travel(timedelta(minutes=2))
            try:
                await guard.expire_grants()
            finally:
                reset_travel()
            return first_audit, refund.remaining_credits, await guard.get_balance("org_1"), await guard.audit()

    # The refund's 30 go back to the grant that repaid them (40 left), which then expires.
    assert anyio.run(after) == ([], 40, 0, [])
