"""Property test: any sequence of grants, charges and refunds keeps the books exact.

Hypothesis drives the real guard (SQLite and PostgreSQL) through random interleavings of
grant / deduct / refund / repeated refund, and checks after every step that each balance
equals a plain-Python model of the rules and the sum of its ledger rows (``audit()``).
The model is the specification: a charge succeeds iff the balance covers the price, a
refund returns a charge's credits once and only once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from credit_guard import CreditGuard

from .conftest import PRICES, reset_postgres, seed_prices

T = TypeVar("T")
ORGS = st.sampled_from(["org_a", "org_b"])
# Amounts near the prices (5 and 20) so balances land on the edges: price - 1, price, price + 1.
AMOUNTS = st.one_of(st.sampled_from([1, 4, 5, 6, 15, 19, 20, 21]), st.integers(min_value=1, max_value=40))
FEATURES = st.sampled_from(sorted(PRICES))  # includes an inactive one: never charged


def books_machine(db_url: str, tmp_path: Path) -> type[RuleBasedStateMachine]:
    class Books(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.Runner()
            url = db_url
            if url.startswith("sqlite"):
                url = f"sqlite+aiosqlite:///{tmp_path / f'books-{uuid.uuid4().hex}.db'}"
            self.guard = CreditGuard(url)
            self.balances: dict[str, int] = {}
            self.charges: dict[int, tuple[str, int]] = {}  # charge id -> (org, credits)
            self.refunded: set[int] = set()

        def run(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
            return self.loop.run(work())

        @initialize()
        def books_start_empty(self) -> None:
            async def setup() -> None:
                await self.guard.create_schema()
                if self.guard.engine.dialect.name == "postgresql":
                    await reset_postgres(self.guard)
                await seed_prices(self.guard)

            self.run(setup)

        @rule(org=ORGS, amount=AMOUNTS)
        def grant(self, org: str, amount: int) -> None:
            balance = self.run(lambda: self.guard.grant_credits(org, amount))
            self.balances[org] = self.balances.get(org, 0) + amount
            assert balance == self.balances[org]

        @rule(org=ORGS, feature=FEATURES)
        def deduct(self, org: str, feature: str) -> None:
            result = self.run(lambda: self.guard.deduct_credits(org, feature))
            _, _, price, active = PRICES[feature]
            have = self.balances.get(org, 0)
            if not active:
                assert (result.success, result.error_code) == (False, "feature_inactive")
            elif have >= price:
                assert result.success and result.charge_id is not None
                assert result.remaining_credits == have - price
                self.balances[org] = have - price
                self.charges[result.charge_id] = (org, price)
            else:
                assert (result.success, result.error_code, result.remaining_credits) == (
                    False,
                    "insufficient_credits",
                    have,
                )

        @precondition(lambda self: bool(self.charges))
        @rule(data=st.data())
        def refund(self, data: st.DataObject) -> None:
            charge_id = data.draw(st.sampled_from(sorted(self.charges)))
            result = self.run(lambda: self.guard.refund_credits(charge_id))
            org, credits = self.charges[charge_id]
            if charge_id in self.refunded:
                assert (result.refunded, result.error) == (False, "already refunded")
            else:
                assert result.refunded and result.credits_refunded == credits
                self.refunded.add(charge_id)
                self.balances[org] += credits
                assert result.remaining_credits == self.balances[org]

        @invariant()
        def books_balance(self) -> None:
            async def read() -> tuple[dict[str, int], list[Any]]:
                return {org: await self.guard.get_balance(org) for org in ("org_a", "org_b")}, await self.guard.audit()

            balances, issues = self.run(read)
            assert issues == []
            assert balances == {org: self.balances.get(org, 0) for org in balances}

        def teardown(self) -> None:
            self.run(self.guard.close)
            self.loop.close()

    return Books


def test_any_interleaving_keeps_balances_equal_to_model_and_ledger(db_url: str, tmp_path: Path) -> None:
    run_state_machine_as_test(
        books_machine(db_url, tmp_path),
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
