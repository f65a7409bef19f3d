"""The pricing admin API, the public pricing endpoint and the OpenAPI document, on both databases."""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from litestar.params import Parameter  # module level: older Litestar resolves annotations here
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_guard import CreditGuard
from credit_guard.admin import admin_app, openapi_document
from credit_guard.models import CREDITS_MAX, Plan

from .conftest import PRICES, ledger_rows, reset_postgres

pytestmark = pytest.mark.anyio

PRICING = "/api/admin/feature-pricing"
USAGE = "/api/admin/usage"
PLANS = "/api/admin/plans"
ADMIN = {"x-user": "admin"}
MEMBER = {"x-user": "member"}
HAS_PAGE = importlib.util.find_spec("credit_guard.admin.page") is not None
NEW = {"feature_key": "face_swap", "feature_name": "Face Swap", "category": "Advanced Tools", "credits": 8}


class FakeAuth:
    """What the host app's auth does: put the signed-in user on request state."""

    users: dict[str, Any] = {
        "admin": {"is_admin": True},
        "member": {"is_admin": False},
        "object-admin": SimpleNamespace(is_admin=True),
        "truthy-string": {"is_admin": "yes"},
    }

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            who = dict(scope["headers"]).get(b"x-user")
            if who is not None:
                scope.setdefault("state", {})["user"] = self.users[who.decode()]
        await self.app(scope, receive, send)


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=FakeAuth(app)), base_url="http://test")


@pytest.fixture
async def client(guard: CreditGuard) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(admin_app(guard)) as c:
        yield c


async def snapshot(guard: CreditGuard) -> list[dict[str, Any]]:
    return [p.to_dict() for p in await guard.list_pricing()]


async def id_of(guard: CreditGuard, key: str) -> str:
    return next(p.id for p in await guard.list_pricing() if p.feature_key == key)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"].startswith("urn:credit-guard:problem:")
    return body


# -- CRUD ----------------------------------------------------------------------------------


async def test_pricing_crud_round_trip(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    created = await client.post(PRICING, json={**NEW, "description": "Swap a face.", "is_active": False}, headers=ADMIN)
    assert created.status_code == 201
    body = created.json()
    assert {k: body[k] for k in NEW} == NEW and body["description"] == "Swap a face." and body["is_active"] is False
    assert created.headers["location"] == f"{PRICING}/{body['id']}"

    fetched = await client.get(created.headers["location"], headers=ADMIN)
    assert fetched.json() == body

    patched = await client.patch(
        f"{PRICING}/{body['id']}", json={"credits": 9, "is_active": True, "description": None}, headers=ADMIN
    )
    assert patched.status_code == 200
    assert (patched.json()["credits"], patched.json()["is_active"], patched.json()["description"]) == (9, True, None)
    # The write reached the guard's (cached) money path at once.
    assert (await guard.get_feature_pricing("face_swap")).credits == 9  # type: ignore[union-attr]

    listed = (await client.get(PRICING, headers=ADMIN)).json()
    assert {p["feature_key"] for p in listed} == {*PRICES, "face_swap"}

    deleted = await client.delete(f"{PRICING}/{body['id']}", headers=ADMIN)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert_problem(await client.get(f"{PRICING}/{body['id']}", headers=ADMIN), 404)
    assert await guard.get_feature_pricing("face_swap") is None


async def test_list_filters_by_category_and_active(client: httpx.AsyncClient) -> None:
    async def keys(**params: str) -> set[str]:
        response = await client.get(PRICING, params=params, headers=ADMIN)
        assert response.status_code == 200
        return {p["feature_key"] for p in response.json()}

    assert await keys(active="true") == {"seedream_text_to_image", "kling_image_to_video"}
    assert await keys(active="false") == {"retired_feature"}
    assert await keys(category="Video Generation") == {"kling_image_to_video"}
    assert await keys(category="Advanced Tools", active="true") == set()


async def test_bad_filters_are_422_naming_the_parameter(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get(PRICING, params={"active": "yes", "category": " "}, headers=ADMIN), 422)
    assert set(body["errors"]) == {"active", "category"}


# -- public pricing --------------------------------------------------------------------------


async def test_public_pricing_by_key_shows_public_fields_only(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/features/pricing", params={"key": "seedream_text_to_image"})  # no user at all
    assert response.status_code == 200
    assert response.json() == {
        "feature_key": "seedream_text_to_image",
        "feature_name": "SeeDream Text to Image",
        "category": "Image Generation",
        "credits": 5,
        "description": None,
    }
    assert "max-age" in response.headers["cache-control"]


@pytest.mark.parametrize("key", ["retired_feature", "no_such_feature", "NOT A KEY", "x" * 500])
async def test_public_pricing_is_404_for_inactive_unknown_and_malformed_keys(
    client: httpx.AsyncClient, key: str
) -> None:
    body = assert_problem(await client.get("/api/features/pricing", params={"key": key}), 404)
    assert body["feature"] == key


async def test_public_pricing_groups_active_features_by_category(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/features/pricing")
    assert response.status_code == 200 and "max-age" in response.headers["cache-control"]
    grouped = {g["category"]: [f["feature_key"] for f in g["features"]] for g in response.json()["categories"]}
    assert grouped == {"Image Generation": ["seedream_text_to_image"], "Video Generation": ["kling_image_to_video"]}
    assert all(set(f) == {"feature_key", "feature_name", "category", "credits", "description"}
               for g in response.json()["categories"] for f in g["features"])  # fmt: skip


async def test_public_pricing_empty_key_is_422(client: httpx.AsyncClient) -> None:
    assert "key" in assert_problem(await client.get("/api/features/pricing?key="), 422)["errors"]


async def test_parameters_the_database_cannot_store_are_422_not_an_outage(client: httpx.AsyncClient) -> None:
    nul = "%00"
    assert "category" in assert_problem(await client.get(f"{PRICING}?category=a{nul}", headers=ADMIN), 422)["errors"]
    assert "org" in assert_problem(await client.get(f"/api/admin/usage?org=a{nul}", headers=ADMIN), 422)["errors"]
    item = assert_problem(await client.delete(f"{PRICING}/a{nul}", headers=ADMIN), 422)
    assert "pricing_id" in item["errors"]


# -- usage -----------------------------------------------------------------------------------


async def test_usage_report_matches_the_ledger(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    await guard.grant_credits("org_a", 100)
    await guard.grant_credits("org_b", 100)
    first = await guard.deduct_credits("org_a", "seedream_text_to_image")
    await guard.deduct_credits("org_a", "seedream_text_to_image")
    await guard.deduct_credits("org_a", "kling_image_to_video")
    await guard.deduct_credits("org_b", "seedream_text_to_image")
    await guard.refund_credits(first.charge_id)  # type: ignore[arg-type]

    expected: dict[str, dict[str, int]] = {}
    for row in await ledger_rows(guard):
        if row["kind"] == "grant":
            continue
        totals = expected.setdefault(str(row["feature_key"]), dict.fromkeys(("charged", "refunded", "net"), 0))
        amount = int(row["amount"])  # type: ignore[call-overload]
        totals["charged" if row["kind"] == "charge" else "refunded"] += abs(amount)
        totals["net"] -= amount
    response = await client.get("/api/admin/usage", params={"group_by": "feature"}, headers=ADMIN)
    assert response.status_code == 200 and response.json()["group_by"] == "feature"
    got = {
        r["key"]: {"charged": r["credits_charged"], "refunded": r["credits_refunded"], "net": r["net_credits"]}
        for r in response.json()["rows"]
    }
    assert (
        got
        == expected
        == {
            "seedream_text_to_image": {"charged": 15, "refunded": 5, "net": 10},
            "kling_image_to_video": {"charged": 20, "refunded": 0, "net": 20},
        }
    )

    by_org = await client.get(
        "/api/admin/usage", params={"group_by": "org", "feature": "seedream_text_to_image"}, headers=ADMIN
    )
    assert {r["key"]: r["net_credits"] for r in by_org.json()["rows"]} == {"org_a": 5, "org_b": 5}
    [day] = (
        await client.get("/api/admin/usage", params={"org": "org_a", "since": "2000-01-01"}, headers=ADMIN)
    ).json()["rows"]
    assert (day["charges"], day["credits_charged"], day["refunds"]) == (3, 30, 1)
    future = await client.get("/api/admin/usage", params={"since": "2999-01-01T00:00:00Z"}, headers=ADMIN)
    assert future.json()["rows"] == []
    past = await client.get("/api/admin/usage", params={"until": "2000-01-01T00:00:00+02:00"}, headers=ADMIN)
    assert past.json()["rows"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-13-45"}, "until"),
        ({"group_by": "week"}, "group_by"),
        ({"since": ""}, "since"),
        ({"split_by": "week"}, "split_by"),
        ({"split_by": "day"}, "split_by"),  # the default group_by: splitting a day by day says nothing
        ({"group_by": "org", "split_by": "org"}, "split_by"),
    ],
)
async def test_usage_rejects_bad_parameters_naming_them(
    client: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    body = assert_problem(await client.get("/api/admin/usage", params=params, headers=ADMIN), 422)
    assert list(body["errors"]) == [field]
    assert body["detail"].startswith(f"{field}: ")
    if params.get("split_by") in ("day", "org"):
        assert "must differ from group_by" in body["errors"]["split_by"]


async def seed_three_days(guard: CreditGuard) -> None:
    """Charges on three UTC days (two days ago, yesterday, today): the ledger's created_at
    follows the library's clock, so moving it back seeds the past."""
    from datetime import timedelta

    from credit_guard import _clock

    try:
        _clock.travel(timedelta(days=-2))
        await guard.grant_credits("org_a", 200)
        await guard.grant_credits("org_b", 100)
        await guard.deduct_credits("org_a", "seedream_text_to_image")  # 5
        await guard.deduct_credits("org_a", "kling_image_to_video")  # 20
        _clock.travel(timedelta(days=1))
        await guard.deduct_credits("org_b", "seedream_text_to_image")
        refunded = await guard.deduct_credits("org_b", "seedream_text_to_image")
        await guard.refund_credits(refunded.charge_id)  # type: ignore[arg-type]
        _clock.travel(timedelta(days=1))
        for _ in range(3):
            await guard.deduct_credits("org_a", "seedream_text_to_image")
        await guard.deduct_credits("org_b", "kling_image_to_video")
    finally:
        _clock.reset_travel()


async def test_usage_split_by_gives_a_row_per_day_and_feature_or_organization(
    client: httpx.AsyncClient, guard: CreditGuard
) -> None:
    from datetime import UTC, datetime, timedelta

    await seed_three_days(guard)
    today = datetime.now(UTC).date()
    d0, d1, d2 = (str(today - timedelta(days=n)) for n in (2, 1, 0))
    response = await client.get(USAGE, params={"group_by": "day", "split_by": "feature"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["group_by"], body["split_by"]) == ("day", "feature")
    got = {(r["key"], r["split"]): (r["charges"], r["refunds"], r["net_credits"]) for r in body["rows"]}
    assert got == {
        (d0, "seedream_text_to_image"): (1, 0, 5),
        (d0, "kling_image_to_video"): (1, 0, 20),
        (d1, "seedream_text_to_image"): (2, 1, 5),
        (d2, "seedream_text_to_image"): (3, 0, 15),
        (d2, "kling_image_to_video"): (1, 0, 20),
    }
    assert [r.to_dict() for r in await guard.usage_report(group_by="day", split_by="feature")] == body["rows"]

    by_org = await client.get(USAGE, params={"split_by": "org", "since": d1}, headers=ADMIN)  # group_by=day
    assert {(r["key"], r["split"]): r["net_credits"] for r in by_org.json()["rows"]} == {
        (d1, "org_b"): 5,
        (d2, "org_a"): 15,
        (d2, "org_b"): 20,
    }
    features_by_org = await client.get(
        USAGE, params={"group_by": "feature", "split_by": "org", "org": "org_b"}, headers=ADMIN
    )
    assert {(r["key"], r["split"]): r["net_credits"] for r in features_by_org.json()["rows"]} == {
        ("seedream_text_to_image", "org_b"): 5,
        ("kling_image_to_video", "org_b"): 20,
    }
    plain = (await client.get(USAGE, params={"group_by": "feature"}, headers=ADMIN)).json()
    assert plain["split_by"] is None and all("split" not in r for r in plain["rows"])


async def test_balance_history_is_the_balance_at_the_end_of_each_day_it_moved(
    client: httpx.AsyncClient, guard: CreditGuard
) -> None:
    from datetime import UTC, datetime, timedelta

    await seed_three_days(guard)
    today = datetime.now(UTC).date()
    d0, d1, d2 = (str(today - timedelta(days=n)) for n in (2, 1, 0))
    path = "/api/admin/organizations/{}/balance-history"
    response = await client.get(path.format("org_a"), headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "organization_id": "org_a",
        "points": [{"day": d0, "balance": 175}, {"day": d2, "balance": 160}],
    }
    org_b = (await client.get(path.format("org_b"), headers=ADMIN)).json()["points"]
    assert org_b == [{"day": d0, "balance": 100}, {"day": d1, "balance": 95}, {"day": d2, "balance": 75}]
    assert org_b == [p.to_dict() for p in await guard.balance_history("org_b")]
    assert org_b[-1]["balance"] == await guard.get_balance("org_b")
    ranged = await client.get(path.format("org_b"), params={"since": d1, "until": d2}, headers=ADMIN)
    assert ranged.json()["points"] == [{"day": d1, "balance": 95}]
    nobody = await client.get(path.format("nobody"), headers=ADMIN)
    assert (nobody.status_code, nobody.json()) == (200, {"organization_id": "nobody", "points": []})
    bad = assert_problem(await client.get(path.format("org_a"), params={"until": "soon"}, headers=ADMIN), 422)
    assert list(bad["errors"]) == ["until"]
    assert_problem(await client.get(path.format("org_a"), headers=MEMBER), 403)
    assert await guard.audit() == []


# -- who may -----------------------------------------------------------------------------------


ADMIN_ROUTES = [
    ("GET", PRICING),
    ("POST", PRICING),
    ("GET", f"{PRICING}/some-id"),
    ("PATCH", f"{PRICING}/some-id"),
    ("DELETE", f"{PRICING}/some-id"),
    ("GET", "/api/admin/usage"),
    ("GET", "/api/admin/organizations"),
    ("GET", "/api/admin/organizations/org_1"),
    ("GET", "/api/admin/organizations/org_1/balance-history"),
    ("POST", "/api/admin/organizations/org_1/grants"),
    ("GET", "/api/admin/organizations/org_1/subscription"),
    ("PUT", "/api/admin/organizations/org_1/subscription"),
    ("DELETE", "/api/admin/organizations/org_1/subscription"),
    ("GET", "/api/admin/organizations/org_1/auto-topup"),
    ("PUT", "/api/admin/organizations/org_1/auto-topup"),
    ("DELETE", "/api/admin/organizations/org_1/auto-topup"),
    ("GET", "/api/admin/organizations/org_1/members"),
    ("PUT", "/api/admin/organizations/org_1/members/some-member"),
    ("DELETE", "/api/admin/organizations/org_1/members/some-member"),
    ("GET", PLANS),
    ("POST", PLANS),
    ("GET", f"{PLANS}/some-plan"),
    ("PATCH", f"{PLANS}/some-plan"),
    ("DELETE", f"{PLANS}/some-plan"),
    *(
        [("GET", "/admin/feature-pricing"), ("GET", "/admin/organizations"), ("GET", "/admin/plans")]
        if HAS_PAGE
        else []
    ),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_admin_routes_refuse_anonymous_401_and_non_admins_403(
    client: httpx.AsyncClient, guard: CreditGuard, method: str, path: str
) -> None:
    before = await snapshot(guard)
    await guard.define_plan("some_plan", credits=10)
    ledger = await ledger_rows(guard)
    kwargs: dict[str, Any] = {"json": NEW} if method in ("POST", "PATCH", "PUT") else {}
    if path.endswith("/subscription") and method == "PUT":
        kwargs = {"json": {"plan_key": "some_plan"}}
    if path.endswith("/auto-topup") and method == "PUT":
        kwargs = {"json": {"below": 100, "credits": 500}}
    if "/members/" in path and method == "PUT":
        kwargs = {"json": {"credits": 10, "per": "day"}}
    path = path.replace("/some-plan", "/some_plan")
    assert_problem(await client.request(method, path, **kwargs), 401)
    assert_problem(await client.request(method, path, headers=MEMBER, **kwargs), 403)
    # Only exactly True counts: a truthy string is not an admin flag.
    assert_problem(await client.request(method, path, headers={"x-user": "truthy-string"}, **kwargs), 403)
    assert await snapshot(guard) == before
    assert await guard.list_plans() == [Plan("some_plan", "some_plan", 10, "month", 0)]
    assert await ledger_rows(guard) == ledger and await guard.subscription("org_1") is None
    assert await guard.auto_topup("org_1") is None
    assert await guard.list_member_limits("org_1") == []


async def test_user_may_be_an_object_and_is_admin_may_be_async(guard: CreditGuard) -> None:
    async with client_for(admin_app(guard)) as c:
        assert (await c.get(PRICING, headers={"x-user": "object-admin"})).status_code == 200

    async def only_bearer(request: Request) -> bool | None:
        token = request.headers.get("authorization")
        return None if token is None else token == "Bearer root"

    async with client_for(admin_app(guard, is_admin=only_bearer)) as c:
        assert (await c.get(PRICING, headers={"authorization": "Bearer root"})).status_code == 200
        assert_problem(await c.get(PRICING, headers={"authorization": "Bearer guest"}), 403)
        assert_problem(await c.get(PRICING, headers=ADMIN), 401)  # the default rule is replaced, not added to


# -- validation, and nothing written on a refusal --------------------------------------------


async def test_bodies_that_are_not_json_objects_are_400_or_415(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    before = await snapshot(guard)
    target = f"{PRICING}/{await id_of(guard, 'seedream_text_to_image')}"
    for method, path in (("POST", PRICING), ("PATCH", target)):
        json_header = {**ADMIN, "content-type": "application/json"}
        malformed = assert_problem(await client.request(method, path, content=b"{not json", headers=json_header), 400)
        assert "body" in malformed["errors"]
        array = assert_problem(await client.request(method, path, content=b"[1, 2]", headers=json_header), 400)
        assert array["errors"] == {"body": "must be a JSON object"}
        form = await client.request(method, path, data={"credits": "1"}, headers=ADMIN)
        assert "content-type" in assert_problem(form, 415)["errors"]
    assert await snapshot(guard) == before


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"feature_key", "feature_name", "category", "credits"}),
        ({**NEW, "feature_key": "Face Swap!", "credits": -1}, {"feature_key", "credits"}),
        ({**NEW, "credits": CREDITS_MAX + 1, "feature_name": "   "}, {"credits", "feature_name"}),
        ({**NEW, "credits": "8"}, {"credits"}),
        ({**NEW, "credits": True}, {"credits"}),
        ({**NEW, "price": 8, "category": "x" * 101}, {"price", "category"}),
        ({**NEW, "description": "x" * 2001, "is_active": "yes"}, {"description", "is_active"}),
        # Text PostgreSQL cannot store must be a 422, not an "outage" 503.
        ({**NEW, "feature_name": "a\x00b", "description": "\ud800"}, {"feature_name", "description"}),
    ],
)
async def test_invalid_create_is_422_naming_each_field_and_writes_nothing(
    client: httpx.AsyncClient, guard: CreditGuard, body: dict[str, Any], fields: set[str]
) -> None:
    before = await snapshot(guard)
    raw = json.dumps(body).encode()  # by hand: httpx cannot encode a lone surrogate, JSON's "\\ud800" can
    sent = await client.post(PRICING, content=raw, headers={**ADMIN, "content-type": "application/json"})
    problem = assert_problem(sent, 422)
    assert set(problem["errors"]) == fields
    assert await snapshot(guard) == before


async def test_invalid_update_is_422_and_changes_no_field(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    before = await snapshot(guard)
    target = f"{PRICING}/{await id_of(guard, 'seedream_text_to_image')}"
    # One good field next to bad ones: the good one must not land either.
    problem = assert_problem(
        await client.patch(target, json={"credits": 50, "feature_key": None, "pricing_id": "x"}, headers=ADMIN), 422
    )
    assert set(problem["errors"]) == {"feature_key", "pricing_id"}
    assert await snapshot(guard) == before
    assert (await guard.get_feature_pricing("seedream_text_to_image")).credits == 5  # type: ignore[union-attr]


async def test_duplicate_key_is_409_on_create_and_on_rename(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    before = await snapshot(guard)
    dup = {**NEW, "feature_key": "kling_image_to_video"}
    assert assert_problem(await client.post(PRICING, json=dup, headers=ADMIN), 409)["feature"] == "kling_image_to_video"
    target = f"{PRICING}/{await id_of(guard, 'seedream_text_to_image')}"
    rename = await client.patch(target, json={"feature_key": "kling_image_to_video", "credits": 1}, headers=ADMIN)
    assert "feature_key" in assert_problem(rename, 409)["errors"]
    assert await snapshot(guard) == before


async def test_unknown_id_is_404_everywhere(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    before = await snapshot(guard)
    missing = f"{PRICING}/00000000-0000-0000-0000-000000000000"
    for response in (
        await client.get(missing, headers=ADMIN),
        await client.patch(missing, json={"credits": 1}, headers=ADMIN),
        await client.delete(missing, headers=ADMIN),
    ):
        assert assert_problem(response, 404)["id"] == "00000000-0000-0000-0000-000000000000"
    assert await snapshot(guard) == before


async def test_storage_down_is_503_with_retry_after(db_url: str, tmp_path: Any) -> None:
    down = (
        f"sqlite+aiosqlite:///{tmp_path}/missing-dir/credits.db"
        if db_url.startswith("sqlite")
        else "postgresql+asyncpg://postgres@127.0.0.1:9/nowhere"
    )
    async with CreditGuard(down, timeout=2, retry_after=7) as broken, client_for(admin_app(broken)) as c:
        for response in (
            await c.get(PRICING, headers=ADMIN),
            await c.post(PRICING, json=NEW, headers=ADMIN),
            await c.get("/api/features/pricing", params={"key": "seedream_text_to_image"}),
        ):
            assert assert_problem(response, 503)
            assert response.headers["retry-after"] == "7"


# -- mounting ----------------------------------------------------------------------------------


async def test_mounted_under_a_tenant_prefix_with_the_host_apps_guard(guard: CreditGuard) -> None:
    host = Starlette(routes=[Mount("/{tenant}", admin_app())])
    host.state.credit_guard = guard
    async with client_for(host) as c:
        created = await c.post(f"/acme{PRICING}", json=NEW, headers=ADMIN)
        assert created.status_code == 201
        assert created.headers["location"].startswith(f"/acme{PRICING}/")
        assert (await c.get(created.headers["location"], headers=ADMIN)).json()["feature_key"] == "face_swap"
        assert (await c.get("/acme/api/features/pricing", params={"key": "face_swap"})).json()["credits"] == 8
        assert (await c.get("/acme/openapi.json")).json()["servers"] == [{"url": "/acme"}]
        if HAS_PAGE:
            page = await c.get("/acme/admin/feature-pricing", headers=ADMIN)
            assert page.status_code == 200
            # Issue 23: the pricing page links to the organizations page, under the same prefix.
            assert '<a href="/acme/admin/organizations" aria-label="Organizations">' in page.text
            assert (await c.get("/acme/admin/organizations", headers=ADMIN)).status_code == 200
            # The plans page too, linked from the others, under the same prefix.
            assert '<a href="/acme/admin/plans">Plans</a>' in page.text
            plans_page = await c.get("/acme/admin/plans", headers=ADMIN)
            assert plans_page.status_code == 200 and 'data-base="/acme"' in plans_page.text
            assert "script-src 'self'" in plans_page.headers["content-security-policy"]
            assert (await c.get("/acme/admin/plans", headers=MEMBER)).status_code == 403


async def test_mounted_in_fastapi_next_to_its_routes(guard: CreditGuard) -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    app.mount("/", admin_app(openapi_path="/api/admin/openapi.json"))
    app.state.credit_guard = guard
    async with client_for(app) as c:
        assert (await c.get("/v1/items/3")).json() == {"item_id": 3}
        assert (await c.post(PRICING, json=NEW, headers=ADMIN)).status_code == 201
        assert len((await c.get(PRICING, headers=ADMIN)).json()) == len(PRICES) + 1
        assert_problem(await c.get(PRICING, headers=MEMBER), 403)
        assert (await c.get("/api/admin/openapi.json")).json()["info"]["title"].startswith("credit_guard")
        assert "/v1/items/{item_id}" in (await c.get("/openapi.json")).json()["paths"]  # FastAPI's own, untouched


async def test_mounted_in_litestar_under_a_router_prefix(guard: CreditGuard) -> None:
    from typing import Annotated

    from litestar import Litestar, Router, get

    from credit_guard.admin.litestar import admin_handlers

    @get("/v1/items/{item_id:int}")
    async def item(item_id: Annotated[int, Parameter()]) -> dict[str, int]:
        return {"item_id": item_id}

    app = Litestar([item, Router("/acme", route_handlers=admin_handlers())])
    app.state.credit_guard = guard
    async with client_for(app) as c:
        assert (await c.get("/v1/items/3")).json() == {"item_id": 3}
        created = await c.post(f"/acme{PRICING}", json=NEW, headers=ADMIN)
        assert created.status_code == 201 and created.headers["location"].startswith(f"/acme{PRICING}/")
        assert (await c.patch(created.headers["location"], json={"credits": 2}, headers=ADMIN)).json()["credits"] == 2
        assert (await c.get("/acme/api/features/pricing", params={"key": "face_swap"})).json()["credits"] == 2
        assert_problem(await c.get(f"/acme{PRICING}"), 401)
        assert (await c.get("/acme/openapi.json")).json()["servers"] == [{"url": "/acme"}]


# -- OpenAPI -----------------------------------------------------------------------------------


async def test_openapi_document_is_valid_and_describes_every_route(client: httpx.AsyncClient) -> None:
    from openapi_spec_validator import validate

    served = (await client.get("/openapi.json")).json()
    validate(served)
    documented = {
        (path, method.upper()) for path, item in served["paths"].items() for method in item if method != "parameters"
    }
    routed = {
        (
            path.replace("/some-id", "/{pricing_id}")
            .replace("/org_1", "/{organization_id}")
            .replace("/some-plan", "/{plan_key}")
            .replace("/some-member", "/{member}"),
            method,
        )
        for method, path in ADMIN_ROUTES
    }
    assert documented == routed | {("/api/features/pricing", "GET")}
    create = served["components"]["schemas"]["FeaturePricingCreate"]
    assert create["properties"]["credits"]["maximum"] == CREDITS_MAX and create["additionalProperties"] is False
    validate(openapi_document(include_page=False))


# -- the example apps --------------------------------------------------------------------------


@pytest.fixture(params=["fastapi_app", "litestar_app"])
def example(request: pytest.FixtureRequest, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    async def reset() -> None:
        async with CreditGuard(db_url) as g:
            await g.create_schema()
            if g.engine.dialect.name == "postgresql":
                await reset_postgres(g)

    anyio.run(reset)
    monkeypatch.setenv("CREDIT_GUARD_DATABASE_URL", db_url)
    module: Any = importlib.reload(importlib.import_module(f"examples.{request.param}.app"))
    with TestClient(module.app) as c:
        yield c


def test_example_apps_serve_the_admin_api_to_the_demo_admin(example: TestClient) -> None:
    listed = example.get(PRICING, headers={"X-API-Key": "demo-key-admin"})
    assert listed.status_code == 200 and "seedream_text_to_image" in {p["feature_key"] for p in listed.json()}
    assert example.get(PRICING, headers={"X-API-Key": "demo-key-rich"}).status_code == 403
    assert example.get(PRICING).status_code == 401
    public = example.get("/api/features/pricing", params={"key": "seedream_text_to_image"})
    assert public.json()["credits"] == 5
    # The guarded API next to it still works.
    assert example.post("/v1/images", json={"prompt": "x"}, headers={"X-API-Key": "demo-key-rich"}).status_code in (
        200,
        201,
    )


async def test_hostile_edge_inputs_get_4xx_not_500(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    before = await snapshot(guard)
    trailing_newline = await client.post(PRICING, json={**NEW, "feature_key": "face_swap\n"}, headers=ADMIN)
    assert "feature_key" in assert_problem(trailing_newline, 422)["errors"]
    nested = await client.post(PRICING, content=b"[" * 100_000, headers={**ADMIN, "content-type": "application/json"})
    assert_problem(nested, 400)
    for bound in ("9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+05:00"):
        r = await client.get(USAGE, params={"since": bound}, headers=ADMIN)
        assert "since" in assert_problem(r, 422)["errors"]
    assert await snapshot(guard) == before


# -- organizations -------------------------------------------------------------------------


async def test_operator_finds_an_organization_reads_its_credits_and_grants_once(
    client: httpx.AsyncClient, guard: CreditGuard
) -> None:
    from datetime import UTC, datetime, timedelta

    await guard.grant_credits("org_1", 30, reason="plan", expires_at=datetime.now(UTC) + timedelta(days=30))
    await guard.grant_credits("org_10", 5)
    await guard.grant_credits("other", 5)
    assert (await guard.reserve("org_1", "kling_image_to_video", job_id="vid_9", ttl=600)).success
    found = (await client.get("/api/admin/organizations", params={"q": "org_1"}, headers=ADMIN)).json()
    assert found == {
        "organizations": [{"organization_id": "org_1", "balance": 10}, {"organization_id": "org_10", "balance": 5}]
    }
    wildcard = (await client.get("/api/admin/organizations", params={"q": "org%"}, headers=ADMIN)).json()
    assert wildcard == {"organizations": []}  # typed text, not a LIKE pattern
    detail = (await client.get("/api/admin/organizations/org_1", headers=ADMIN)).json()
    assert (detail["balance"], detail["overdraft"]) == (10, {"limit": 0, "owed": 0})
    assert [(g["reason"], g["remaining"], g["amount"]) for g in detail["grants"]] == [("plan", 10, 30)]
    assert [(r["job_id"], r["credits"]) for r in detail["reservations"]] == [("vid_9", 20)]
    assert [(e["kind"], e["amount"]) for e in detail["ledger"]] == [("charge", -20), ("grant", 30)]
    assert_problem(await client.get("/api/admin/organizations/nobody", headers=ADMIN), 404)

    body = {"amount": 25, "reason": "support credit", "expires_at": "2999-01-01T00:00:00Z"}
    keyed = {**ADMIN, "Idempotency-Key": "ticket-4711"}
    for _ in range(2):  # a double click grants once
        granted = await client.post("/api/admin/organizations/org_1/grants", json=body, headers=keyed)
        assert (granted.status_code, granted.json()) == (201, {"organization_id": "org_1", "balance": 35})
    assert await guard.get_balance("org_1") == 35
    naive = await client.post(
        "/api/admin/organizations/org_1/grants", json={**body, "expires_at": "2999-01-01T00:00"}, headers=ADMIN
    )
    assert "timezone" in assert_problem(naive, 422)["errors"]["expires_at"]
    past = await client.post(
        "/api/admin/organizations/org_1/grants", json={**body, "expires_at": "2001-01-01T00:00:00Z"}, headers=ADMIN
    )
    assert "has passed" in assert_problem(past, 422)["detail"]
    for bad in ({"amount": 0}, {"amount": 2.5}, {"amount": "5"}, {"amount": 5, "extra": 1}, {"amount": True}):
        assert_problem(await client.post("/api/admin/organizations/org_1/grants", json=bad, headers=ADMIN), 422)
    assert await guard.get_balance("org_1") == 35
    assert await guard.audit() == []


# -- plans -----------------------------------------------------------------------------------

SUBSCRIPTION = "/api/admin/organizations/{}/subscription"
PRO = {"plan_key": "pro", "credits": 1000, "rollover": 500, "name": "Pro"}


async def plans_snapshot(guard: CreditGuard) -> list[tuple[Plan, int]]:
    return await guard.store.list_plans()


async def test_plans_crud_round_trip(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    assert (await client.get(PLANS, headers=ADMIN)).json() == []
    created = await client.post(PLANS, json=PRO, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json() == {**PRO, "period": "month", "subscribers": 0}
    assert created.headers["location"] == f"{PLANS}/pro" and created.headers["cache-control"] == "no-store"
    assert await guard.get_plan("pro") == Plan("pro", "Pro", 1000, "month", 500)
    assert (await client.get(created.headers["location"], headers=ADMIN)).json() == created.json()

    # defaults: a monthly plan named by its key, whose unused credits reset
    basic = await client.post(PLANS, json={"plan_key": "basic", "credits": 100, "name": "  Basic  "}, headers=ADMIN)
    assert basic.json() == {
        "plan_key": "basic",
        "name": "Basic",
        "credits": 100,
        "period": "month",
        "rollover": 0,
        "subscribers": 0,
    }
    daily = await client.post(PLANS, json={"plan_key": "daily", "credits": 5, "period": "day"}, headers=ADMIN)
    assert (daily.json()["name"], daily.json()["period"]) == ("daily", "day")

    # an edit changes only what it names; null rollover carries everything, null name is the key
    patched = await client.patch(f"{PLANS}/pro", json={"credits": 1200, "rollover": None}, headers=ADMIN)
    assert patched.status_code == 200
    assert patched.json() == {**PRO, "credits": 1200, "rollover": None, "period": "month", "subscribers": 0}
    renamed = await client.patch(f"{PLANS}/pro", json={"name": None, "period": "year"}, headers=ADMIN)
    assert (renamed.json()["name"], renamed.json()["period"]) == ("pro", "year")
    assert await guard.get_plan("pro") == Plan("pro", "pro", 1200, "year", None)
    assert (await client.patch(f"{PLANS}/pro", json={}, headers=ADMIN)).json() == renamed.json()

    listed = (await client.get(PLANS, headers=ADMIN)).json()
    assert [p["plan_key"] for p in listed] == ["basic", "daily", "pro"]  # by key

    deleted = await client.delete(f"{PLANS}/daily", headers=ADMIN)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert assert_problem(await client.get(f"{PLANS}/daily", headers=ADMIN), 404)["plan_key"] == "daily"
    assert_problem(await client.delete(f"{PLANS}/daily", headers=ADMIN), 404)
    assert [p.plan_key for p in await guard.list_plans()] == ["basic", "pro"]


async def test_plan_refusals_name_each_field_and_change_nothing(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    await guard.define_plan("pro", credits=1000, rollover=500, name="Pro")
    before = await plans_snapshot(guard)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {"plan_key", "credits"}),
        ({"plan_key": "Pro Plan", "credits": 0}, {"plan_key", "credits"}),
        ({**PRO, "plan_key": "x" * 65, "period": "fortnight"}, {"plan_key", "period"}),
        ({**PRO, "plan_key": "new", "credits": 2.5, "rollover": -1}, {"credits", "rollover"}),
        ({**PRO, "plan_key": "new", "credits": "10", "rollover": True}, {"credits", "rollover"}),
        ({**PRO, "plan_key": "new", "credits": 2**53, "name": "   "}, {"credits", "name"}),
        ({**PRO, "plan_key": "new", "name": "a\nb", "subscribers": 3}, {"name", "subscribers"}),
        ({**PRO, "plan_key": "new", "name": "x" * 201, "period": None}, {"name", "period"}),
    ]
    for body, fields in cases:
        problem = assert_problem(await client.post(PLANS, json=body, headers=ADMIN), 422)
        assert set(problem["errors"]) == fields, body
    raw = json.dumps({**PRO, "plan_key": "new", "name": "\ud800"}).encode()  # a lone surrogate: 422, not a 503
    sent = await client.post(PLANS, content=raw, headers={**ADMIN, "content-type": "application/json"})
    assert set(assert_problem(sent, 422)["errors"]) == {"name"}
    duplicate = assert_problem(await client.post(PLANS, json={**PRO, "credits": 1}, headers=ADMIN), 409)
    assert duplicate["errors"] == {"plan_key": "already exists"} and duplicate["plan_key"] == "pro"

    # an edit: the key cannot change, a bad field lands nothing (not even the good one next to it)
    rename = assert_problem(await client.patch(f"{PLANS}/pro", json={"plan_key": "max"}, headers=ADMIN), 422)
    assert "cannot be changed" in rename["errors"]["plan_key"]
    mixed = assert_problem(
        await client.patch(f"{PLANS}/pro", json={"credits": 5, "rollover": "all"}, headers=ADMIN), 422
    )
    assert list(mixed["errors"]) == ["rollover"]
    assert set(
        assert_problem(await client.patch(f"{PLANS}/pro", json={"credits": None}, headers=ADMIN), 422)["errors"]
    ) == {"credits"}
    for missing in ("nope", "Not A Key", "x" * 300):
        assert_problem(await client.patch(f"{PLANS}/{missing}", json={"credits": 5}, headers=ADMIN), 404)
        assert_problem(await client.get(f"{PLANS}/{missing}", headers=ADMIN), 404)
        assert_problem(await client.delete(f"{PLANS}/{missing}", headers=ADMIN), 404)
    assert "plan_key" in assert_problem(await client.get(f"{PLANS}/a%00", headers=ADMIN), 422)["errors"]

    json_header = {**ADMIN, "content-type": "application/json"}
    for method, path in (("POST", PLANS), ("PATCH", f"{PLANS}/pro")):
        assert_problem(await client.request(method, path, content=b"{not json", headers=json_header), 400)
        assert_problem(await client.request(method, path, content=b"[1]", headers=json_header), 400)
        assert_problem(await client.request(method, path, data={"credits": "1"}, headers=ADMIN), 415)
    assert await plans_snapshot(guard) == before


async def test_an_organizations_plan_through_the_api_moves_exactly_what_the_ledger_shows(
    client: httpx.AsyncClient, guard: CreditGuard, caplog: pytest.LogCaptureFixture
) -> None:
    await guard.define_plan("pro", credits=1000, rollover=500, name="Pro")
    await guard.define_plan("max", credits=3000, rollover=None, name="Max")
    path = SUBSCRIPTION.format("acme")
    none = assert_problem(await client.get(path, headers=ADMIN), 404)
    assert none["type"] == "urn:credit-guard:problem:no-subscription" and none["organization_id"] == "acme"

    # subscribe: the period under way is granted at once, as one grant row
    caplog.set_level("INFO", logger="credit_guard.admin")
    subscribed = await client.put(path, json={"plan_key": "pro"}, headers=ADMIN)
    assert subscribed.status_code == 201, subscribed.text
    sub = await guard.subscription("acme")
    assert sub is not None
    assert subscribed.json() == {
        **sub.to_dict(),
        "plan": {"plan_key": "pro", "name": "Pro", "credits": 1000, "period": "month", "rollover": 500},
    }
    body = subscribed.json()
    assert (body["period"], body["period_start"], body["renews_at"]) == (
        0,
        sub.anchor.isoformat(),
        sub.renews_at.isoformat(),  # the next renewal
    )
    assert await guard.get_balance("acme") == 1000
    rows = await ledger_rows(guard, "acme")
    assert [(r["kind"], r["amount"]) for r in rows] == [("grant", 1000)]
    assert str(rows[0]["idempotency_key"]).startswith("plan:")
    assert "credit_guard admin: subscribed acme to plan pro" in caplog.text
    assert (await client.get(path, headers=ADMIN)).json() == body

    # again: nothing changes (a retry, a double click)
    again = await client.put(path, json={"plan_key": "pro", "on_change": "keep"}, headers=ADMIN)
    assert (again.status_code, again.json()) == (200, body)
    assert await ledger_rows(guard, "acme") == rows
    listed = {p["plan_key"]: p["subscribers"] for p in (await client.get(PLANS, headers=ADMIN)).json()}
    assert listed == {"max": 0, "pro": 1}
    assert (await client.get(f"{PLANS}/pro", headers=ADMIN)).json()["subscribers"] == 1

    # a plan with subscribers keeps its period and cannot be deleted; other edits are fine
    period = assert_problem(
        await client.patch(f"{PLANS}/pro", json={"period": "day", "credits": 1}, headers=ADMIN), 409
    )
    assert list(period["errors"]) == ["period"]
    assert await guard.get_plan("pro") == Plan("pro", "Pro", 1000, "month", 500)
    same_period = await client.patch(f"{PLANS}/pro", json={"period": "month", "credits": 900}, headers=ADMIN)
    assert same_period.status_code == 200 and same_period.json()["credits"] == 900
    assert await guard.get_balance("acme") == 1000  # the period under way is not changed under the user
    in_use = assert_problem(await client.delete(f"{PLANS}/pro", headers=ADMIN), 409)
    assert in_use["type"] == "urn:credit-guard:problem:plan-in-use"

    # a change of plan: the old allowance written off (the default), the new one granted
    moved = await client.put(path, json={"plan_key": "max"}, headers=ADMIN)
    assert moved.status_code == 200 and moved.json()["plan"]["plan_key"] == "max"
    assert await guard.get_balance("acme") == 3000
    new_rows = (await ledger_rows(guard, "acme"))[len(rows) :]
    assert [(r["kind"], r["amount"]) for r in new_rows] == [("expiry", -1000), ("grant", 3000)]
    assert "moved acme from plan pro to max (old credits written off)" in caplog.text

    # back, keeping max's credits to their end
    kept = await client.put(path, json={"plan_key": "pro", "on_change": "keep"}, headers=ADMIN)
    assert kept.status_code == 200 and kept.json()["plan"]["credits"] == 900
    assert await guard.get_balance("acme") == 3900

    # end it: the period under way written off on request (expire), the kept max credits stay
    ended = await client.delete(path, params={"on_change": "expire"}, headers=ADMIN)
    assert (ended.status_code, ended.content) == (204, b"")
    assert await guard.get_balance("acme") == 3000
    assert await guard.subscription("acme") is None
    assert "ended acme's plan pro (credits written off)" in caplog.text
    assert_problem(await client.get(path, headers=ADMIN), 404)
    assert_problem(await client.delete(path, headers=ADMIN), 404)
    all_rows = await ledger_rows(guard, "acme")
    assert sum(int(str(r["amount"])) for r in all_rows) == await guard.get_balance("acme")
    assert [(r["kind"], r["amount"]) for r in all_rows[len(rows) + 2 :]] == [("grant", 900), ("expiry", -900)]
    assert (await client.delete(f"{PLANS}/pro", headers=ADMIN)).status_code == 204
    assert await guard.audit() == []


async def test_subscription_refusals_move_nothing(client: httpx.AsyncClient, guard: CreditGuard) -> None:
    await guard.define_plan("pro", credits=1000)
    path = SUBSCRIPTION.format("acme")
    ledger = await ledger_rows(guard)
    for body, fields in [
        ({}, {"plan_key"}),
        ({"plan_key": "Pro"}, {"plan_key"}),
        ({"plan_key": 5, "on_change": "drop"}, {"plan_key", "on_change"}),
        ({"plan_key": "pro", "anchor": "2030-01-01T00:00:00Z"}, {"anchor"}),
    ]:
        assert set(assert_problem(await client.put(path, json=body, headers=ADMIN), 422)["errors"]) == fields, body
    unknown = assert_problem(await client.put(path, json={"plan_key": "nope"}, headers=ADMIN), 404)
    assert unknown["type"] == "urn:credit-guard:problem:plan-not-found" and "plan_key" in unknown["errors"]
    assert_problem(await client.put(path, data={"plan_key": "pro"}, headers=ADMIN), 415)
    assert_problem(await client.put(path, content=b"[]", headers={**ADMIN, "content-type": "application/json"}), 400)
    bad = assert_problem(await client.delete(path, params={"on_change": "later"}, headers=ADMIN), 422)
    assert list(bad["errors"]) == ["on_change"]
    too_long = assert_problem(
        await client.put(SUBSCRIPTION.format("x" * 256), json={"plan_key": "pro"}, headers=ADMIN), 422
    )
    assert list(too_long["errors"]) == ["organization_id"]
    assert_problem(await client.put(path, json={"plan_key": "pro"}, headers=MEMBER), 403)
    assert await ledger_rows(guard) == ledger and await guard.subscription("acme") is None
