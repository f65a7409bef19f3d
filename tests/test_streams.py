"""Metered streams: a reserve before the handler, ``report_usage`` as the stream goes, a
settlement at what was produced; and what a client that hangs up mid-stream pays:
nothing (the default) or what it was sent (``on_disconnect="charge_usage"``).

The hang-ups are driven two ways: in process, by an ASGI client that reads a known number
of chunks and then says ``http.disconnect`` (exact), and on a real uvicorn serving the
FastAPI example, by a client that reads five tokens and closes its socket."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from litestar import Litestar, post
from litestar import Request as LitestarRequest
from litestar.response import Stream
from starlette.requests import Request
from starlette.responses import StreamingResponse

from credit_guard import CreditGuard, current_ticket, requires_credits
from credit_guard.contrib.litestar import CreditGuardPlugin

from .conftest import ledger_rows
from .helpers import OrgFromHeader, UvicornServer, client
from .litestar_handlers import DemoAuth

pytestmark = pytest.mark.anyio

TOKENS = "llm_chat_token"
RESERVE = 20  # tokens reserved (1 credit each)


async def price_tokens(guard: CreditGuard) -> None:
    await guard.create_pricing(feature_key=TOKENS, feature_name="Chat tokens", category="Text", credits=1)


def chat_app(guard: CreditGuard, *, produce: int = 12, **options: Any) -> FastAPI:
    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/v1/chat")
    @requires_credits(TOKENS, units=RESERVE, **options)
    async def chat(request: Request) -> StreamingResponse:
        ticket = current_ticket(request)
        assert ticket is not None

        async def tokens() -> AsyncIterator[bytes]:
            for n in range(1, produce + 1):
                await anyio.sleep(0.005)  # a model's pace: the hang-up lands while it thinks
                ticket.report_usage(n)
                yield f"data: tok{n}\n\n".encode()

        return StreamingResponse(tokens(), media_type="text/event-stream")

    app.add_middleware(OrgFromHeader)
    return app


async def read_then_hang_up(app: Any, chunks: int, headers: dict[str, str] | None = None) -> list[bytes]:
    """An ASGI client that reads ``chunks`` body chunks, then hangs up (``http.disconnect``)."""
    received: list[bytes] = []
    gone = anyio.Event()
    if chunks == 0:
        gone.set()
    raw = [(k.encode(), v.encode()) for k, v in {"x-org": "acme", **(headers or {})}.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat",
        "raw_path": b"/v1/chat",
        "query_string": b"",
        "root_path": "",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }
    sent_request = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if len(received) == chunks:
                gone.set()

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return received


async def settled(guard: CreditGuard, org: str = "acme") -> list[tuple[str, int]]:
    await guard.flush()
    return [(str(r["kind"]), int(r["amount"])) for r in await ledger_rows(guard, org) if r["kind"] != "grant"]  # type: ignore[call-overload]


async def test_a_stream_cut_at_five_tokens_pays_five_under_charge_usage(guard: CreditGuard) -> None:
    await price_tokens(guard)
    await guard.grant_credits("acme", 100)
    got = await read_then_hang_up(chat_app(guard, on_disconnect="charge_usage"), 5)
    assert got == [f"data: tok{n}\n\n".encode() for n in range(1, 6)]
    assert await guard.get_balance("acme") == 95
    moves = await settled(guard)
    assert moves[0] == ("charge", -RESERVE) and sum(amount for _, amount in moves) == -5
    assert await guard.audit() == []


async def test_by_default_a_client_that_hangs_up_mid_stream_pays_nothing(guard: CreditGuard) -> None:
    await price_tokens(guard)
    await guard.grant_credits("acme", 100)
    assert len(await read_then_hang_up(chat_app(guard), 5)) == 5
    assert await guard.get_balance("acme") == 100
    assert await settled(guard) == [("charge", -RESERVE), ("refund", RESERVE)]
    assert await guard.audit() == []


async def test_a_hang_up_before_any_token_pays_nothing_even_under_charge_usage(guard: CreditGuard) -> None:
    """No usage reported yet: nothing was produced, so nothing is paid."""
    await price_tokens(guard)
    await guard.grant_credits("acme", 100)
    assert await read_then_hang_up(chat_app(guard, on_disconnect="charge_usage"), 0) == []
    assert await guard.get_balance("acme") == 100
    assert await settled(guard) == [("charge", -RESERVE), ("refund", RESERVE)]
    assert await guard.audit() == []


async def test_a_stream_read_to_its_end_settles_at_what_it_produced(guard: CreditGuard) -> None:
    await price_tokens(guard)
    await guard.grant_credits("acme", 100)
    async with client(chat_app(guard, produce=12, on_disconnect="charge_usage")) as http:
        answer = await http.post("/v1/chat", headers={"x-org": "acme"})
    assert answer.status_code == 200 and answer.text.count("data: tok") == 12
    assert answer.headers["x-credits-charged"] == str(RESERVE)  # the reserve: sent before the stream
    assert await guard.get_balance("acme") == 88
    assert await guard.audit() == []


async def test_usage_past_the_reserve_is_charged_up_to_max_overage(guard: CreditGuard) -> None:
    await price_tokens(guard)
    await guard.grant_credits("acme", 100)
    async with client(chat_app(guard, produce=40, max_overage=0.5, on_disconnect="charge_usage")) as http:
        assert (await http.post("/v1/chat", headers={"x-org": "acme"})).status_code == 200
    assert await guard.get_balance("acme") == 100 - 30  # 20 reserved + at most half of it more
    cut = await read_then_hang_up(chat_app(guard, produce=40, max_overage=0.5, on_disconnect="charge_usage"), 25)
    assert len(cut) == 25
    assert await guard.get_balance("acme") == 100 - 30 - 25
    assert await guard.audit() == []


async def test_a_stream_on_litestars_middleware_path_is_metered_the_same(guard: CreditGuard) -> None:
    from litestar.response import Stream

    await price_tokens(guard)
    await guard.grant_credits("acme", 100)

    @post(
        "/v1/chat",
        opt={"credits": TOKENS, "credits_units": RESERVE, "credits_on_disconnect": "charge_usage"},
        status_code=200,
    )
    async def chat(request: LitestarRequest[Any, Any, Any]) -> Stream:
        ticket = current_ticket(request)
        assert ticket is not None

        async def tokens() -> AsyncIterator[bytes]:
            for n in range(1, 13):
                await anyio.sleep(0.005)
                ticket.report_usage(n)
                yield f"data: tok{n}\n\n".encode()

        return Stream(tokens(), media_type="text/event-stream")

    app = Litestar([chat], middleware=[DemoAuth()], plugins=[CreditGuardPlugin(guard)])
    assert len(await read_then_hang_up(app, 7, {"x-org": "acme"})) == 7
    assert await guard.get_balance("acme") == 93
    assert await guard.audit() == []


def test_a_real_client_hanging_up_after_five_tokens_of_the_examples_chat_pays_five(
    fresh_db: str, tmp_path: Path
) -> None:
    """The FastAPI example's /v1/chat on uvicorn: five tokens read, the socket closed."""
    env = {"CREDIT_GUARD_DATABASE_URL": fresh_db, "DEMO_TOKEN_DELAY": "0.2"}
    server = UvicornServer("examples.fastapi_app.app:app", env, tmp_path / "uvicorn.log", factory=False)
    with server.start(health="/openapi.json"):
        headers = {"x-api-key": "demo-key-rich"}
        with httpx.Client(base_url=server.base, timeout=10) as http:
            before = int(http.get("/api/credits/balance", headers=headers).json()["credits"])
            with http.stream(
                "POST", "/v1/chat", json={"prompt": "otters", "max_tokens": 30}, headers=headers
            ) as answer:
                assert answer.status_code == 200 and answer.headers["x-credits-charged"] == "30"
                tokens = []
                for line in answer.iter_lines():
                    if line.startswith("data: "):
                        tokens.append(json.loads(line[6:])["token"])
                    if len(tokens) == 5:
                        break  # leaving the block closes the connection mid-stream
            assert tokens[:2] == ["You", "asked"]
            deadline, paid = time.monotonic() + 10, 30
            while paid == 30 and time.monotonic() < deadline:  # until the server has seen the hang-up
                time.sleep(0.05)
                paid = before - int(http.get("/api/credits/balance", headers=headers).json()["credits"])
            assert paid == 5
            full = http.post("/v1/chat", json={"prompt": "otters", "max_tokens": 3}, headers=headers)
            assert full.status_code == 200 and full.text.count("data: ") == 4  # three tokens and [DONE]
            after = int(http.get("/api/credits/balance", headers=headers).json()["credits"])
            assert before - after == 5 + 3
    assert "Traceback" not in server.log()
