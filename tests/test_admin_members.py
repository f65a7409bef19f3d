"""An organization's member caps through the admin API, on both databases: what the API
answers is what the guard stores, and a cap set here is the one the next charge meets
(refused over it, counted again in a new period, free once removed)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from credit_guard import CreditGuard
from credit_guard.admin import admin_app
from credit_guard.models import MemberLimit
from credit_guard.schema import MAX_BALANCE
from credit_guard.testing import Clock

from .conftest import ledger_rows
from .test_admin_api import ADMIN, MEMBER, assert_problem, client_for

pytestmark = pytest.mark.anyio

MEMBERS = "/api/admin/organizations/{}/members"
ORG = "acme"
IMAGE = "seedream_text_to_image"  # 5 credits
HOSTILE = "<img src=x onerror=alert(1)>"


def cap_path(member: str, org: str = ORG) -> str:
    return MEMBERS.format(quote(org, safe="")) + "/" + quote(member, safe="")


@pytest.fixture
async def client(guard: CreditGuard) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(admin_app(guard)) as c:
        yield c


@pytest.fixture
def late_evening(credit_clock: Clock) -> datetime:
    """23:00 UTC tomorrow: an hour before the day (and maybe the month) turns over."""
    tomorrow = credit_clock.now().astimezone(UTC) + timedelta(days=1)
    when = tomorrow.replace(hour=23, minute=0, second=0, microsecond=0)
    credit_clock.travel_to(when)
    return when


async def listed(client: httpx.AsyncClient, org: str = ORG) -> list[dict[str, Any]]:
    response = await client.get(MEMBERS.format(org), headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["organization_id"] == org
    members: list[dict[str, Any]] = body["members"]
    return members


async def test_a_cap_set_through_the_api_is_the_one_the_next_charge_meets(
    client: httpx.AsyncClient,
    guard: CreditGuard,
    credit_clock: Clock,
    late_evening: datetime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    midnight = (late_evening + timedelta(days=1)).replace(hour=0)
    await guard.grant_credits(ORG, 100)
    assert await listed(client) == []  # none: an empty list, not a 404

    caplog.set_level("INFO", logger="credit_guard.admin")
    created = await client.put(cap_path("ann"), json={"credits": 12, "per": "day"}, headers=ADMIN)
    assert created.status_code == 200, created.text
    assert created.headers["cache-control"] == "no-store"
    stored = await guard.get_member_usage(ORG, "ann")
    assert stored == MemberLimit(ORG, "ann", 12, "day", 0, 12, midnight)
    assert created.json() == stored.to_dict()
    assert created.json()["resets_at"] == midnight.isoformat()
    assert "set acme's cap for member 'ann': 12 credits a day" in caplog.text

    # the charge meets it: two images (10 credits) fit, the third would pass 12
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    refused = await guard.deduct_credits(ORG, IMAGE, user_id="ann")
    assert (refused.success, refused.error_code) == (False, "member_limit_reached")
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="bob")).success  # no cap: the organization's credits
    assert await guard.get_balance(ORG) == 100 - 15
    assert await listed(client) == [MemberLimit(ORG, "ann", 12, "day", 10, 2, midnight).to_dict()]

    # more credits: what was spent today is kept; a whole 20.0 is the integer 20
    raw = json.dumps({"credits": 20.0, "per": "day"}).encode()
    changed = await client.put(cap_path("ann"), content=raw, headers={**ADMIN, "content-type": "application/json"})
    assert changed.status_code == 200, changed.text
    assert changed.json() == MemberLimit(ORG, "ann", 20, "day", 10, 10, midnight).to_dict()
    assert await guard.get_member_usage(ORG, "ann") == MemberLimit(ORG, "ann", 20, "day", 10, 10, midnight)
    assert "changed acme's cap for member 'ann' from 12 credits a day to 20 credits a day" in caplog.text
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success

    # a new day: the count starts again, and the page reads it so
    credit_clock.travel_to(midnight + timedelta(minutes=1))
    next_midnight = midnight + timedelta(days=1)
    assert await listed(client) == [MemberLimit(ORG, "ann", 20, "day", 0, 20, next_midnight).to_dict()]

    # another member, 0 in all: none of its paid calls go through, and it never resets
    blocked = await client.put(cap_path("bob"), json={"credits": 0, "per": None}, headers=ADMIN)
    assert blocked.json() == MemberLimit(ORG, "bob", 0, None, 0, 0, None).to_dict()
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="bob")).error_code == "member_limit_reached"
    assert await listed(client) == [cap.to_dict() for cap in await guard.list_member_limits(ORG)]
    assert [m["member"] for m in await listed(client)] == ["ann", "bob"]

    # a change of period starts counting again
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    month = await client.put(cap_path("ann"), json={"credits": 20, "per": "month"}, headers=ADMIN)
    assert (month.json()["per"], month.json()["used"], month.json()["remaining"]) == ("month", 0, 20)
    assert "from 20 credits a day to 20 credits a month" in caplog.text

    # removed: bob spends what the organization has again; a second removal is a 404
    balance = await guard.get_balance(ORG)
    removed = await client.delete(cap_path("bob"), headers=ADMIN)
    assert (removed.status_code, removed.content, removed.headers["cache-control"]) == (204, b"", "no-store")
    assert await guard.get_member_usage(ORG, "bob") is None
    assert "removed acme's cap for member 'bob'" in caplog.text
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="bob")).success
    assert await guard.get_balance(ORG) == balance - 5
    again = assert_problem(await client.delete(cap_path("bob"), headers=ADMIN), 404)
    assert again["type"] == "urn:credit-guard:problem:no-member-limit"
    assert (again["organization_id"], again["member"]) == (ORG, "bob")
    assert [m["member"] for m in await listed(client)] == ["ann"]
    assert await guard.audit() == []


async def test_any_member_id_round_trips_through_the_path(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    """A member is whatever the app's user id is: markup, spaces, percent signs, slashes,
    newlines, non-ASCII and 255 characters are all one path segment, stored and read back as sent."""
    members = [HOSTILE, "key 42 %2F?#&", "team/ann", "/", "\nann\n", "ünïcødé·😀", "k" * 255]
    for credits, member in enumerate(members, start=1):
        response = await client.put(cap_path(member), json={"credits": credits, "per": "month"}, headers=ADMIN)
        assert response.status_code == 200, response.text
        assert response.json()["member"] == member
        usage = await guard.get_member_usage(ORG, member)
        assert usage is not None and usage.credits == credits
    assert await listed(client) == [cap.to_dict() for cap in await guard.list_member_limits(ORG)]
    assert {m["member"] for m in await listed(client)} == set(members)
    # the organization is the path's too: a cap in another one is not this one's
    other = await client.put(cap_path(HOSTILE, org="acme labs"), json={"credits": 1, "per": None}, headers=ADMIN)
    assert other.status_code == 200, other.text
    assert [cap.member for cap in await guard.list_member_limits("acme labs")] == [HOSTILE]
    for member in members:
        assert (await client.delete(cap_path(member), headers=ADMIN)).status_code == 204
    assert await guard.list_member_limits(ORG) == []
    assert await guard.get_member_usage("acme labs", HOSTILE) is not None


async def test_member_cap_refusals_name_each_field_and_change_nothing(
    client: httpx.AsyncClient, guard: CreditGuard
) -> None:
    path = cap_path("ann")
    await guard.set_member_limit(ORG, "ann", 12, per="day")
    before = await guard.list_member_limits(ORG)
    ledger = await ledger_rows(guard)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {"credits", "per"}),
        ({"credits": 10}, {"per"}),  # per is required: leaving it out must not start the count again
        ({"per": "day"}, {"credits"}),
        ({"credits": -1, "per": "day"}, {"credits"}),
        ({"credits": 1.5, "per": "week"}, {"credits", "per"}),
        ({"credits": "10", "per": "Day"}, {"credits", "per"}),
        ({"credits": True, "per": 1}, {"credits", "per"}),
        ({"credits": MAX_BALANCE + 1, "per": ["day"]}, {"credits", "per"}),
        ({"credits": None, "per": None}, {"credits"}),
        ({"credits": 10, "per": "day", "member": "bob"}, {"member"}),
        ({"credits": 10, "per": "day", "used": 0, "remaining": 10}, {"used", "remaining"}),
    ]
    for body, fields in cases:
        problem = assert_problem(await client.put(path, json=body, headers=ADMIN), 422)
        assert set(problem["errors"]) == fields, body
        assert problem["type"] == "urn:credit-guard:problem:invalid-request"
    bad = assert_problem(await client.put(path, json={"credits": -1, "per": "week"}, headers=ADMIN), 422)
    assert bad["errors"] == {
        "credits": f"must be a whole number from 0 to {MAX_BALANCE}",
        "per": 'must be "day", "month" or null (in all)',
    }
    json_header = {**ADMIN, "content-type": "application/json"}
    assert_problem(await client.put(path, content=b"{not json", headers=json_header), 400)
    assert_problem(await client.put(path, content=b"[12, null]", headers=json_header), 400)
    assert_problem(await client.put(path, data={"credits": "1", "per": "day"}, headers=ADMIN), 415)

    # the path: 1 to 255 characters each, and no NUL (a 422 naming it, never a 500)
    body = {"credits": 1, "per": "day"}
    for method, target, field in (
        ("PUT", MEMBERS.format(ORG) + "/", "member"),  # an empty member
        ("PUT", cap_path("m" * 256), "member"),
        ("DELETE", cap_path("m" * 256), "member"),
        ("PUT", cap_path("a\x00b"), "member"),
        ("DELETE", cap_path("a\x00b"), "member"),
        ("PUT", cap_path("ann", org="x" * 256), "organization_id"),
        ("DELETE", cap_path("ann", org="x" * 256), "organization_id"),
        ("GET", MEMBERS.format("x" * 256), "organization_id"),
        ("GET", MEMBERS.format("a%00"), "organization_id"),
        ("PUT", cap_path("ann", org="a\x00"), "organization_id"),
    ):
        kwargs: dict[str, Any] = {"json": body} if method == "PUT" else {}
        problem = assert_problem(await client.request(method, target, headers=ADMIN, **kwargs), 422)
        assert list(problem["errors"]) == [field], (method, target)

    # who may: nobody signed in is a 401, a member of the app a 403, before any validation
    for method, target in (("GET", MEMBERS.format(ORG)), ("PUT", path), ("DELETE", path)):
        kwargs = {"json": body} if method == "PUT" else {}
        assert_problem(await client.request(method, target, headers=MEMBER, **kwargs), 403)
        assert_problem(await client.request(method, target, **kwargs), 401)
    no_cap = assert_problem(await client.delete(cap_path("zoe"), headers=ADMIN), 404)
    assert no_cap["detail"] == "Member 'zoe' of organization 'acme' has no cap."

    assert await guard.list_member_limits(ORG) == before
    assert await ledger_rows(guard) == ledger
