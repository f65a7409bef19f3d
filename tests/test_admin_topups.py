"""An organization's auto top-up through the admin API, on both databases: what the API
answers is what the guard stores and watches; a process without a charge says so, and
buys and records nothing; with one, a real crossing shows on the next read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from credit_guard import CreditGuard
from credit_guard.admin import admin_app
from credit_guard.models import AutoTopup
from credit_guard.schema import MAX_BALANCE

from .conftest import ledger_rows, topup_key
from .test_admin_api import ADMIN, MEMBER, assert_problem, client_for

pytestmark = pytest.mark.anyio

TOPUP = "/api/admin/organizations/{}/auto-topup"
ORG = "acme"


@pytest.fixture
async def client(guard: CreditGuard) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(admin_app(guard)) as c:
        yield c


class Card:
    """The app's charge: pays (or declines) and grants, keyed by the crossing."""

    def __init__(self, guard: CreditGuard) -> None:
        self.guard, self.declines = guard, False
        self.calls: list[tuple[str, int, str]] = []

    async def __call__(self, organization_id: str, credits: int, *, key: str) -> str:
        self.calls.append((organization_id, credits, key))
        if self.declines:
            raise RuntimeError("card_declined")
        await self.guard.grant_credits(organization_id, credits, reason="auto top-up", idempotency_key=key)
        return f"pi_{key}"


def view(topup: AutoTopup | None, *, charge_registered: bool) -> dict[str, Any]:
    """What the API must answer for the row the guard reads back."""
    assert topup is not None
    return {
        "organization_id": topup.organization_id,
        "below": topup.below,
        "credits": topup.credits,
        "state": topup.state,
        "crossings": topup.crossings,
        "last_result": topup.last_result,
        "last_error": topup.last_error,
        "last_run_at": None if topup.last_run_at is None else topup.last_run_at.isoformat(),
        "charge_registered": charge_registered,
    }


async def settled(guard: CreditGuard, org: str, crossings: int) -> AutoTopup:
    """The organization's auto top-up once ``crossings`` top-ups have run and finished."""
    with anyio.fail_after(10):
        while True:
            topup = await guard.auto_topup(org)
            if topup is not None and topup.crossings == crossings and topup.state != "running":
                return topup
            await anyio.sleep(0.02)


async def test_an_auto_topup_set_through_the_api_is_the_one_the_guard_watches(
    client: httpx.AsyncClient, guard: CreditGuard, caplog: pytest.LogCaptureFixture
) -> None:
    path = TOPUP.format(ORG)
    await guard.grant_credits(ORG, 40)
    none = assert_problem(await client.get(path, headers=ADMIN), 404)
    assert none["type"] == "urn:credit-guard:problem:no-auto-topup"
    assert (none["organization_id"], none["charge_registered"]) == (ORG, False)

    caplog.set_level("INFO", logger="credit_guard.admin")
    created = await client.put(path, json={"below": 10, "credits": 500}, headers=ADMIN)
    assert created.status_code == 200, created.text
    assert created.headers["cache-control"] == "no-store"
    stored = await guard.auto_topup(ORG)
    assert stored == AutoTopup(ORG, 10, 500, "armed", 0, None, None, None)
    assert created.json() == view(stored, charge_registered=False)
    assert guard.topups.lines[ORG] == 10  # the line this process watches
    assert "set acme's auto top-up: 500 credits below 10; no charge is registered in this process" in caplog.text
    assert (await client.get(path, headers=ADMIN)).json() == created.json()

    # a change: both numbers replaced, armed again; a whole 8.0 is the integer 8
    raw = json.dumps({"below": 8.0, "credits": 200}).encode()
    changed = await client.put(path, content=raw, headers={**ADMIN, "content-type": "application/json"})
    assert changed.status_code == 200, changed.text
    assert await guard.auto_topup(ORG) == AutoTopup(ORG, 8, 200, "armed", 0, None, None, None)
    assert "changed acme's auto top-up from 500 credits below 10 to 200 credits below 8" in caplog.text

    # no charge registered here: a line above the balance (40) buys nothing and records nothing
    ledger = await ledger_rows(guard)
    above = await client.put(path, json={"below": 100, "credits": 200}, headers=ADMIN)
    assert above.json()["charge_registered"] is False
    await anyio.sleep(0.2)  # the look the guard starts after a set has long run
    await guard.topups.run_once()
    assert await guard.auto_topup(ORG) == AutoTopup(ORG, 100, 200, "armed", 0, None, None, None)
    assert await ledger_rows(guard) == ledger and await guard.get_balance(ORG) == 40

    removed = await client.delete(path, headers=ADMIN)
    assert (removed.status_code, removed.content) == (204, b"")
    assert await guard.auto_topup(ORG) is None and ORG not in guard.topups.lines
    assert "removed acme's auto top-up" in caplog.text
    assert_problem(await client.get(path, headers=ADMIN), 404)
    again = assert_problem(await client.delete(path, headers=ADMIN), 404)
    assert again["type"] == "urn:credit-guard:problem:no-auto-topup"
    assert await guard.audit() == []


async def test_with_a_charge_registered_the_api_shows_each_crossing_and_its_result(
    client: httpx.AsyncClient, guard: CreditGuard
) -> None:
    path = TOPUP.format(ORG)
    card = Card(guard)
    guard.topups.register(card)
    await guard.grant_credits(ORG, 150)
    assert (await client.put(path, json={"below": 100, "credits": 500}, headers=ADMIN)).json()["charge_registered"]

    # a real crossing: 150 -> 130 -> ... -> 90 buys 500 once, and the line is armed again
    for _ in range(3):
        assert (await guard.deduct_credits(ORG, "kling_image_to_video")).success
    topup = await settled(guard, ORG, 1)
    assert card.calls == [(ORG, 500, await topup_key(guard, ORG, 1))]
    assert await guard.get_balance(ORG) == 150 - 60 + 500
    read = (await client.get(path, headers=ADMIN)).json()
    assert read == view(topup, charge_registered=True)
    assert (read["state"], read["crossings"], read["last_result"], read["last_error"]) == (
        "armed",
        1,
        "pi_" + await topup_key(guard, ORG, 1),
        None,
    )
    assert read["last_run_at"] is not None

    # the card is declined on the next crossing: the error is shown, and it waits below the line
    card.declines = True
    assert (await guard.deduct_credits(ORG, "kling_image_to_video", units=25)).success  # 590 - 500 = 90
    topup = await settled(guard, ORG, 2)
    read = (await client.get(path, headers=ADMIN)).json()
    assert read == view(topup, charge_registered=True)
    assert (read["state"], read["last_result"], read["last_error"]) == ("fired", None, "RuntimeError: card_declined")
    assert len(card.calls) == 2 and await guard.get_balance(ORG) == 90
    assert await guard.audit() == []


async def test_auto_topup_refusals_name_each_field_and_change_nothing(
    client: httpx.AsyncClient, guard: CreditGuard
) -> None:
    path = TOPUP.format(ORG)
    await guard.set_auto_topup(ORG, below=100, credits=500)
    before = await guard.auto_topup(ORG)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {"below", "credits"}),
        ({"below": 0, "credits": 1}, {"below"}),
        ({"below": 1, "credits": -5}, {"credits"}),
        ({"below": 1.5, "credits": "10"}, {"below", "credits"}),
        ({"below": True, "credits": MAX_BALANCE + 1}, {"below", "credits"}),
        ({"below": None, "credits": 10}, {"below"}),
        ({"below": 10, "credits": 10, "charge": "https://pay.example"}, {"charge"}),
        ({"credits": 10, "state": "armed", "crossings": 0}, {"below", "state", "crossings"}),
    ]
    for body, fields in cases:
        problem = assert_problem(await client.put(path, json=body, headers=ADMIN), 422)
        assert set(problem["errors"]) == fields, body
    bad = assert_problem(await client.put(path, json={"below": 0, "credits": 10}, headers=ADMIN), 422)
    assert bad["errors"]["below"] == f"must be a whole number from 1 to {MAX_BALANCE}"
    json_header = {**ADMIN, "content-type": "application/json"}
    assert_problem(await client.put(path, content=b"{not json", headers=json_header), 400)
    assert_problem(await client.put(path, content=b"[100, 500]", headers=json_header), 400)
    assert_problem(await client.put(path, data={"below": "1", "credits": "1"}, headers=ADMIN), 415)
    too_long = TOPUP.format("x" * 256)
    for method in ("GET", "PUT", "DELETE"):
        kwargs: dict[str, Any] = {"json": {"below": 1, "credits": 1}} if method == "PUT" else {}
        problem = assert_problem(await client.request(method, too_long, headers=ADMIN, **kwargs), 422)
        assert list(problem["errors"]) == ["organization_id"]
        assert_problem(await client.request(method, path, headers=MEMBER, **kwargs), 403)
        assert_problem(await client.request(method, path, **kwargs), 401)
    assert "organization_id" in assert_problem(await client.get(TOPUP.format("a%00"), headers=ADMIN), 422)["errors"]
    assert await guard.auto_topup(ORG) == before
