"""Money in every way a request can end, as users' apps end them: a route guarded twice,
a client that hangs up before the answer, and answers that are client errors.

Disconnects are tested against a REAL uvicorn (tests/field_app.py) over real sockets:
uvicorn drops ``send()`` after a disconnect silently, which no in-process client shows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import Depends, FastAPI, HTTPException
from litestar import Litestar, post
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule
from credit_guard.contrib.litestar import requires_credits as litestar_requires_credits
from credit_guard.contrib.starlette import requires_credits

from .conftest import ledger_rows
from .field_app import DB_ENV, SLOW_ENV
from .helpers import OrgFromHeader, UvicornServer, client, raw_request

IMAGE = "seedream_text_to_image"
ORG = {"x-org": "org_1"}


# -- 6. one request is charged at most once, however many guards it passes ---------------------


def _starlette_twice(guard: CreditGuard) -> Any:
    @requires_credits(IMAGE, guard=guard)
    async def images(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @requires_credits(IMAGE, guard=guard)
    @requires_credits(IMAGE, guard=guard)
    async def stacked(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/v1/images", images, methods=["POST"]), Route("/v1/stacked", stacked, methods=["POST"])]
    )
    return OrgFromHeader(CreditGuardMiddleware(app, guard=guard, rules={"POST /v1/images": IMAGE}))


def _fastapi_twice(guard: CreditGuard) -> Any:
    app = FastAPI()

    @app.post("/v1/images")
    @requires_credits(IMAGE, guard=guard)
    async def images() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"POST /v1/images": IMAGE})
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"POST /v1/images": IMAGE})  # a second one, too
    return OrgFromHeader(app)


def _litestar_twice(guard: CreditGuard) -> Any:
    @post("/v1/images", status_code=200)
    @litestar_requires_credits(IMAGE, guard=guard)
    async def images() -> dict[str, bool]:
        return {"ok": True}

    app = Litestar([images])
    return OrgFromHeader(CreditGuardMiddleware(app, guard=guard, rules={"POST /v1/images": IMAGE}))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "build", [_starlette_twice, _fastapi_twice, _litestar_twice], ids=["starlette", "fastapi", "litestar"]
)
async def test_a_route_guarded_by_the_decorator_and_a_middleware_rule_is_charged_once(
    guard: CreditGuard, build: Any
) -> None:
    await guard.grant_credits("org_1", 100)
    async with client(build(guard)) as http:
        r = await http.post("/v1/images", headers=ORG)
        assert (r.status_code, r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == (200, "5", "95")
        if build is _starlette_twice:
            stacked = await http.post("/v1/stacked", headers=ORG)
            assert (stacked.headers["x-credits-charged"], stacked.headers["x-credits-remaining"]) == ("5", "90")
    await guard.flush()
    charges = [row for row in await ledger_rows(guard) if row["kind"] == "charge"]
    assert len(charges) == (2 if build is _starlette_twice else 1)
    assert await guard.get_balance("org_1") == 100 - 5 * len(charges)
    assert await guard.open_holds() == []
    assert await guard.audit() == []


# -- 8. users pay for results: a 4xx is refunded unless the app chose to charge it ------------------


class Prompt(BaseModel):
    prompt: str


def _fastapi_client_errors(guard: CreditGuard) -> Any:
    app = FastAPI()

    def signed_in(request: Request) -> str:
        if request.headers.get("x-token") != "valid":
            raise HTTPException(401, "sign in")
        return "user"

    def admin(user: str = Depends(signed_in), request: Request = None) -> str:  # type: ignore[assignment]
        if request.headers.get("x-role") != "admin":
            raise HTTPException(403, "admins only")
        return user

    @app.post("/v1/images")
    async def images(body: Prompt, user: str = Depends(signed_in)) -> dict[str, str]:
        return {"prompt": body.prompt}

    @app.get("/v1/items/{item}")
    async def item(item: int, user: str = Depends(signed_in)) -> dict[str, int]:
        if item != 1:
            raise HTTPException(404, "no such item")
        return {"item": item}

    @app.post("/v1/admin")
    async def admin_only(user: str = Depends(admin)) -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/v1/charged-anyway")
    async def charged_anyway(body: Prompt) -> dict[str, str]:
        return {"prompt": body.prompt}

    rules: dict[str, str | Rule] = {
        "POST /v1/images": IMAGE,
        "GET /v1/items/{item}": IMAGE,
        "POST /v1/admin": IMAGE,
        "POST /v1/charged-anyway": Rule(IMAGE, charge_client_errors=True),
    }
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules=rules)
    return OrgFromHeader(app)


@pytest.mark.anyio
async def test_client_errors_under_the_middleware_are_refunded_by_default(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    token = {**ORG, "x-token": "valid"}
    async with client(_fastapi_client_errors(guard)) as http:
        answers = {
            "422 bad body": await http.post("/v1/images", headers=token, json={"nope": 1}),
            "404 unknown item": await http.get("/v1/items/7", headers=token),
            "401 from auth": await http.post("/v1/images", headers=ORG, json={"prompt": "x"}),
            "403 from auth": await http.post("/v1/admin", headers=token),
        }
        for what, r in answers.items():
            assert r.status_code == int(what[:3]), what
            assert (r.headers["x-credits-refunded"], r.headers["x-credits-remaining"]) == ("5", "100"), what
            assert "x-credits-charged" not in r.headers, what
        ok = await http.get("/v1/items/1", headers=token)
        assert (ok.status_code, ok.headers["x-credits-remaining"]) == (200, "95")
        # A route that chose to charge client errors keeps the charge.
        kept = await http.post("/v1/charged-anyway", headers=token, json={"nope": 1})
        assert (kept.status_code, kept.headers["x-credits-charged"], kept.headers["x-credits-remaining"]) == (
            422,
            "5",
            "90",
        )
    await guard.flush()
    assert await guard.get_balance("org_1") == 90
    kinds = [row["kind"] for row in await ledger_rows(guard)]
    assert kinds == ["grant"] + ["charge", "refund"] * 4 + ["charge", "charge"]
    assert await guard.audit() == []


@pytest.mark.anyio
async def test_a_guard_that_charges_client_errors_keeps_them_and_a_route_may_refund_them(
    db_url: str, guard: CreditGuard
) -> None:
    await guard.grant_credits("org_1", 100)
    async with CreditGuard(db_url, charge_client_errors=True) as charging:

        @requires_credits(IMAGE, guard=charging)
        async def missing(request: Request) -> JSONResponse:
            return JSONResponse({"error": "missing"}, status_code=404)

        @requires_credits(IMAGE, guard=charging, charge_client_errors=False)
        async def refunded(request: Request) -> JSONResponse:
            raise HTTPException(409, "conflict")

        app = Starlette(routes=[Route("/a", missing, methods=["POST"]), Route("/b", refunded, methods=["POST"])])
        async with client(OrgFromHeader(app)) as http:
            a = await http.post("/a", headers=ORG)
            b = await http.post("/b", headers=ORG)
        assert (a.status_code, a.headers["x-credits-charged"], a.headers["x-credits-remaining"]) == (404, "5", "95")
        assert (b.status_code, b.headers["x-credits-refunded"], b.headers["x-credits-remaining"]) == (409, "5", "95")
        await charging.flush()
    assert await guard.get_balance("org_1") == 95


# -- 7. a client that hangs up before the answer is not charged (a real server) ------------------


@pytest.fixture
def field_server(fresh_db: str, tmp_path: Path) -> Iterator[tuple[UvicornServer, str]]:
    async def fund() -> None:
        async with CreditGuard(fresh_db) as g:
            await g.grant_credits("org_1", 100)

    anyio.run(fund)
    env = {DB_ENV: fresh_db, SLOW_ENV: "0.8"}
    with UvicornServer("tests.field_app:create_app", env, tmp_path / "uvicorn.log") as server:
        yield server, fresh_db


def _books(db_url: str) -> tuple[int, list[dict[str, Any]], list[int], list[Any]]:
    async def read() -> tuple[int, list[dict[str, Any]], list[int], list[Any]]:
        async with CreditGuard(db_url) as g:
            return await g.get_balance("org_1"), await ledger_rows(g, "org_1"), await g.open_holds(), await g.audit()

    return anyio.run(read)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/dec/slow-dict", "/dec/slow-response", "/mw/slow-dict", "/mw/slow-response"])
def test_a_client_that_disconnects_before_the_answer_is_refunded_exactly_once(
    field_server: tuple[UvicornServer, str], path: str
) -> None:
    server, db_url = field_server
    rounds = 3
    for _ in range(rounds):
        sock = raw_request(server.port, "POST", path, {"x-org": "org_1"})
        time.sleep(0.2)  # the charge is taken and the handler is running
        sock.close()  # the client hangs up; the handler goes on and answers into the void
    deadline = time.monotonic() + 15
    while True:  # polling, not timing: each handler ends ~0.8 s after its request
        balance, rows, holds, issues = _books(db_url)
        refunds = [row for row in rows if row["kind"] == "refund"]
        if len(refunds) == rounds and not holds:
            break
        assert time.monotonic() < deadline, f"{balance=} {rows=} {holds=}\n{server.log()}"
        time.sleep(0.1)
    balance, rows, holds, issues = _books(db_url)  # read again: the balance was read before the rows
    refunds = [row for row in rows if row["kind"] == "refund"]
    assert balance == 100, rows
    assert [row["kind"] for row in rows].count("charge") == rounds
    assert {row["reason"] for row in refunds} == {"client disconnected"}
    assert issues == []
    # A client that stays gets its answer and pays, on the same server.
    ok = raw_request(server.port, "POST", path, {"x-org": "org_1"})
    answer = ok.makefile("rb").readline()
    ok.close()
    assert answer.startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 15
    while (books := _books(db_url))[2] or books[0] != 95:
        assert time.monotonic() < deadline, books
        time.sleep(0.1)
