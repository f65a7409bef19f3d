"""CreditGuardPlugin: the Litestar-native wiring (lifespan, app state, routes paid by ``opt``).

Every money test runs on SQLite and PostgreSQL and checks the ledger and ``guard.audit()``,
not just the status codes. The handlers count their runs, so a replay that secretly re-ran
a handler, or a route charged twice, shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi import Request as FastAPIRequest
from litestar import Litestar, Request, Router, get, post, websocket
from litestar.connection import WebSocket
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotFoundException, PermissionDeniedException
from litestar.params import Body
from litestar.response import Stream
from litestar.testing import TestClient

from credit_guard import CreditGuard, Rule, current_ticket
from credit_guard.contrib.litestar import CreditGuardPlugin
from credit_guard.contrib.litestar import requires_credits as litestar_requires_credits
from credit_guard.contrib.starlette import requires_credits as starlette_requires_credits

from .conftest import ledger_rows
from .helpers import client
from .litestar_handlers import Account, AccountDTO, DemoAuth

pytestmark = pytest.mark.anyio

ORG = {"x-org": "org_1"}
IMAGE = "seedream_text_to_image"  # 5 credits (conftest's prices)
ran: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    ran.clear()


async def kinds(guard: CreditGuard, organization_id: str = "org_1") -> list[object]:
    return [row["kind"] for row in await ledger_rows(guard, organization_id)]


def replayed(r: httpx.Response) -> bool:
    return bool(r.headers.get("idempotent-replayed") == "true")


# -- the app ---------------------------------------------------------------------------------


@post("/image", opt={"credits": IMAGE})
async def image() -> dict[str, int]:
    ran.append("image")
    return {"n": len(ran)}


@post("/keyed", opt={"credits": IMAGE, "credits_idempotency": True})
async def keyed() -> dict[str, int]:
    ran.append("keyed")
    return {"n": len(ran)}


@post("/crash", opt={"credits": IMAGE})
async def crash() -> dict[str, int]:
    ran.append("crash")
    raise RuntimeError("model server exploded")


@post("/upstream-down", opt={"credits": IMAGE})
async def upstream_down() -> dict[str, int]:
    ran.append("upstream-down")
    raise HTTPException(status_code=502, detail="model server is down")


@post("/both", opt={"credits": IMAGE})
@litestar_requires_credits(IMAGE)
async def both() -> dict[str, int]:
    ran.append("both")
    return {"n": len(ran)}


@post("/decorated")
@litestar_requires_credits(IMAGE, idempotency=True)
async def decorated() -> dict[str, int]:
    ran.append("decorated")
    return {"n": len(ran)}


@post("/three", opt={"credits": IMAGE, "credits_units": 3})
async def three() -> dict[str, int]:
    ran.append("three")
    return {"n": len(ran)}


async def seconds_of_video(request: Request[Any, Any, Any]) -> Decimal:
    """A units callable gets the Litestar request, as under the decorator; the body it
    reads is still the handler's."""
    return Decimal((await request.json())["seconds"]) / 5


@post("/video", opt={"credits": Rule(IMAGE, units=seconds_of_video, idempotency=True)})
async def video(data: Annotated[dict[str, int], Body()], request: Request[Any, Any, Any]) -> dict[str, int]:
    ran.append(f"video {data['seconds']}")
    ticket = current_ticket(request)
    assert ticket is not None
    ticket.report_usage(1)  # rendered 5 s only: the rest of the reserve goes back
    return data


@post("/stream", opt={"credits": IMAGE})
async def stream() -> Stream:
    ran.append("stream")

    async def frames() -> AsyncIterator[bytes]:
        yield b"frame-1\n"
        raise RuntimeError("the encoder died mid-stream")

    return Stream(frames())


@post("/account", return_dto=AccountDTO)
@litestar_requires_credits(IMAGE)
async def account() -> Account:
    ran.append("account")
    return Account("ann", "never-shown")


@post("/in-router")
async def in_router() -> dict[str, int]:
    ran.append("in-router")
    return {"n": len(ran)}


@post("/free-in-router", opt={"credits": None})
async def free_in_router() -> dict[str, int]:
    ran.append("free-in-router")
    return {"n": len(ran)}


@get("/free")
async def free() -> dict[str, str]:
    ran.append("free")
    return {"free": "yes"}


HANDLERS = [image, keyed, crash, upstream_down, both, decorated, three, video, stream, account, free]


def build(guard: CreditGuard) -> Any:  # an ASGI app; Litestar's own scope types are narrower
    paid_router = Router("/paid", route_handlers=[in_router, free_in_router], opt={"credits": IMAGE})
    return Litestar([*HANDLERS, paid_router], middleware=[DemoAuth()], plugins=[CreditGuardPlugin(guard)])


# -- charged, refused, refunded ----------------------------------------------------------------


async def test_an_opt_route_is_charged_with_the_credit_headers(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 20)
    async with client(build(guard)) as c:
        r = await c.post("/image", headers=ORG)
        free_answer = await c.get("/free", headers=ORG)
    assert (r.status_code, r.json()) == (201, {"n": 1})
    assert (r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == ("5", "15")
    assert free_answer.status_code == 200 and "x-credits-charged" not in free_answer.headers
    await guard.flush()
    assert await guard.get_balance("org_1") == 15
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.audit() == []


async def test_a_handler_that_fails_is_refunded(guard: CreditGuard) -> None:
    """An exception (Litestar's 500) and an HTTPException(502) are both refunded, once,
    and the answer says so; the balance is whole again."""
    await guard.grant_credits("org_1", 20)
    async with client(build(guard)) as c:
        crashed = await c.post("/crash", headers=ORG)
        down = await c.post("/upstream-down", headers=ORG)
    assert crashed.status_code == 500
    assert (crashed.headers["x-credits-refunded"], crashed.headers["x-credits-remaining"]) == ("5", "20")
    assert down.status_code == 502 and down.json()["detail"] == "model server is down"
    assert (down.headers["x-credits-refunded"], down.headers["x-credits-remaining"]) == ("5", "20")
    assert ran == ["crash", "upstream-down"]
    await guard.flush()
    assert await guard.get_balance("org_1") == 20
    assert await kinds(guard) == ["grant", "charge", "refund", "charge", "refund"]
    assert await guard.audit() == []


async def test_a_stream_that_breaks_after_its_headers_is_refunded(guard: CreditGuard) -> None:
    """The status went out with the first frame, so only the ledger can say it: refunded."""
    await guard.grant_credits("org_1", 20)
    async with client(build(guard)) as c:
        r = await c.post("/stream", headers=ORG)
    assert (r.status_code, r.headers["x-credits-charged"]) == (201, "5")  # sent before the body broke
    assert r.content == b"frame-1\n"
    await guard.flush()
    assert await guard.get_balance("org_1") == 20
    assert await kinds(guard) == ["grant", "charge", "refund"]
    assert await guard.audit() == []


async def test_a_client_that_hung_up_before_the_answer_is_refunded(guard: CreditGuard) -> None:
    """The server would drop the answer without a word: once the request body is read, the
    guard asks before the last chunk, finds the client gone, and refunds."""
    await guard.grant_credits("org_1", 20)
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": b'{"seconds": 5}', "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/video",
        "raw_path": b"/video",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"t"), (b"x-org", b"org_1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("t", 80),
    }
    await build(guard)(scope, receive, send)
    assert ran == ["video 5"]
    assert not any(m["type"] == "http.response.body" and m.get("body") for m in sent)  # never delivered
    await guard.flush()
    assert await guard.get_balance("org_1") == 20
    assert await kinds(guard) == ["grant", "charge", "refund"]
    assert await guard.audit() == []


async def test_a_short_balance_is_refused_with_402_and_the_handler_never_runs(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 3)
    async with client(build(guard)) as c:
        short = await c.post("/image", headers=ORG)
        anonymous = await c.post("/image")
    assert short.status_code == 402
    assert short.headers["content-type"] == "application/problem+json"
    assert (short.headers["x-credits-required"], short.headers["x-credits-remaining"]) == ("5", "3")
    assert (short.json()["required"], short.json()["available"]) == (5, 3)
    assert anonymous.status_code == 401
    assert ran == []
    assert await guard.get_balance("org_1") == 3
    assert await kinds(guard) == ["grant"]
    assert await guard.audit() == []


async def test_units_from_opt_a_number_or_a_callable_of_the_request(guard: CreditGuard) -> None:
    """``credits_units: 3`` costs 15; a Rule's callable reads the body (10 s: 2 units, 10
    credits) and the handler still gets it; its reported usage (1 unit) refunds the rest."""
    await guard.grant_credits("org_1", 40)
    async with client(build(guard)) as c:
        three_units = await c.post("/three", headers=ORG)
        ten_seconds = await c.post("/video", headers=ORG, json={"seconds": 10})
    assert (three_units.headers["x-credits-charged"], three_units.headers["x-credits-remaining"]) == ("15", "25")
    assert ten_seconds.json() == {"seconds": 10}
    assert (ten_seconds.headers["x-credits-charged"], ten_seconds.headers["x-credits-remaining"]) == ("10", "15")
    await guard.flush()
    assert await guard.get_balance("org_1") == 40 - 15 - 5
    assert await guard.audit() == []


async def test_a_routers_opt_pays_for_its_routes_and_none_opts_one_out(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 20)
    async with client(build(guard)) as c:
        paid = await c.post("/paid/in-router", headers=ORG)
        free_answer = await c.post("/paid/free-in-router", headers=ORG)
        preflight = await c.options("/paid/in-router", headers={**ORG, "Origin": "https://app.example"})
    assert (paid.status_code, paid.headers["x-credits-charged"]) == (201, "5")
    assert free_answer.status_code == 201 and "x-credits-charged" not in free_answer.headers
    assert preflight.status_code == 204 and "x-credits-charged" not in preflight.headers
    assert await guard.get_balance("org_1") == 15
    assert await guard.audit() == []


async def test_a_route_with_both_opt_and_the_decorator_is_charged_once(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 20)
    async with client(build(guard)) as c:
        r = await c.post("/both", headers=ORG)
    assert (r.status_code, r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == (201, "5", "15")
    assert ran == ["both"]
    await guard.flush()
    assert await guard.get_balance("org_1") == 15
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.audit() == []


async def test_a_decorated_return_dto_route_refuses_past_the_dto_under_the_plugin(guard: CreditGuard) -> None:
    """The plugin registers the CreditAnswer handler app-wide: a refusal on a return-DTO
    route is still problem+json, and the DTO still applies to a paid answer."""
    async with client(build(guard)) as c:
        short = await c.post("/account", headers=ORG)
        await guard.grant_credits("org_1", 5)
        paid = await c.post("/account", headers=ORG)
    assert short.status_code == 402 and short.headers["content-type"] == "application/problem+json"
    assert (paid.status_code, paid.json(), paid.headers["x-credits-remaining"]) == (201, {"name": "ann"}, "0")
    assert ran == ["account"]
    assert await guard.audit() == []


# -- idempotent replays carry the credit headers -----------------------------------------------


async def test_an_opt_route_replay_is_the_first_response_with_its_credit_headers(guard: CreditGuard) -> None:
    """The middleware saw the bytes: the replay is the first answer, credit headers and body."""
    await guard.grant_credits("org_1", 20)
    headers = {**ORG, "Idempotency-Key": "k-1"}
    async with client(build(guard)) as c:
        first = await c.post("/keyed", headers=headers)
        await guard.flush()
        retry = await c.post("/keyed", headers=headers)
    assert not replayed(first) and replayed(retry)
    assert (retry.status_code, retry.content) == (first.status_code, first.content)
    for name in ("x-credits-charged", "x-credits-remaining", "content-type"):
        assert retry.headers[name] == first.headers[name]
    assert (first.headers["x-credits-charged"], first.headers["x-credits-remaining"]) == ("5", "15")
    assert ran == ["keyed"]
    assert await guard.get_balance("org_1") == 15
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.audit() == []


async def test_a_units_route_replay_is_not_charged_again(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 40)
    headers = {**ORG, "Idempotency-Key": "video-1"}
    async with client(build(guard)) as c:
        first = await c.post("/video", headers=headers, json={"seconds": 10})
        await guard.flush()
        retry = await c.post("/video", headers=headers, json={"seconds": 10})
        other = await c.post("/video", headers=headers, json={"seconds": 15})
    assert replayed(retry) and retry.json() == first.json() == {"seconds": 10}
    assert retry.headers["x-credits-charged"] == first.headers["x-credits-charged"] == "10"
    assert other.status_code == 422
    assert ran == ["video 10"]
    assert await guard.get_balance("org_1") == 35
    assert await guard.audit() == []


def litestar_without_the_plugin(guard: CreditGuard) -> Any:
    app = Litestar([decorated], middleware=[DemoAuth()])
    app.state.credit_guard = guard
    return app


@pytest.mark.parametrize("build_app", [build, litestar_without_the_plugin], ids=["plugin", "no-plugin"])
async def test_a_decorator_route_replay_carries_the_credit_headers(guard: CreditGuard, build_app: Any) -> None:
    """Without the plugin Litestar serialises a returned value after the decorator: the
    replay is its status and its credit headers, without the body. Under the plugin the
    passage around the request records the response whole, as for an opt route."""
    await guard.grant_credits("org_1", 20)
    headers = {**ORG, "Idempotency-Key": "d-1"}
    async with client(build_app(guard)) as c:
        first = await c.post("/decorated", headers=headers)
        await guard.flush()
        retry = await c.post("/decorated", headers=headers)
    assert (first.status_code, first.json()) == (201, {"n": 1})
    assert replayed(retry) and retry.status_code == 201
    if build_app is build:
        assert retry.json() == {"n": 1} and "idempotent-body-omitted" not in retry.headers
    else:
        assert retry.headers["idempotent-body-omitted"] == "true"
    assert (retry.headers["x-credits-charged"], retry.headers["x-credits-remaining"]) == ("5", "15")
    assert ran == ["decorated"]
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.audit() == []


async def test_a_fastapi_plain_value_replay_carries_the_credit_headers_too(guard: CreditGuard) -> None:
    def signed_in(request: FastAPIRequest) -> str:
        request.state.organization_id = request.headers["x-org"]
        return "user_9"

    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/image")
    @starlette_requires_credits(IMAGE, idempotency=True)
    async def fastapi_image(user: str = Depends(signed_in)) -> dict[str, int]:
        ran.append("fastapi")
        return {"n": len(ran)}

    await guard.grant_credits("org_1", 20)
    headers = {**ORG, "Idempotency-Key": "f-1"}
    async with client(app) as c:
        first = await c.post("/image", headers=headers)
        await guard.flush()
        retry = await c.post("/image", headers=headers)
    assert replayed(retry) and retry.status_code == first.status_code == 200
    assert (retry.headers["x-credits-charged"], retry.headers["x-credits-remaining"]) == ("5", "15")
    assert ran == ["fastapi"]
    assert await guard.audit() == []


# -- lifespan: a new event loop each time ------------------------------------------------------


def test_the_guard_runs_on_a_new_event_loop_for_each_test_client(fresh_db: str) -> None:
    """Two TestClients in a row on one app and one guard, as two test modules would: the
    lifespan starts the guard on each client's loop and closes it after."""
    guard = CreditGuard(fresh_db)
    app = build(guard)
    assert app.state.credit_guard is guard
    for round_number in (1, 2):
        with TestClient(app) as c:
            portal = c.blocking_portal  # the client's own event loop, where the lifespan started the guard
            portal.call(partial(guard.grant_credits, "org_1", 5, idempotency_key=f"fund-{round_number}"))
            r = c.post("/image", headers=ORG)
            assert (r.status_code, r.headers["x-credits-remaining"]) == (201, "0")
            portal.call(guard.flush)
            assert portal.call(guard.get_balance, "org_1") == 0
            assert portal.call(guard.audit) == []
        assert not guard.started
    assert ran == ["image", "image"]


def test_an_app_lifespan_that_also_runs_the_guard_does_not_clash_with_the_plugin(fresh_db: str) -> None:
    """The plugin's lifespan comes first: the app's own ``async with guard:`` finds it
    running (a no-op) and closes it at shutdown; the plugin does not close it twice."""
    guard = CreditGuard(fresh_db)

    @asynccontextmanager
    async def own_lifespan(app: Litestar) -> AsyncIterator[None]:
        assert guard.started
        async with guard:
            yield

    app = Litestar([image], middleware=[DemoAuth()], plugins=[CreditGuardPlugin(guard)], lifespan=[own_lifespan])
    with TestClient(app) as c:
        c.blocking_portal.call(partial(guard.grant_credits, "org_1", 5))
        assert c.post("/image", headers=ORG).headers["x-credits-remaining"] == "0"
    assert not guard.started


def test_without_its_lifespan_a_paid_route_answers_500_and_runs_nothing(fresh_db: str) -> None:
    guard = CreditGuard(fresh_db)
    r = TestClient(build(guard)).post("/image", headers=ORG)  # no `with`: no lifespan
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    assert ran == []


def test_create_schema_runs_before_the_guard_starts(tmp_path: Any) -> None:
    guard = CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    app = Litestar([free], plugins=[CreditGuardPlugin(guard, create_schema=True)])
    with TestClient(app) as c:
        assert c.blocking_portal.call(guard.get_balance, "org_1") == 0  # the tables exist
        assert c.blocking_portal.call(guard.audit) == []


# -- bad opt fails as the app is built -----------------------------------------------------------


async def _handler() -> None:
    return None


@websocket("/ws", opt={"credits": IMAGE})
async def paid_socket(socket: WebSocket[Any, Any, Any]) -> None:
    await socket.close()


@post("/conflict", opt={"credits": "kling_image_to_video"})
@litestar_requires_credits(IMAGE)
async def conflict() -> None:
    return None


@pytest.mark.parametrize(
    ("opt", "error", "message"),
    [
        ({"credits": IMAGE, "credits_unit": 2}, ValueError, r"unknown opt key 'credits_unit'"),
        ({"credits": 5}, TypeError, r"'credits' must be a feature key \(str\) or a Rule, got int"),
        ({"credits": "Seedream Image"}, ValueError, r"'credits': not a feature key"),
        ({"credits_units": 2}, ValueError, r"credits_units without 'credits'"),
        (
            {"credits": IMAGE, "credits_units": "many"},
            ValueError,
            r"'credits_units': units must be a number or a callable",
        ),
        ({"credits": IMAGE, "credits_units": 0}, ValueError, r"'credits_units'"),
        ({"credits": IMAGE, "credits_idempotency": "yes"}, ValueError, r"'credits_idempotency': idempotency must be"),
        ({"credits": IMAGE, "credits_max_overage": -1}, ValueError, r"'credits_max_overage'"),
        ({"credits": IMAGE, "credits_charge_client_errors": "no"}, TypeError, r"must be a bool"),
        ({"credits": Rule(IMAGE), "credits_units": 2}, ValueError, r"is a Rule"),
    ],
)
def test_a_bad_opt_fails_when_the_app_is_built(opt: dict[str, Any], error: type[Exception], message: str) -> None:
    handler = post("/bad", opt=opt)(_handler)
    guard = CreditGuard("sqlite+aiosqlite:///:memory:")
    with pytest.raises(error, match=message) as raised:
        Litestar([handler], plugins=[CreditGuardPlugin(guard)])
    assert "POST /bad" in str(raised.value)  # the route is named


@pytest.mark.parametrize(
    ("handler", "message"),
    [(paid_socket, r"for HTTP routes, not websockets"), (conflict, r"'kling_image_to_video' by its opt")],
)
def test_a_websocket_or_a_conflicting_decorator_fails_when_the_app_is_built(handler: Any, message: str) -> None:
    guard = CreditGuard("sqlite+aiosqlite:///:memory:")
    with pytest.raises(ValueError, match=message):
        Litestar([handler], plugins=[CreditGuardPlugin(guard)])


# -- the app's own refusals come first ---------------------------------------------------------


def members_only(connection: Any, _handler: Any) -> None:
    if connection.headers.get("x-member") != "yes":
        raise PermissionDeniedException("members only")


async def team_of(request: Request[Any, Any, Any]) -> str:
    team = request.headers.get("x-team", "ops")
    if team == "ghost":
        raise NotFoundException("no such team")
    return team


try:  # Litestar 2.23+ wants dependencies marked; older ones infer them from the name
    from litestar.di import NamedDependency

    Team: Any = NamedDependency[str]
except ImportError:  # pragma: no cover - the lowest versions
    Team = str


@dataclass
class RenderJob:
    prompt: str


@post(
    "/team-render",
    opt={"credits": IMAGE},
    guards=[members_only],
    dependencies={"team": Provide(team_of)},
)
async def team_render(data: Annotated[RenderJob, Body()], team: Team) -> dict[str, str]:
    ran.append(f"team-render {team}")
    return {"team": team, "prompt": data.prompt}


@post("/sync-render", opt={"credits": IMAGE}, sync_to_thread=False)
def sync_render() -> dict[str, str]:
    ran.append("sync-render")
    return {"ok": "yes"}


def build_team_app(guard: CreditGuard) -> Any:
    return Litestar([team_render, sync_render], middleware=[DemoAuth()], plugins=[CreditGuardPlugin(guard)])


async def test_an_opt_route_is_charged_after_the_apps_guards_dependencies_and_validation(
    guard: CreditGuard,
) -> None:
    """Issue 19: the plugin charged opt routes before Litestar's guards, so a team without
    credits got 402 where the app answers 403/404/400, and a 402 told a non-member whether
    a team has credits. Charged where the decorator charges: right before the handler."""
    member = {**ORG, "x-member": "yes"}
    job = {"prompt": "a red fox"}
    async with client(build_team_app(guard)) as c:  # org_1 has no credits at all
        stranger = await c.post("/team-render", headers=ORG, json=job)
        ghost = await c.post("/team-render", headers={**member, "x-team": "ghost"}, json=job)
        malformed = await c.post("/team-render", headers=member, json={"nope": 1})
        broke = await c.post("/team-render", headers=member, json=job)
        await guard.grant_credits("org_1", 7)
        paid = await c.post("/team-render", headers=member, json=job)
        malformed_after = await c.post("/team-render", headers=member, json={"nope": 1})
        sync = await c.post("/sync-render", headers=ORG)
    assert [stranger.status_code, ghost.status_code, malformed.status_code] == [403, 404, 400]
    assert "x-credits-remaining" not in stranger.headers  # nothing about the team's credits
    assert broke.status_code == 402 and broke.json()["available"] == 0
    assert (paid.status_code, paid.json(), paid.headers["x-credits-remaining"]) == (
        201,
        {"team": "ops", "prompt": "a red fox"},
        "2",
    )
    assert malformed_after.status_code == 400 and "x-credits-charged" not in malformed_after.headers
    assert sync.status_code == 402  # 2 credits left: a sync handler is charged the same way
    assert ran == ["team-render ops"]
    await guard.flush()
    assert await guard.get_balance("org_1") == 2
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.audit() == []
