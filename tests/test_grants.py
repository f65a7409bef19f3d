"""Grants: once per idempotency key, whatever the concurrency or the number of processes
(a seeding step, a payment webhook delivered twice), and never past the balance maximum."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anyio
import pytest

from credit_guard import CreditGuard, IdempotencyKeyReused
from credit_guard.cli import main
from credit_guard.schema import MAX_BALANCE

from .conftest import ledger_rows

pytestmark = pytest.mark.anyio


async def test_the_same_key_grants_once_and_a_repeat_returns_the_current_balance(guard: CreditGuard) -> None:
    assert await guard.grant_credits("org_1", 100, reason="pack", idempotency_key="evt_1") == 100
    assert (await guard.deduct_credits("org_1", "seedream_text_to_image")).success
    assert await guard.grant_credits("org_1", 100, reason="pack", idempotency_key="evt_1") == 95
    # The key is scoped to the organization: another one may use the same words.
    assert await guard.grant_credits("org_2", 100, idempotency_key="evt_1") == 100
    assert await guard.grant_credits("org_1", 100, idempotency_key="evt_2") == 195
    rows = await ledger_rows(guard, "org_1")
    assert [(r["kind"], r["amount"], r["idempotency_key"]) for r in rows] == [
        ("grant", 100, "evt_1"),
        ("charge", -5, None),
        ("grant", 100, "evt_2"),
    ]
    assert await guard.audit() == []


async def test_a_key_reused_for_another_amount_is_refused_and_grants_nothing(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100, idempotency_key="evt_1")
    with pytest.raises(IdempotencyKeyReused):
        await guard.grant_credits("org_1", 50, idempotency_key="evt_1")
    with pytest.raises(ValueError, match="idempotency_key"):
        await guard.grant_credits("org_1", 50, idempotency_key="has space")
    assert await guard.get_balance("org_1") == 100


async def test_fifty_racing_grants_with_one_key_grant_once(guard: CreditGuard) -> None:
    balances: list[int] = []

    async def grant() -> None:
        balances.append(await guard.grant_credits("org_1", 7, idempotency_key="webhook-evt-42"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(grant)
    assert await guard.get_balance("org_1") == 7
    assert set(balances) == {7}
    assert [r["kind"] for r in await ledger_rows(guard)] == ["grant"]


def test_four_processes_granting_with_one_key_grant_once(fresh_db: str) -> None:
    """What 4 workers seeding at startup do: each its own process and connections."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from credit_guard import CreditGuard
        async def main():
            async with CreditGuard({fresh_db!r}) as guard:
                for n in range(10):
                    await guard.grant_credits("org_1", 3, idempotency_key=f"seed-{{n}}")
        asyncio.run(main())
        """
    )
    workers = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(4)]
    for worker in workers:
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err.decode()

    async def check() -> None:
        async with CreditGuard(fresh_db) as fresh:
            assert await fresh.get_balance("org_1") == 30
            assert len(await ledger_rows(fresh, "org_1")) == 10
            assert await fresh.audit() == []

    anyio.run(check)


async def test_a_grant_past_the_maximum_balance_is_a_value_error_and_writes_nothing(guard: CreditGuard) -> None:
    assert await guard.grant_credits("org_1", MAX_BALANCE - 1) == MAX_BALANCE - 1
    with pytest.raises(ValueError, match=f"past the maximum of {MAX_BALANCE}"):
        await guard.grant_credits("org_1", 2)
    assert await guard.grant_credits("org_1", 1) == MAX_BALANCE  # exactly the maximum is fine
    with pytest.raises(ValueError, match="positive integer up to"):
        await guard.grant_credits("org_2", MAX_BALANCE + 1)
    assert await guard.get_balance("org_1") == MAX_BALANCE
    assert len(await ledger_rows(guard, "org_1")) == 2
    assert await guard.audit() == []


def test_the_cli_says_the_maximum_in_one_line(fresh_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--database-url", fresh_db, "grant", "org_1"]
    assert main([*base, str(MAX_BALANCE)]) == 0
    capsys.readouterr()
    assert main([*base, "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"maximum of {MAX_BALANCE}" in err
    assert main([*base, str(2**53)]) == 2  # above any grant: a usage error, before any I/O
    assert main([*base, "5", "--idempotency-key", "k1"]) == 1  # still over the maximum
    capsys.readouterr()


def test_the_cli_grants_once_per_key(fresh_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        assert main(["--database-url", fresh_db, "grant", "org_1", "40", "--idempotency-key", "invoice-7"]) == 0
    assert "balance 40" in capsys.readouterr().out.splitlines()[-1]
