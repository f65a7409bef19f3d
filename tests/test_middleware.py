"""CreditGuardMiddleware in front of a plain Starlette app, on both databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule, requires_credits

from .conftest import ledger_rows
from .helpers import OrgFromHeader, client

pytestmark = pytest.mark.anyio


DemoAuth = OrgFromHeader
IMAGE = "seedream_text_to_image"


calls: list[str] = []


async def images(request: Request) -> JSONResponse:
    calls.append("images")
    return JSONResponse({"url": "https://cdn.example/1.png"})


async def extend(request: Request) -> JSONResponse:
    calls.append(f"extend {request.path_params['id']}")
    return JSONResponse({"id": request.path_params["id"]})


async def crash(request: Request) -> JSONResponse:
    calls.append("crash")
    raise RuntimeError("model server exploded")


async def upstream_down(request: Request) -> JSONResponse:
    calls.append("upstream_down")
    return JSONResponse({"error": "upstream"}, status_code=502)


async def free(request: Request) -> PlainTextResponse:
    calls.append("free")
    return PlainTextResponse("free")


async def broken_stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"frame-1\n"
        raise RuntimeError("encoder died mid-stream")

    return StreamingResponse(body(), media_type="text/plain")


RULES = {
    "POST /v1/images": "seedream_text_to_image",
    "POST /v1/videos/{id}/extend": "kling_image_to_video",
    "POST /v1/crash": "seedream_text_to_image",
    "POST /v1/upstream": "seedream_text_to_image",
    "POST /v1/stream": "seedream_text_to_image",
    "POST /v1/unpriced": "no_such_feature",
    "POST /v1/retired": "retired_feature",
}


def build_app(guard: CreditGuard) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/images", images, methods=["POST", "GET"]),
            Route("/v1/videos/{id}/extend", extend, methods=["POST"]),
            Route("/v1/crash", crash, methods=["POST"]),
            Route("/v1/upstream", upstream_down, methods=["POST"]),
            Route("/v1/stream", broken_stream, methods=["POST"]),
            Route("/v1/unpriced", free, methods=["POST"]),
            Route("/v1/retired", free, methods=["POST"]),
            Route("/v1/free", free, methods=["POST"]),
        ]
    )
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules=RULES)
    app.add_middleware(DemoAuth)  # added last = outermost: auth runs before the guard
    return app


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


ORG = {"x-org": "org_1"}


async def test_matching_rule_charges_and_sets_headers(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/images", headers=ORG)
    assert r.status_code == 200
    assert (r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == ("5", "7")
    assert calls == ["images"]
    [_, charge] = await ledger_rows(guard, "org_1")
    assert (charge["kind"], charge["amount"], charge["request_method"], charge["request_path"], charge["user_id"]) == (
        "charge",
        -5,
        "POST",
        "/v1/images",
        "user_9",
    )


async def test_unmatched_route_and_method_pass_untouched(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        free_r = await c.post("/v1/free", headers=ORG)
        get_r = await c.get("/v1/images", headers=ORG)  # the rule is for POST only
        anonymous = await c.post("/v1/free")
    for r in (free_r, get_r, anonymous):
        assert r.status_code == 200
        assert "x-credits-remaining" not in r.headers
    assert await guard.get_balance("org_1") == 12
    assert len(await ledger_rows(guard)) == 1


async def test_path_template_rule_matches_any_id(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 45)
    async with client(build_app(guard)) as c:
        a = await c.post("/v1/videos/abc/extend", headers=ORG)
        b = await c.post("/v1/videos/42/extend", headers=ORG)
        miss = await c.post("/v1/videos/42/extend/more", headers=ORG)
    assert (a.status_code, a.headers["x-credits-remaining"]) == (200, "25")
    assert (b.status_code, b.headers["x-credits-remaining"]) == (200, "5")
    assert miss.status_code == 404 and "x-credits-remaining" not in miss.headers
    assert calls == ["extend abc", "extend 42"]


async def test_short_balance_gets_402_problem_and_handler_never_runs(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 4)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/images", headers=ORG)
    assert r.status_code == 402
    assert r.headers["content-type"] == "application/problem+json"
    assert (r.headers["x-credits-required"], r.headers["x-credits-remaining"]) == ("5", "4")
    body = r.json()
    assert body["status"] == 402 and body["type"].endswith("insufficient-credits")
    assert (body["feature"], body["required"], body["available"]) == ("seedream_text_to_image", 5, 4)
    assert "5" in body["detail"] and "4" in body["detail"]
    assert calls == []
    assert len(await ledger_rows(guard)) == 1


async def test_exception_in_handler_refunds_once(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/crash", headers=ORG)
    assert r.status_code == 500
    assert await guard.get_balance("org_1") == 12
    kinds = [(row["kind"], row["amount"]) for row in await ledger_rows(guard, "org_1")]
    assert kinds == [("grant", 12), ("charge", -5), ("refund", 5)]
    assert await guard.audit() == []


async def test_returned_5xx_refunds_and_says_so(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/upstream", headers=ORG)
    assert r.status_code == 502
    assert (r.headers["x-credits-refunded"], r.headers["x-credits-remaining"]) == ("5", "12")
    assert "x-credits-charged" not in r.headers
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]


async def test_stream_failing_after_headers_is_refunded(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        async with c.stream("POST", "/v1/stream", headers=ORG) as r:
            assert r.headers["x-credits-charged"] == "5"  # it went out before the failure
            assert await r.aread() == b"frame-1\n"  # the body was cut short
    assert await guard.get_balance("org_1") == 12
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]


async def test_no_organization_gets_401_and_nothing_changes(guard: CreditGuard) -> None:
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/images")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("no-organization")
    assert calls == [] and await ledger_rows(guard) == []


async def test_organization_id_longer_than_an_account_can_have_is_401_and_logged(
    guard: CreditGuard, caplog: pytest.LogCaptureFixture
) -> None:
    """An id resolved from something the client controls can be any length; no account can
    hold one over 255 characters, so it is refused like a missing one, never a 500."""
    async with client(build_app(guard)) as c:
        r = await c.post("/v1/images", headers={"x-org": "o" * 256})
        fits = await c.post("/v1/images", headers={"x-org": "o" * 255})
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("no-organization") and "255 characters" in r.json()["detail"]
    assert "organization id of 256 characters" in caplog.text
    assert fits.status_code == 402  # a real (empty) account: refused for its balance, not its id
    assert calls == [] and await ledger_rows(guard) == []


@pytest.mark.parametrize(
    ("path", "status", "kind"), [("/v1/unpriced", 500, "feature-not-found"), ("/v1/retired", 403, "feature-inactive")]
)
async def test_unknown_or_inactive_feature_is_refused_and_logged(
    guard: CreditGuard, path: str, status: int, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(build_app(guard)) as c:
        r = await c.post(path, headers=ORG)
    assert r.status_code == status
    body = r.json()
    assert body["type"].endswith(kind)
    assert body["feature"] in body["detail"]
    assert calls == []
    assert len(await ledger_rows(guard)) == 1 and await guard.get_balance("org_1") == 12
    assert any(body["feature"] in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")


async def test_allow_unpriced_lets_such_routes_through_free(db_url: str) -> None:
    from .conftest import reset_postgres, seed_prices

    async with CreditGuard(db_url, allow_unpriced=True) as g:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)
        await seed_prices(g)
        await g.grant_credits("org_1", 12)
        async with client(build_app(g)) as c:
            r1 = await c.post("/v1/unpriced", headers=ORG)
            r2 = await c.post("/v1/retired", headers=ORG)
        assert (r1.status_code, r2.status_code) == (200, 200)
        assert r1.headers["x-credits-charged"] == "0"
        assert calls == ["free", "free"]
        assert await g.get_balance("org_1") == 12


async def test_websocket_and_lifespan_scopes_pass_through(guard: CreditGuard) -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    mw = CreditGuardMiddleware(inner, guard=guard, rules={"GET /ws": "seedream_text_to_image"})

    async def nothing() -> dict[str, object]:
        return {}

    async def ignore(message: object) -> None:
        return None

    await mw({"type": "websocket", "path": "/ws"}, nothing, ignore)
    await mw({"type": "lifespan"}, nothing, ignore)
    assert seen == ["websocket", "lifespan"]


def test_bad_rule_is_rejected_at_startup() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None: ...

    with pytest.raises(ValueError, match="POST /v1/images"):
        CreditGuardMiddleware(app, guard=None, rules={"/v1/images": "x"})  # type: ignore[arg-type]


async def test_concurrent_http_requests_never_overdraw(guard: CreditGuard) -> None:
    import anyio

    await guard.grant_credits("org_1", 10 * 5)
    statuses: list[int] = []
    async with client(build_app(guard)) as c:

        async def one() -> None:
            statuses.append((await c.post("/v1/images", headers=ORG)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(one)
    assert sorted(statuses) == [200] * 10 + [402] * 30
    assert await guard.get_balance("org_1") == 0
    assert await guard.audit() == []


async def test_head_on_a_guarded_get_route_is_charged_too(guard: CreditGuard) -> None:
    """Starlette answers HEAD with the GET handler: it must not be a free way in."""

    async def report(request: Request) -> PlainTextResponse:
        calls.append("report")
        return PlainTextResponse("report")

    app = Starlette(routes=[Route("/report", report, methods=["GET"])])
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"GET /report": "seedream_text_to_image"})
    app.add_middleware(DemoAuth)
    await guard.grant_credits("org_1", 12)
    async with client(app) as c:
        head = await c.head("/report", headers=ORG)
    assert (head.status_code, head.headers["x-credits-charged"], head.headers["x-credits-remaining"]) == (200, "5", "7")
    assert await guard.get_balance("org_1") == 7


async def test_failing_background_task_after_delivery_keeps_the_charge(guard: CreditGuard) -> None:
    from starlette.background import BackgroundTask

    async def explode() -> None:
        raise RuntimeError("e-mail server down")

    async def with_task(request: Request) -> PlainTextResponse:
        return PlainTextResponse("done", background=BackgroundTask(explode))

    app = Starlette(routes=[Route("/job", with_task, methods=["POST"])])
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"POST /job": "seedream_text_to_image"})
    app.add_middleware(DemoAuth)
    await guard.grant_credits("org_1", 12)
    async with client(app) as c:
        r = await c.post("/job", headers=ORG)
    assert (r.text, r.headers["x-credits-charged"]) == ("done", "5")
    assert await guard.get_balance("org_1") == 7  # delivered, so paid for: no refund
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge"]


async def test_client_disconnect_mid_stream_is_refunded(guard: CreditGuard) -> None:
    import anyio

    async def endless(request: Request) -> StreamingResponse:
        async def frames() -> AsyncIterator[bytes]:
            while True:
                yield b"frame\n"
                await anyio.sleep(0.01)

        return StreamingResponse(frames())

    app = Starlette(routes=[Route("/live", endless, methods=["POST"])])
    mw = CreditGuardMiddleware(app, guard=guard, rules={"POST /live": "seedream_text_to_image"})
    await guard.grant_credits("org_1", 12)
    sent: list[dict[str, object]] = []
    gone = anyio.Event()

    body_read = False

    async def receive() -> dict[str, object]:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if len(sent) >= 3:  # the start and two frames: then the client hangs up
            gone.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/live",
        "root_path": "",
        "headers": [],
        "query_string": b"",
        "state": {"organization_id": "org_1"},
    }
    with anyio.fail_after(5):
        await mw(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start"
    assert await guard.get_balance("org_1") == 12
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]


@pytest.mark.parametrize(
    ("declare", "error", "message"),
    [
        (lambda: Rule(IMAGE, max_overage=-5), ValueError, "max_overage must be a share"),
        (lambda: Rule(IMAGE, max_overage=True), ValueError, "max_overage must be a share"),
        (lambda: requires_credits(IMAGE, max_overage=1e9), ValueError, "max_overage must be a share"),
        (lambda: Rule(IMAGE, charge_client_errors="yes"), TypeError, "charge_client_errors must be a bool"),
        (lambda: Rule(IMAGE, idempotency="always"), ValueError, "idempotency must be True, False or 'required'"),
        (lambda: Rule(IMAGE, units="many"), ValueError, "units must be a number or a callable"),
        (lambda: Rule(IMAGE, units=0), ValueError, "units must be a number or a callable"),
        (lambda: Rule("Seedream Image"), ValueError, "not a feature key"),
        (lambda: requires_credits(5), TypeError, "the feature key must be a str"),  # type: ignore[arg-type]
        (
            lambda: CreditGuardMiddleware(free, guard=None, rules={"POST /x": Rule(IMAGE, max_overage=-1)}),  # type: ignore[arg-type]
            ValueError,
            "max_overage",
        ),
        (
            lambda: CreditGuardMiddleware(free, guard=None, rules={"POST /x": "Bad Key"}),  # type: ignore[arg-type]
            ValueError,
            "not a feature key",
        ),
    ],
)
def test_bad_route_options_fail_where_the_route_is_declared(declare: Any, error: type[Exception], message: str) -> None:
    """One place checks a paid route's options (``Rule``), whichever way they arrive: a
    decorator, a middleware rule or a Litestar opt (tested in test_litestar_plugin), so a
    bad value fails at import, never on the route's first request."""
    with pytest.raises(error, match=message):
        declare()


def test_a_fixed_number_of_units_is_a_rule_option_too() -> None:
    rule = Rule(IMAGE, units="2.5")
    units = rule.units_of()
    assert units is not None and units(None) == Decimal("2.5")
