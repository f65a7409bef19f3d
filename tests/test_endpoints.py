"""The credit endpoints (balance, check, grants, usage, the widget), in-process, mounted in
Starlette, FastAPI and Litestar.

Every answer here is also held against the OpenAPI document the app serves (``conforms``):
the fuzzing in ``test_fuzz_api.py`` cannot reach a 503, a missing guard or a wrong method.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from litestar import Litestar, asgi
from litestar.datastructures import State
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_guard import CreditGuard, credit_endpoints
from credit_guard._clock import reset_travel, travel, utcnow
from credit_guard._endpoints import WIDGET_FILE, openapi_document
from credit_guard.admin import openapi_document as admin_openapi_document
from credit_guard.models import FEATURE_KEY_MAX, FEATURE_KEY_RE
from credit_guard.problems import TYPE_FEATURE_NOT_FOUND, TYPE_INVALID_REQUEST, TYPE_NO_ORGANIZATION, TYPE_UNAVAILABLE

from .conftest import ledger_rows
from .helpers import client
from .test_middleware import ORG, DemoAuth
from .test_outage import Outage

pytestmark = pytest.mark.anyio

PREFIX = "/api/credits"
DOCUMENT = openapi_document(server_url=PREFIX)
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def starlette_app(guard: CreditGuard) -> ASGIApp:
    app = Starlette(routes=[Mount(PREFIX, credit_endpoints())])
    app.state.credit_guard = guard  # found per request, as an app sets it in its lifespan
    return DemoAuth(app)


def fastapi_app(guard: CreditGuard) -> ASGIApp:
    app = FastAPI()
    app.mount(PREFIX, credit_endpoints(guard))
    return DemoAuth(app)


def litestar_app(guard: CreditGuard) -> ASGIApp:
    endpoints = credit_endpoints()

    @asgi(PREFIX, is_mount=True, copy_scope=True)
    async def credits(scope: Scope, receive: Receive, send: Send) -> None:
        await endpoints(scope, receive, send)

    return DemoAuth(Litestar([credits], state=State({"credit_guard": guard})))  # type: ignore[arg-type]


APPS = {"starlette": starlette_app, "fastapi": fastapi_app, "litestar": litestar_app}


@pytest.fixture(params=list(APPS))
def build(request: pytest.FixtureRequest) -> Any:
    return APPS[request.param]


def problem(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert (r.headers["content-type"], r.headers["cache-control"]) == ("application/problem+json", "no-store")
    body: dict[str, Any] = r.json()
    assert (body["status"], body["type"]) == (status, type_)
    return body


def conforms(r: httpx.Response) -> None:
    """The answer is one the served document promises for its request: status, content
    type, headers (Retry-After on a 503, X-Credits-Remaining on a 200) and body."""
    schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({}))
    path = r.request.url.path.removeprefix(PREFIX).rstrip("/")
    operation = schema.find_operation_by_label(f"{r.request.method} {path}")
    assert operation is not None, f"{r.request.method} {path} is not in the document"
    try:
        operation.Case(query=dict(r.request.url.params)).validate_response(r, checks=CONFORMANCE)
    except FailureGroup as exc:  # an exception group escaping an anyio test is reported badly
        raise AssertionError(str(exc)) from None


async def test_balance_and_check_answer_for_the_signed_in_organization(guard: CreditGuard, build: Any) -> None:
    await guard.grant_credits("org_1", 12)
    await guard.grant_credits("org_other", 500)
    async with client(build(guard)) as c:
        balance = await c.get(f"{PREFIX}/balance", headers=ORG)
        enough = await c.get(f"{PREFIX}/check", params={"feature": "seedream_text_to_image"}, headers=ORG)
        short = await c.get(f"{PREFIX}/check/", params={"feature": "kling_image_to_video"}, headers=ORG)
    assert balance.json() == {"organization_id": "org_1", "credits": 12}
    assert (balance.headers["x-credits-remaining"], balance.headers["cache-control"]) == ("12", "no-store")
    assert enough.json() == {"feature": "seedream_text_to_image", "has_enough": True, "required": 5, "available": 12}
    assert short.json() == {"feature": "kling_image_to_video", "has_enough": False, "required": 20, "available": 12}
    for r in (balance, enough, short):
        conforms(r)
    assert await guard.get_balance("org_1") == 12  # a check reserves nothing
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant"]


async def test_unknown_organization_has_zero_credits(guard: CreditGuard, build: Any) -> None:
    async with client(build(guard)) as c:
        r = await c.get(f"{PREFIX}/balance", headers={"x-org": "org_new"})
    assert r.json() == {"organization_id": "org_new", "credits": 0}


async def test_refusals_are_problem_json(guard: CreditGuard, build: Any) -> None:
    async with client(build(guard)) as c:
        anonymous_balance = await c.get(f"{PREFIX}/balance")
        anonymous_check = await c.get(f"{PREFIX}/check", params={"feature": "seedream_text_to_image"})
        missing = await c.get(f"{PREFIX}/check", headers=ORG)
        invalid = await c.get(f"{PREFIX}/check", params={"feature": "Robert'); DROP"}, headers=ORG)
        too_long = await c.get(f"{PREFIX}/check", params={"feature": "a" * (FEATURE_KEY_MAX + 1)}, headers=ORG)
        twice = await c.get(
            f"{PREFIX}/check",
            params=[("feature", "no_such_feature"), ("feature", "seedream_text_to_image")],
            headers=ORG,
        )
        unknown = await c.get(f"{PREFIX}/check", params={"feature": "no_such_feature"}, headers=ORG)
        inactive = await c.get(f"{PREFIX}/check", params={"feature": "retired_feature"}, headers=ORG)
    for anonymous in (anonymous_balance, anonymous_check):
        detail = problem(anonymous, 401, TYPE_NO_ORGANIZATION)["detail"]
        assert "Sign in" in detail and "paid" not in detail  # reading credits costs nothing
    assert problem(missing, 400, TYPE_INVALID_REQUEST)["errors"] == {"feature": "required query parameter"}
    assert list(problem(invalid, 400, TYPE_INVALID_REQUEST)["errors"]) == ["feature"]
    assert list(problem(too_long, 400, TYPE_INVALID_REQUEST)["errors"]) == ["feature"]
    # Which one was meant? Neither is answered, not even the valid last one.
    assert problem(twice, 400, TYPE_INVALID_REQUEST)["errors"] == {"feature": "given more than once"}
    assert problem(unknown, 404, TYPE_FEATURE_NOT_FOUND)["feature"] == "no_such_feature"
    assert problem(inactive, 404, TYPE_FEATURE_NOT_FOUND)["feature"] == "retired_feature"
    for r in (anonymous_balance, anonymous_check, missing, invalid, too_long, unknown, inactive):
        conforms(r)


async def test_unknown_paths_and_methods_are_problem_json_too(guard: CreditGuard, build: Any) -> None:
    """Outside the document (an OpenAPI document cannot list what is not there): a 404 or a
    405 with ``Allow``, as problem+json of RFC 9457's generic type, never text/plain."""
    async with client(build(guard)) as c:
        wrong_path = await c.get(f"{PREFIX}/nope", headers=ORG)
        wrong_path_head = await c.head(f"{PREFIX}/balance/more", headers=ORG)
        wrong_methods = [
            await c.request(method, f"{PREFIX}{path}", headers=ORG)
            for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS")
            for path in ("/balance", "/check", "/grants", "/usage", "/openapi.json", "/widget.js")
        ]
    body = problem(wrong_path, 404, "about:blank")
    assert body["title"] == "Not Found"
    for listed in ("/balance", "/check", "/grants", "/usage", "/openapi.json", "/widget.js"):
        assert listed in body["detail"]
    assert (wrong_path_head.status_code, wrong_path_head.headers["content-type"]) == (404, "application/problem+json")
    for r in wrong_methods:
        assert problem(r, 405, "about:blank")["title"] == "Method Not Allowed", r.request
        assert r.headers["allow"] == "GET, HEAD"
    assert await guard.get_balance("org_1") == 0  # no method reaches the books


async def test_head_answers_as_get_without_a_body(guard: CreditGuard, build: Any) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(build(guard)) as c:
        pairs = [
            (
                await c.get(f"{PREFIX}{path}", params=params, headers=headers),
                await c.head(f"{PREFIX}{path}", params=params, headers=headers),
            )
            for path, params, headers in [
                ("/balance", {}, ORG),
                ("/check", {"feature": "kling_image_to_video"}, ORG),
                ("/check", {"feature": "retired_feature"}, ORG),
                ("/check", {}, ORG),
                ("/balance", {}, {}),
                ("/grants", {}, ORG),
                ("/usage", {"days": "7"}, ORG),
                ("/usage", {"days": "0"}, ORG),
                ("/usage", {}, {}),
            ]
        ]
    for get, head in pairs:
        assert head.status_code == get.status_code, head.request
        assert head.content == b""
        same = ("content-type", "content-length", "cache-control", "x-credits-remaining")
        assert {h: head.headers.get(h) for h in same} == {h: get.headers.get(h) for h in same}
        conforms(head)
    assert [get.status_code for get, _ in pairs] == [200, 200, 404, 400, 401, 200, 200, 422, 401]


async def test_openapi_document_is_valid_and_served_below_the_mount(guard: CreditGuard, build: Any) -> None:
    from openapi_spec_validator import validate

    async with client(build(guard)) as c:
        served = await c.get(f"{PREFIX}/openapi.json")  # public: no organization needed
        head = await c.head(f"{PREFIX}/openapi.json")
    assert (served.status_code, head.status_code) == (200, 200)
    document = served.json()
    validate(document)
    assert document == DOCUMENT  # relative to the mount point, whichever framework mounts it
    assert document["servers"] == [{"url": PREFIX}]
    assert {path: sorted(item) for path, item in document["paths"].items()} == {
        "/balance": ["get", "head"],
        "/check": ["get", "head"],
        "/grants": ["get", "head"],
        "/usage": ["get", "head"],
    }
    (days,) = document["paths"]["/usage"]["get"]["parameters"]
    assert (days["name"], days["required"], days["schema"]) == (
        "days",
        False,
        {"type": "integer", "minimum": 1, "maximum": 366, "default": 30},
    )
    # The limits a client reads are the ones the code checks, and problems look as in the admin API.
    (feature,) = document["paths"]["/check"]["get"]["parameters"]
    assert (feature["name"], feature["in"], feature["required"]) == ("feature", "query", True)
    assert (feature["schema"]["pattern"], feature["schema"]["maxLength"]) == (FEATURE_KEY_RE.pattern, FEATURE_KEY_MAX)
    problem_schema = admin_openapi_document()["components"]["schemas"]["Problem"]
    assert document["components"]["schemas"]["Problem"] == problem_schema
    assert document["components"]["responses"]["503"]["headers"]["Retry-After"]["required"] is True


async def test_endpoints_use_the_guards_organization_resolver(guard: CreditGuard) -> None:
    """The same rule as charging: a custom resolver decides, and request state is ignored."""

    def from_tenant_header(conn: HTTPConnection) -> str | None:
        return conn.headers.get("x-tenant")

    guard.organization_resolver = from_tenant_header
    await guard.grant_credits("org_tenant", 7)
    async with client(starlette_app(guard)) as c:
        by_tenant = await c.get(f"{PREFIX}/balance", headers={"x-tenant": "org_tenant"})
        by_state_only = await c.get(f"{PREFIX}/balance", headers=ORG)
        too_long = await c.get(f"{PREFIX}/balance", headers={"x-tenant": "t" * 256})
    assert by_tenant.json() == {"organization_id": "org_tenant", "credits": 7}
    assert by_state_only.status_code == 401
    assert too_long.status_code == 401 and "255 characters" in too_long.json()["detail"]


async def test_missing_guard_is_a_configuration_error() -> None:
    app = Starlette(routes=[Mount(PREFIX, credit_endpoints())])
    async with client(DemoAuth(app)) as c:
        r = await c.get(f"{PREFIX}/balance", headers=ORG)
        document = await c.get(f"{PREFIX}/openapi.json")
    assert r.status_code == 500
    assert document.json() == DOCUMENT  # the document needs no guard


async def test_database_down_answers_503_with_retry_after(db_url: str) -> None:
    async with Outage(db_url) as o, CreditGuard(db_url) as direct:
        await direct.create_schema()
        async with CreditGuard(o.url, timeout=0.5, retry_after=9) as guard:
            async with client(starlette_app(guard)) as c:
                await o.down()
                r = await c.get(f"{PREFIX}/balance", headers=ORG)
                await o.up()
                again = await c.get(f"{PREFIX}/balance", headers=ORG)
    if db_url.startswith("sqlite"):
        # SQLite's "outage" is another process holding the write lock: in WAL mode a read
        # never waits for it, so the balance is still answered (charges are what wait).
        assert (r.status_code, again.status_code) == (200, 200)
        return
    problem(r, 503, TYPE_UNAVAILABLE)
    assert r.headers["retry-after"] == "9"
    conforms(r)
    assert again.status_code == 200


# -- grants and usage -----------------------------------------------------------------------


async def test_grants_are_the_live_ones_in_spending_order(guard: CreditGuard, build: Any) -> None:
    """Lowest priority first, then the soonest expiry, never-expiring last; a spent grant,
    an expired one and another organization's are left out."""
    now = utcnow().replace(microsecond=0)
    in_days = [now + timedelta(days=n) for n in (5, 10, 100)]
    await guard.grant_credits("org_1", 50, reason="welcome")
    await guard.grant_credits("org_1", 30, reason="promo", expires_at=in_days[1])
    await guard.grant_credits("org_1", 20, expires_at=in_days[0])
    await guard.grant_credits("org_1", 40, reason="<b>pack</b>", expires_at=in_days[2], priority=-1)
    await guard.grant_credits("org_1", 5, reason="spent", priority=-5)
    await guard.grant_credits("org_1", 10, reason="gone by then", expires_at=now + timedelta(hours=1))
    await guard.grant_credits("org_other", 999, reason="not yours", expires_at=in_days[0])
    charged = await guard.deduct_credits("org_1", "seedream_text_to_image")  # takes the priority -5 grant
    assert charged.success and charged.remaining_credits == 150
    travel(timedelta(hours=2))  # the 10 expire
    try:
        async with client(build(guard)) as c:
            r = await c.get(f"{PREFIX}/grants", headers=ORG)
            other = await c.get(f"{PREFIX}/grants", headers={"x-org": "org_other"})
            nobody = await c.get(f"{PREFIX}/grants", headers={"x-org": "org_never"})
            anonymous = await c.get(f"{PREFIX}/grants")
    finally:
        reset_travel()
    assert (r.status_code, r.headers["x-credits-remaining"], r.headers["cache-control"]) == (200, "140", "no-store")
    body = r.json()
    assert body["organization_id"] == "org_1"
    seen = [
        (g["amount"], g["remaining"], g["expires_at"] and datetime.fromisoformat(g["expires_at"]), g["reason"])
        for g in body["grants"]
    ]
    assert seen == [
        (40, 40, in_days[2], "<b>pack</b>"),
        (20, 20, in_days[0], None),
        (30, 30, in_days[1], "promo"),
        (50, 50, None, "welcome"),
    ]
    assert [g["priority"] for g in body["grants"]] == [-1, 0, 0, 0]
    assert all(g["expires_at"] is None or g["expires_at"].endswith("+00:00") for g in body["grants"])
    assert sum(g["remaining"] for g in body["grants"]) == 140  # the balance, two hours on
    assert [g["amount"] for g in other.json()["grants"]] == [999]
    assert nobody.json() == {"organization_id": "org_never", "grants": []}
    problem(anonymous, 401, TYPE_NO_ORGANIZATION)
    for answer in (r, other, nobody, anonymous):
        conforms(answer)


async def charge(guard: CreditGuard, org: str, feature: str) -> int:
    result = await guard.deduct_credits(org, feature)
    assert result.success and result.charge_id is not None, result
    return result.charge_id


async def test_usage_by_day_and_feature_is_what_the_ledger_says(guard: CreditGuard, build: Any) -> None:
    image, video = "seedream_text_to_image", "kling_image_to_video"
    await guard.grant_credits("org_1", 200)
    await guard.grant_credits("org_other", 200)
    first = utcnow().date()
    refunded_later = await charge(guard, "org_1", image)
    await charge(guard, "org_1", image)
    await charge(guard, "org_1", video)
    await charge(guard, "org_other", video)
    travel(timedelta(days=1))  # the ledger's created_at follows this clock
    try:
        second = utcnow().date()
        await charge(guard, "org_1", image)
        await guard.refund_credits(refunded_later, reason="yesterday's image failed")  # counted today
        await guard.refund_credits(await charge(guard, "org_1", video))
        await charge(guard, "org_other", image)
        async with client(build(guard)) as c:
            two = await c.get(f"{PREFIX}/usage", params={"days": "2"}, headers=ORG)
            default = await c.get(f"{PREFIX}/usage", headers=ORG)
            today = await c.get(f"{PREFIX}/usage", params={"days": "1"}, headers=ORG)
            other = await c.get(f"{PREFIX}/usage", params={"days": "2"}, headers={"x-org": "org_other"})
            nobody = await c.get(f"{PREFIX}/usage", params={"days": "366"}, headers={"x-org": "org_never"})
        ledger_by_feature = {
            row.key: row for row in await guard.usage_report(group_by="feature", organization_id="org_1", since=None)
        }
    finally:
        reset_travel()
    assert (two.status_code, two.headers["x-credits-remaining"], two.headers["cache-control"]) == (
        200,
        "170",
        "no-store",
    )
    body = two.json()
    assert (body["organization_id"], body["first_day"], body["last_day"]) == (
        "org_1",
        first.isoformat(),
        second.isoformat(),
    )
    assert body["days"] == [
        {"day": first.isoformat(), "net_credits": 30, "charges": 3, "features": {image: 10, video: 20}},
        {"day": second.isoformat(), "net_credits": 0, "charges": 2, "features": {image: 0, video: 0}},
    ]
    assert body["features"] == [
        {
            "feature": video,
            "name": "Kling Image to Video",
            "net_credits": 20,
            "credits_charged": 40,
            "credits_refunded": 20,
            "charges": 2,
            "refunds": 1,
        },
        {
            "feature": image,
            "name": "SeeDream Text to Image",
            "net_credits": 10,
            "credits_charged": 15,
            "credits_refunded": 5,
            "charges": 3,
            "refunds": 1,
        },
    ]
    # The same numbers as the ledger's own report, and as the balance moved.
    for feature in body["features"]:
        row = ledger_by_feature[feature["feature"]]
        assert (feature["net_credits"], feature["charges"], feature["refunds"]) == (
            row.net_credits,
            row.charges,
            row.refunds,
        )
    assert (body["net_credits"], body["charges"]) == (30, 5)
    assert body["balance_history"] == [
        {"day": first.isoformat(), "balance": 170},
        {"day": second.isoformat(), "balance": 170},
    ]
    assert 200 - body["net_credits"] == await guard.get_balance("org_1")

    month = default.json()
    assert len(month["days"]) == 30 and month["days"][-2:] == body["days"]
    assert all(d == {"day": d["day"], "net_credits": 0, "charges": 0, "features": {}} for d in month["days"][:-2])
    assert month["first_day"] == (second - timedelta(days=29)).isoformat()
    assert (month["net_credits"], month["features"]) == (30, body["features"])

    just_today = today.json()
    assert just_today["days"] == [body["days"][1]]
    assert [(f["feature"], f["net_credits"], f["charges"]) for f in just_today["features"]] == [
        (video, 0, 1),
        (image, 0, 1),
    ]
    assert just_today["balance_history"] == [{"day": second.isoformat(), "balance": 170}]

    # org_other sees its own charges only, and org_1's never leak into it.
    theirs = other.json()
    assert [d["features"] for d in theirs["days"]] == [{video: 20}, {image: 5}]
    assert (theirs["net_credits"], other.headers["x-credits-remaining"]) == (25, "175")
    never = nobody.json()
    assert (len(never["days"]), never["net_credits"], never["features"], never["balance_history"]) == (366, 0, [], [])
    for r in (two, default, today, other, nobody):
        conforms(r)


async def test_bad_usage_parameters_are_422_naming_the_parameter(guard: CreditGuard, build: Any) -> None:
    bad = ["0", "367", "-1", "1.5", "", "abc", "30d", "+5", "\uff19", "1" * 5000, " 7"]
    async with client(build(guard)) as c:
        answers = [await c.get(f"{PREFIX}/usage", params={"days": days}, headers=ORG) for days in bad]
        twice = await c.get(f"{PREFIX}/usage", params=[("days", "7"), ("days", "30")], headers=ORG)
        bounds = [await c.get(f"{PREFIX}/usage", params={"days": days}, headers=ORG) for days in ("1", "366", "007")]
        anonymous_bad = await c.get(f"{PREFIX}/usage", params={"days": "0"})
    for r in answers:
        body = problem(r, 422, TYPE_INVALID_REQUEST)
        assert body["errors"] == {"days": "must be a whole number from 1 to 366"}, r.request.url
        conforms(r)
    assert problem(twice, 422, TYPE_INVALID_REQUEST)["errors"] == {"days": "given more than once"}
    assert [len(r.json()["days"]) for r in bounds] == [1, 366, 7]
    problem(anonymous_bad, 401, TYPE_NO_ORGANIZATION)  # who asks is settled first
    assert await guard.get_balance("org_1") == 0


# -- the widget -------------------------------------------------------------------------------


async def test_widget_is_served_public_and_cacheable(guard: CreditGuard, build: Any) -> None:
    script = WIDGET_FILE.read_bytes()
    async with client(build(guard)) as c:
        r = await c.get(f"{PREFIX}/widget.js")  # no organization needed: it holds no data
        head = await c.head(f"{PREFIX}/widget.js")
        etag = r.headers["etag"]
        again = await c.get(f"{PREFIX}/widget.js", headers={"if-none-match": etag})
        weak = await c.get(f"{PREFIX}/widget.js", headers={"if-none-match": f'"old", W/{etag}'})
        stale = await c.get(f"{PREFIX}/widget.js", headers={"if-none-match": '"something-else"'})
        posted = await c.post(f"{PREFIX}/widget.js")
    assert (r.status_code, r.content) == (200, script)
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert (r.headers["cache-control"], r.headers["x-content-type-options"]) == ("public, max-age=3600", "nosniff")
    assert etag.startswith('"') and etag.endswith('"') and len(etag) == 34
    assert (head.status_code, head.content, head.headers["etag"]) == (200, b"", etag)
    assert head.headers["content-length"] == str(len(script))
    for not_modified in (again, weak):
        assert (not_modified.status_code, not_modified.content, not_modified.headers["etag"]) == (304, b"", etag)
        assert not_modified.headers["cache-control"] == "public, max-age=3600"
    assert (stale.status_code, stale.content) == (200, script)
    assert problem(posted, 405, "about:blank")["title"] == "Method Not Allowed"
    # XSS-safe by construction: the script never parses markup it is given.
    source = script.decode()
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert unsafe not in source
    assert "textContent" in source and 'credentials: "same-origin"' in source
