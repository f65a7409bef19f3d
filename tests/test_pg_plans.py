"""PostgreSQL plans the charge statement once per connection (a generic plan), unless the
app turned named prepared statements off (PgBouncer) or chose its own setting.

The charge statement takes longer to plan than to run; with PostgreSQL's default plan
choice its one-charge arrays always looked cheaper to plan afresh (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import pytest

from credit_guard import CreditGuard

from .conftest import PG_URL, pg_problem, reset_postgres, seed_prices


@pytest.fixture(autouse=True)
def _postgres() -> None:
    problem = pg_problem()
    if problem:
        pytest.skip(problem)


async def _settings(**pool_kwargs: Any) -> tuple[str, str, int]:
    """(plan_cache_mode + enable_seqscan, application_name) of the charge pool's
    connections, and the balance after one charge of 5 made through that pool."""
    async with CreditGuard(PG_URL, asyncpg_pool_kwargs=pool_kwargs) as guard:
        await guard.create_schema()
        await reset_postgres(guard)
        await seed_prices(guard)
        await guard.grant_credits("org_plans", 100)
        await guard.deduct_credits("org_plans", "seedream_text_to_image")
        pool = await guard.store._get_pool()  # type: ignore[attr-defined]
        async with pool.acquire() as conn:
            mode = await conn.fetchval("SHOW plan_cache_mode") + " " + await conn.fetchval("SHOW enable_seqscan")
            name = await conn.fetchval("SHOW application_name")
        return mode, name, await guard.get_balance("org_plans")


@pytest.mark.anyio
async def test_the_charge_pool_plans_each_statement_once() -> None:
    # ... by an index, whatever the tables held when it was planned (an empty keys table
    # would otherwise be scanned whole by that connection's plan forever).
    mode, _, balance = await _settings()
    assert mode == "force_generic_plan off"
    assert balance == 100 - 5


@pytest.mark.anyio
async def test_without_named_statements_nothing_is_set() -> None:
    # Behind PgBouncer in transaction mode: no startup parameter it could refuse.
    mode, _, balance = await _settings(statement_cache_size=0)
    assert mode == "auto on"
    assert balance == 100 - 5


@pytest.mark.anyio
async def test_the_apps_own_server_settings_win_and_are_kept() -> None:
    settings = {"plan_cache_mode": "auto", "enable_seqscan": "on", "application_name": "billing"}
    mode, name, _ = await _settings(server_settings=settings)
    assert (mode, name) == ("auto on", "billing")
    mode, name, _ = await _settings(server_settings={"application_name": "billing"})
    assert (mode, name) == ("force_generic_plan off", "billing")
