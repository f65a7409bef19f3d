"""Property test: any interleaving of the money calls keeps the books exact.

Hypothesis drives the real guard (SQLite and PostgreSQL) through random interleavings of
grant / deduct / refund / hold / settle (kept, or at a reported usage) / a request dying /
the sweeper releasing expired holds / idempotent deducts whose keys repeat, and checks
after every step that each balance equals a plain-Python model of the rules and the sum
of its ledger rows (``audit()``), and that the database's open holds and the guard's live
ones are exactly the model's. The model is the specification:

* a charge succeeds iff the balance covers ``ceil(price * units)``;
* a refund gives a charge's reserve back once and only once: any refund after a refund
  (asked for, of the unused reserve, or of an expired hold) is a no-op;
* a hold stays open until settled, refunded or swept; a sweep refunds every open hold that
  is not live in its process, each exactly once, and never a settled one;
* settling happens once: after a settle, refund or expiry it changes nothing; at a reported
  usage it refunds the unused part, or takes ``min(used - reserve, max_extra, balance)``;
* an idempotency key never charges twice while its charge stands (a repeat replays the
  first answer, another feature or units raise IdempotencyKeyReused); a full refund or an
  expired hold frees it, and so does its TTL.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from credit_guard import CreditGuard
from credit_guard._clock import utcnow
from credit_guard.errors import IdempotencyKeyReused
from credit_guard.schema import accounts

from .conftest import PRICES, reset_postgres, seed_prices

pytestmark = pytest.mark.slow

T = TypeVar("T")
ORG_IDS = ("org_a", "org_b")
ORGS = st.sampled_from(ORG_IDS)
# Amounts near the prices (5 and 20) so balances land on the edges: price - 1, price, price + 1.
AMOUNTS = st.one_of(st.sampled_from([1, 4, 5, 6, 15, 19, 20, 21]), st.integers(min_value=1, max_value=40))
FEATURES = st.sampled_from(sorted(PRICES))  # includes an inactive one: never charged
# Fractions are paid for whole: 1.5 units at 5 credits cost 8, half a unit at 5 costs 3.
# "1.0" is "1" spelt otherwise: a retry that spells it so is the same call, not a reuse.
UNITS = st.sampled_from(["1", "2", "0.5", "1.5", "1.0"])
# Two keys per organization: repeats (replays, and reuse for another call) happen often.
KEYS = st.sampled_from(["key-1", "key-2"])
# How a charge is taken: a plain charge, or a hold opened by this process or by one that dies.
HOW = st.sampled_from(["hold", "charge", "hold, then die"])
# How a hold is settled: as reserved, or at a usage below, at or above its reserve (the two
# that move money twice as often).
USAGE = st.sampled_from(["less", "more", "as reserved", "none", "all", "less", "more"])
# Surcharge caps: a few credits, more than any balance here (so the balance caps it), one, none.
MAX_EXTRA = st.sampled_from([5, 1000, 1, 0])
# The sweeper's injected clocks: past every hold's timeout (120 s) but inside the keys'
# TTL (24 h), so keys survive the sweep; or past the TTL too, which forgets every key.
PAST_HOLDS = timedelta(hours=1)
PAST_KEYS = timedelta(days=2)
SEED = 4  # reaches every branch of MUST_REACH (as 8 of 10 seeds tried do), and plenty of most
# Branches the runs must reach, or the machine proves less than it claims (a precondition
# that never holds, a strategy that never draws the edge). Deterministic: a fixed seed.
MUST_REACH = {
    "charged",
    "charged a hold",
    "charged a hold, then died",
    "charged with a key",
    "key claimed again after its refund",
    "key claimed again after its TTL",
    "insufficient",
    "replayed",
    "key reused for another call",
    "refunded",
    "refund no-op",
    "settled as reserved",
    "settle no-op",
    "usage: unused part refunded",
    "usage: surcharge",
    "swept",
    "sweep skipped a live hold",
}


@dataclass
class Charge:
    """What the model knows of one charge row."""

    org: str
    credits: int  # the reserve: ceil(price * units)
    hold: bool
    open: bool = False  # a hold not yet settled, refunded or swept
    live: bool = False  # in the main guard's holds.live (its request still running)
    refunded: bool = False  # a refund row exists: in full, of the unused reserve, or of an expired hold
    surcharge: int = 0  # taken when the hold was settled at a usage above its reserve


@dataclass(frozen=True)
class Claim:
    """A standing idempotency key: the call it names and the answer a repeat gets back."""

    feature: str
    units: str
    charge_id: int
    credits: int
    remaining: int


def cost(feature: str, units: str) -> int:
    return math.ceil(Decimal(PRICES[feature][2]) * Decimal(units))


def books_machine(db_url: str, tmp_path: Path, reached: Counter[str]) -> type[RuleBasedStateMachine]:
    class Books(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.Runner()
            url = db_url
            if url.startswith("sqlite"):
                url = f"sqlite+aiosqlite:///{tmp_path / f'books-{uuid.uuid4().hex}.db'}"
            # No background sweeper: only the `expire` rule releases holds, at the clock it
            # injects, so every step's outcome is decided by the model alone.
            self.guard = CreditGuard(url, sweep=False)
            # A process that dies right after opening its holds: they are live there, not in
            # self.guard, and nobody settles them.
            self.dead = CreditGuard(url, sweep=False, pricing_notify=False)
            self.balances: dict[str, int] = {}
            self.charges: dict[int, Charge] = {}
            self.keys: dict[tuple[str, str], Claim] = {}  # (org, key) -> its standing claim
            # (org, key) -> what freed it last, and the call it had named (which a late retry repeats)
            self.freed: dict[tuple[str, str], tuple[str, Claim]] = {}

        def run(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
            return self.loop.run(work())

        def open_holds(self) -> list[int]:
            return sorted(cid for cid, charge in self.charges.items() if charge.open)

        def refunded_in_full(self, charge_id: int) -> None:
            """A full refund (asked for, or by the sweeper): the reserve back, the hold closed,
            the key freed (the request counts as never having happened)."""
            charge = self.charges[charge_id]
            self.balances[charge.org] += charge.credits + charge.surcharge
            charge.refunded, charge.open, charge.live = True, False, False
            for org_key in [k for k, claim in self.keys.items() if claim.charge_id == charge_id]:
                self.freed[org_key] = ("refund", self.keys.pop(org_key))

        @initialize(start=st.tuples(st.integers(0, 100), st.integers(0, 100)))
        def books_open(self, start: tuple[int, int]) -> None:
            """Empty books, then a first top-up (or none) per organization: enough for holds
            and keys to get going, not so much that the balance edges never come up."""

            async def setup() -> None:
                await self.guard.create_schema()
                if self.guard.engine.dialect.name == "postgresql":
                    await reset_postgres(self.guard)
                await seed_prices(self.guard)
                for org, amount in zip(ORG_IDS, start, strict=True):
                    if amount:
                        await self.guard.grant_credits(org, amount)
                        self.balances[org] = amount

            self.run(setup)

        @rule(org=ORGS, amount=AMOUNTS)
        def grant(self, org: str, amount: int) -> None:
            balance = self.run(lambda: self.guard.grant_credits(org, amount))
            self.balances[org] = self.balances.get(org, 0) + amount
            assert balance == self.balances[org]

        def deduct_and_check(
            self, org: str, feature: str, units: str, *, key: str | None = None, hold: bool, dead: bool = False
        ) -> None:
            guard = self.dead if dead else self.guard

            async def deduct() -> Any:
                try:
                    return await guard.deduct_credits(org, feature, units=units, idempotency_key=key, hold=hold)
                except IdempotencyKeyReused as exc:
                    return exc

            result = self.run(deduct)
            active = PRICES[feature][3]
            have = self.balances.get(org, 0)
            price = cost(feature, units)
            claim = self.keys.get((org, key)) if key is not None else None
            reused = claim is not None and (claim.feature, Decimal(claim.units)) != (feature, Decimal(units))
            assert isinstance(result, IdempotencyKeyReused) == (active and reused), result
            if not active:
                assert (result.success, result.error_code) == (False, "feature_inactive")
            elif reused:
                reached["key reused for another call"] += 1
            elif claim is not None:
                # A repeat: the first call's answer, nothing charged, no new hold.
                assert (result.success, result.replayed) == (True, True)
                assert (result.charge_id, result.credits_deducted, result.remaining_credits) == (
                    claim.charge_id,
                    claim.credits,
                    claim.remaining,
                )
                reached["replayed"] += 1
            elif have >= price:
                assert result.success and not result.replayed and result.charge_id is not None
                assert result.charge_id not in self.charges
                assert (result.credits_deducted, result.remaining_credits) == (price, have - price)
                self.balances[org] = have - price
                self.charges[result.charge_id] = Charge(org, price, hold, open=hold, live=hold and not dead)
                if key is not None:
                    self.keys[(org, key)] = Claim(feature, units, result.charge_id, price, have - price)
                    reached["charged with a key"] += 1
                    if (org, key) in self.freed:
                        reached[f"key claimed again after its {self.freed.pop((org, key))[0]}"] += 1
                reached["charged a hold, then died" if dead else "charged a hold" if hold else "charged"] += 1
            else:
                # Nothing charged, and the key not claimed: a retry after a top-up may use it.
                assert (result.success, result.error_code, result.remaining_credits) == (
                    False,
                    "insufficient_credits",
                    have,
                )
                reached["insufficient"] += 1

        @rule(org=ORGS, feature=FEATURES, units=UNITS, how=HOW)
        def deduct(self, org: str, feature: str, units: str, how: str) -> None:
            self.deduct_and_check(org, feature, units, hold=how != "charge", dead=how == "hold, then die")

        @rule(org=ORGS, feature=FEATURES, units=UNITS, key=KEYS, how=HOW)
        def deduct_idempotent(self, org: str, feature: str, units: str, key: str, how: str) -> None:
            """A first call with its key, or a standing key reused for whatever call was drawn."""
            self.deduct_and_check(org, feature, units, key=key, hold=how != "charge", dead=how == "hold, then die")

        @precondition(lambda self: bool(self.keys or self.freed))
        @rule(data=st.data(), how=HOW)
        def retry_idempotent(self, data: st.DataObject, how: str) -> None:
            """A client retrying a call whose answer it lost: the same key, feature and units.
            A replay while the key stands; a new charge once a refund or the TTL freed it."""
            org, key = data.draw(st.sampled_from(sorted(self.keys.keys() | self.freed.keys())), label="key")
            call = self.keys[(org, key)] if (org, key) in self.keys else self.freed[(org, key)][1]
            units = data.draw(st.sampled_from([call.units, str(Decimal(call.units) + Decimal("0.0"))]), label="spelt")
            self.deduct_and_check(org, call.feature, units, key=key, hold=how != "charge", dead=how == "hold, then die")

        def pick_charge(self, data: st.DataObject, *, open_first: bool) -> int:
            """Any charge, so the no-ops (after a settle, refund or expiry) get exercised, but
            unrefunded charges first (Hypothesis favours a list's start), and for a settlement
            an open hold half the time, so that first settlements and refunds are frequent."""
            ranked = sorted(self.charges, key=lambda cid: (self.charges[cid].refunded, self.charges[cid].open, cid))
            held = self.open_holds()
            if open_first and held:
                return data.draw(st.one_of(st.sampled_from(held), st.sampled_from(ranked)), label="charge")
            return data.draw(st.sampled_from(ranked), label="charge")

        @precondition(lambda self: bool(self.charges))
        @rule(data=st.data())
        def refund(self, data: st.DataObject) -> None:
            charge_id = self.pick_charge(data, open_first=False)
            result = self.run(lambda: self.guard.refund_credits(charge_id))
            charge = self.charges[charge_id]
            if charge.refunded:
                assert (result.refunded, result.error) == (False, "already refunded")
                reached["refund no-op"] += 1
            else:
                # The reserve comes back, and with it any surcharge taken for its usage.
                assert result.refunded and result.credits_refunded == charge.credits + charge.surcharge
                if charge.surcharge:
                    reached["refund with its surcharge"] += 1
                self.refunded_in_full(charge_id)
                assert result.remaining_credits == self.balances[charge.org]
                reached["refunded"] += 1

        @precondition(lambda self: bool(self.open_holds()))
        @rule(data=st.data(), usage=USAGE, max_extra=MAX_EXTRA)
        def settle(self, data: st.DataObject, usage: str, max_extra: int) -> None:
            """Keep a hold as reserved, or at a reported usage: less than the reserve, none of
            it, all of it, or more (a surcharge of at most max_extra, and of what the balance holds)."""
            charge_id = self.pick_charge(data, open_first=True)
            charge = self.charges[charge_id]
            held = charge.credits  # at least 3: half a unit at 5 credits
            if usage == "as reserved":
                assert self.run(lambda: self.guard.settle_charge(charge_id)) == (0, 0)
                reached["settled as reserved" if charge.open else "settle no-op"] += 1
                charge.open = charge.live = False
                return
            if usage == "less":
                used = data.draw(st.integers(1, held - 1), label="used")
            elif usage == "more":
                used = held + data.draw(st.integers(1, 40), label="used beyond")
            else:
                used = 0 if usage == "none" else held
            got = self.run(
                lambda: self.guard.settle_charge(charge_id, used_credits=used, max_overage_credits=max_extra)
            )
            if not charge.open:  # settled, refunded, swept, or never a hold
                assert got == (0, 0)
                reached["settle no-op"] += 1
            elif used < held:
                assert got == (held - used, 0)
                self.balances[charge.org] += held - used
                charge.refunded = True  # but the key stands: the request happened, at its usage
                reached["usage: unused part refunded" if used else "usage: nothing used, all refunded"] += 1
            else:
                taken = min(used - held, max_extra, self.balances[charge.org])
                assert got == (0, taken)
                self.balances[charge.org] -= taken
                charge.surcharge = taken
                reached["usage: surcharge" if taken else "settled as reserved"] += 1
            charge.open = charge.live = False

        @precondition(lambda self: any(charge.live for charge in self.charges.values()))
        @rule(data=st.data())
        def request_dies(self, data: st.DataObject) -> None:
            """The request behind a live hold dies: its hold is left to the sweeper."""
            charge_id = data.draw(st.sampled_from(sorted(c for c, charge in self.charges.items() if charge.live)))
            self.guard.holds.forget(charge_id)
            self.charges[charge_id].live = False

        @precondition(lambda self: bool(self.open_holds()))
        @rule(past_keys=st.booleans())
        def expire(self, past_keys: bool) -> None:
            """A sweep at a clock past every hold's timeout (and maybe every key's TTL)."""
            now = utcnow() + (PAST_KEYS if past_keys else PAST_HOLDS)
            released = self.run(lambda: self.guard.release_expired_holds(now=now))
            expired = [cid for cid in self.open_holds() if not self.charges[cid].live]
            assert released == len(expired)
            for charge_id in expired:
                self.refunded_in_full(charge_id)
            if past_keys:
                self.freed.update({org_key: ("TTL", claim) for org_key, claim in self.keys.items()})
                self.keys.clear()
            if expired:
                reached["swept"] += 1
            if self.open_holds():
                reached["sweep skipped a live hold"] += 1

        @invariant()
        def books_balance(self) -> None:
            async def read() -> tuple[dict[str, int], list[Any], list[int]]:
                # Every account in one read (this runs after each of ~3000 steps): an account
                # the model does not know of must not exist either.
                async with self.guard.engine.connect() as conn:
                    rows = await conn.execute(select(accounts.c.organization_id, accounts.c.balance))
                    balances = {org: int(balance) for org, balance in rows}
                return balances, await self.guard.audit(), await self.guard.open_holds()

            balances, issues, open_holds = self.run(read)
            assert issues == []
            assert balances == self.balances
            assert open_holds == self.open_holds()
            assert self.guard.holds.live == {cid for cid, charge in self.charges.items() if charge.live}

        def teardown(self) -> None:
            async def close() -> None:
                await self.guard.close()
                await self.dead.close()

            self.run(close)
            self.loop.close()

    return Books


def test_any_interleaving_keeps_balances_equal_to_model_and_ledger(db_url: str, tmp_path: Path) -> None:
    reached: Counter[str] = Counter()
    run_state_machine_as_test(
        # The same interleavings on every run and machine, and after an edit of the machine's
        # code (derandomize=True would seed from that code).
        seed(SEED)(books_machine(db_url, tmp_path, reached)),
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    assert MUST_REACH <= set(reached), f"never reached: {sorted(MUST_REACH - set(reached))}; reached: {reached}"
