"""The balance and check endpoints, in-process, mounted in Starlette, FastAPI and Litestar.

Every answer here is also held against the OpenAPI document the app serves (``conforms``):
the fuzzing in ``test_fuzz_api.py`` cannot reach a 503, a missing guard or a wrong method.
"""

from __future__ import annotations

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
from credit_guard._endpoints import openapi_document
from credit_guard.admin import openapi_document as admin_openapi_document
from credit_guard.models import FEATURE_KEY_MAX, FEATURE_KEY_RE
from credit_guard.problems import TYPE_FEATURE_NOT_FOUND, TYPE_INVALID_REQUEST, TYPE_NO_ORGANIZATION, TYPE_UNAVAILABLE

from .conftest import ledger_rows
from .test_middleware import ORG, DemoAuth, client
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
            for path in ("/balance", "/check", "/openapi.json")
        ]
    assert problem(wrong_path, 404, "about:blank")["title"] == "Not Found"
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
            ]
        ]
    for get, head in pairs:
        assert head.status_code == get.status_code, head.request
        assert head.content == b""
        same = ("content-type", "content-length", "cache-control", "x-credits-remaining")
        assert {h: head.headers.get(h) for h in same} == {h: get.headers.get(h) for h in same}
        conforms(head)
    assert [get.status_code for get, _ in pairs] == [200, 200, 404, 400, 401]


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
    }
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
