"""Idempotency-Key: a client that retries a paid request must never pay twice.

Every test runs on SQLite and PostgreSQL (the ``db_url`` params) and checks the money in
the ledger, not just the status codes: a replay that re-ran the handler, or a 409 that
charged, would show up as an extra ledger row or a moved balance.

The handlers number their calls (``n``) so that a replay that secretly re-ran the handler
cannot pass for the original: its body would carry another number.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi import Request as FastAPIRequest
from litestar import Litestar
from litestar import Request as LitestarRequest
from litestar import post as litestar_post
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware, Problem, Rule
from credit_guard._clock import utcnow
from credit_guard.contrib.litestar import requires_credits as litestar_requires_credits
from credit_guard.contrib.starlette import requires_credits
from credit_guard.errors import IdempotencyKeyReused
from credit_guard.problems import PROBLEM_CONTENT_TYPE, TYPE_IDEMPOTENCY_CONFLICT, TYPE_IDEMPOTENCY_MISMATCH
from credit_guard.schema import idempotency_keys

from .conftest import ledger_rows, reset_postgres, seed_prices
from .helpers import OrgOnly, client
from .litestar_handlers import DemoAuth as LitestarAuth

pytestmark = pytest.mark.anyio

ORG_1 = {"x-org": "org_1"}
ORG_2 = {"x-org": "org_2"}
BODY = b'{"prompt": "a red fox"}'


def key(value: str | bytes, org: dict[str, str] = ORG_1) -> dict[str, Any]:
    return {**org, "Idempotency-Key": value, "content-type": "application/json"}


@asynccontextmanager
async def open_guard(db_url: str, **options: Any) -> AsyncIterator[CreditGuard]:
    """A guard built like conftest's ``guard`` fixture, with idempotency options of its own."""
    async with CreditGuard(db_url, **options) as g:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)
        await seed_prices(g)
        yield g


@pytest.fixture
async def iguard(db_url: str) -> AsyncIterator[CreditGuard]:
    """Keys honoured on every paid route (``idempotency=True`` at the guard level)."""
    async with open_guard(db_url, idempotency=True) as g:
        yield g


async def charges(guard: CreditGuard, organization_id: str = "org_1") -> list[dict[str, object]]:
    return [row for row in await ledger_rows(guard, organization_id) if row["kind"] == "charge"]


async def kinds(guard: CreditGuard, organization_id: str = "org_1") -> list[object]:
    return [row["kind"] for row in await ledger_rows(guard, organization_id)]


async def stored_keys(guard: CreditGuard) -> int:
    async with guard.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(idempotency_keys)) or 0)


def replayed(r: httpx.Response) -> bool:
    return bool(r.headers.get("idempotent-replayed") == "true")


def same_response(original: httpx.Response, replay: httpx.Response) -> None:
    """The replay is the original byte for byte, plus ``Idempotent-Replayed: true``."""
    assert replayed(replay) and not replayed(original)
    assert replay.status_code == original.status_code
    assert replay.content == original.content
    replay_headers = sorted((k, v) for k, v in replay.headers.multi_items() if k != "idempotent-replayed")
    assert replay_headers == sorted(original.headers.multi_items())


def assert_problem(r: httpx.Response, status: int, problem_type: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    if problem_type is not None:
        assert body["type"] == problem_type
    return body


# -- the middleware -------------------------------------------------------------------------


DemoAuth = OrgOnly


@dataclass
class Backend:
    """The app's handlers and what they saw; ``fail_next`` makes the next calls fail."""

    calls: list[str] = field(default_factory=list)
    fail_next: list[str] = field(default_factory=list)
    started: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)

    async def images(self, request: Request) -> JSONResponse:
        body = await request.body()  # the middleware read it first: the app must still get it
        self.calls.append(f"{request.method} {request.url.path} {body.decode()}")
        n = len(self.calls)
        if self.fail_next:
            how = self.fail_next.pop(0)
            if how == "raise":
                raise RuntimeError("model server exploded")
            return JSONResponse({"error": "upstream", "n": n}, status_code=int(how))
        return JSONResponse({"url": f"https://cdn.example/{n}.png", "n": n}, headers={"x-job": f"job-{n}"})

    async def missing(self, request: Request) -> JSONResponse:
        self.calls.append("missing")
        return JSONResponse({"error": "no such model", "n": len(self.calls)}, status_code=404)

    async def slow(self, request: Request) -> JSONResponse:
        self.calls.append("slow")
        self.started.set()
        await self.release.wait()
        return JSONResponse({"slow": len(self.calls)})

    async def stream(self, request: Request) -> StreamingResponse:
        self.calls.append("stream")
        n = len(self.calls)

        async def frames() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"frame-{n}-{i}\n".encode()

        return StreamingResponse(frames(), media_type="text/plain")

    async def big(self, request: Request) -> Response:
        self.calls.append("big")
        return Response(b"x" * 4096, media_type="application/octet-stream", headers={"x-job": "big"})


def build_app(guard: CreditGuard, rules: dict[str, str | Rule] | None = None) -> tuple[Starlette, Backend]:
    backend = Backend()
    app = Starlette(
        routes=[
            Route("/v1/images", backend.images, methods=["POST", "PUT"]),
            Route("/v1/other", backend.images, methods=["POST"]),
            Route("/v1/plain", backend.images, methods=["POST"]),
            Route("/v1/required", backend.images, methods=["POST"]),
            Route("/v1/missing", backend.missing, methods=["POST"]),
            Route("/v1/slow", backend.slow, methods=["POST"]),
            Route("/v1/big", backend.big, methods=["POST"]),
            Route("/v1/stream", backend.stream, methods=["POST"]),
        ]
    )
    default_rules: dict[str, str | Rule] = {
        "POST /v1/images": "seedream_text_to_image",
        "PUT /v1/images": "seedream_text_to_image",
        "POST /v1/other": "seedream_text_to_image",
        "POST /v1/required": Rule("seedream_text_to_image", idempotency="required"),
        "POST /v1/missing": "seedream_text_to_image",
        "POST /v1/slow": "seedream_text_to_image",
        "POST /v1/big": "seedream_text_to_image",
        "POST /v1/stream": "seedream_text_to_image",
    }
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules=rules if rules is not None else default_rules)
    app.add_middleware(DemoAuth)
    return app, backend


async def test_retry_replays_the_first_response_without_charging_again(iguard: CreditGuard) -> None:
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        first = await c.post("/v1/images", headers=key("k1"), content=BODY)
        assert first.status_code == 200
        assert (first.headers["x-credits-charged"], first.headers["x-credits-remaining"]) == ("5", "15")
        assert first.json()["n"] == 1 and first.headers["x-job"] == "job-1"
        assert len(await charges(iguard)) == 1
        await iguard.flush()
        retry = await c.post("/v1/images", headers=key("k1"), content=BODY)
        again = await c.post("/v1/images", headers=key('"k1"'), content=BODY)  # the draft's quoted form
    same_response(first, retry)
    same_response(first, again)
    assert backend.calls == [f"POST /v1/images {BODY.decode()}"]  # the handler ran once, with the body
    assert await kinds(iguard) == ["grant", "charge"]
    assert await iguard.get_balance("org_1") == 15
    assert await iguard.open_holds() == []
    assert await iguard.audit() == []


async def test_a_4xx_answer_is_refunded_and_frees_its_key(iguard: CreditGuard) -> None:
    """By default a 4xx is refunded like a 5xx: its key is freed, so the retry runs (and pays) again."""
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        first = await c.post("/v1/missing", headers=key("k404"), content=BODY)
        await iguard.flush()
        retry = await c.post("/v1/missing", headers=key("k404"), content=BODY)
    assert (first.status_code, first.headers["x-credits-refunded"]) == (404, "5")
    assert (retry.status_code, retry.headers["x-credits-refunded"]) == (404, "5")
    assert "idempotent-replayed" not in retry.headers
    assert backend.calls == ["missing", "missing"]
    assert await kinds(iguard) == ["grant", "charge", "refund", "charge", "refund"]
    assert await iguard.get_balance("org_1") == 20


async def test_a_4xx_answer_is_charged_once_and_replayed(iguard: CreditGuard) -> None:
    """A 4xx on a guard that charges client errors is an answer: the retry gets it back, free."""
    iguard.charge_client_errors = True
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        first = await c.post("/v1/missing", headers=key("k404"), content=BODY)
        await iguard.flush()
        retry = await c.post("/v1/missing", headers=key("k404"), content=BODY)
    assert first.status_code == 404 and first.headers["x-credits-charged"] == "5"
    same_response(first, retry)
    assert backend.calls == ["missing"]
    assert await kinds(iguard) == ["grant", "charge"]
    assert await iguard.get_balance("org_1") == 15


async def test_retry_while_the_first_is_running_is_409_and_free(iguard: CreditGuard) -> None:
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    results: dict[str, httpx.Response] = {}
    async with client(app) as c:

        async def first() -> None:
            results["first"] = await c.post("/v1/slow", headers=key("k-slow"), content=BODY)

        # Bounded: a guard that let the retry through would block it in the slow handler.
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await backend.started.wait()  # the first request is inside its handler, charged
                try:
                    results["during"] = await c.post("/v1/slow", headers=key("k-slow"), content=BODY)
                finally:
                    backend.release.set()
        assert await iguard.get_balance("org_1") == 15  # only the first one's charge
        await iguard.flush()
        results["after"] = await c.post("/v1/slow", headers=key("k-slow"), content=BODY)
    during = results["during"]
    body = assert_problem(during, 409, TYPE_IDEMPOTENCY_CONFLICT)
    assert body["idempotency_key"] == "k-slow"
    assert int(during.headers["retry-after"]) >= 1
    assert "x-credits-charged" not in during.headers
    assert results["first"].status_code == 200
    same_response(results["first"], results["after"])
    assert backend.calls == ["slow"]
    assert await kinds(iguard) == ["grant", "charge"]
    assert await iguard.get_balance("org_1") == 15


async def test_an_immediate_retry_of_a_finished_request_is_replayed_not_409(db_url: str) -> None:
    """A client that lost the answer retries at once, while the finished response still
    waits in the settlement batch (here a slow one, 5 s): the retry finds it queued in this
    process, has the batch written, and is replayed, not told to come back later."""
    async with open_guard(db_url, idempotency=True, settle_delay=5.0) as g:
        await g.grant_credits("org_1", 20)
        app, backend = build_app(g)
        async with client(app) as c:
            first = await c.post("/v1/images", headers=key("quick"), content=BODY)
            with anyio.fail_after(3):  # well before the batch's own 5 s
                retry = await c.post("/v1/images", headers=key("quick"), content=BODY)
        assert first.status_code == 200
        same_response(first, retry)
        assert len(backend.calls) == 1
        assert await kinds(g) == ["grant", "charge"]
        assert await g.open_holds() == []  # the retry's flush settled the first one's hold too
        assert await g.get_balance("org_1") == 15


@pytest.mark.parametrize(
    ("method", "path", "body", "query"),
    [
        ("POST", "/v1/images", b'{"prompt": "a blue fox"}', ""),
        ("POST", "/v1/other", BODY, ""),
        ("PUT", "/v1/images", BODY, ""),
        ("POST", "/v1/images", BODY, "?size=big"),
    ],
    ids=["body", "path", "method", "query"],
)
async def test_same_key_for_another_request_is_422_and_free(
    iguard: CreditGuard, method: str, path: str, body: bytes, query: str
) -> None:
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        first = await c.post("/v1/images", headers=key("k1"), content=BODY)
        await iguard.flush()
        reused = await c.request(method, path + query, headers=key("k1"), content=body)
        # Before the first is even settled the answer is the same: the key names one request.
        early = await c.post("/v1/images", headers=key("k2"), content=BODY)
        early_reused = await c.request(method, path + query, headers=key("k2"), content=body)
    assert first.status_code == early.status_code == 200
    for r in (reused, early_reused):
        assert assert_problem(r, 422, TYPE_IDEMPOTENCY_MISMATCH)["idempotency_key"] in ("k1", "k2")
        assert "x-credits-charged" not in r.headers
    assert len(backend.calls) == 2  # the two firsts; neither reuse ran
    assert await kinds(iguard) == ["grant", "charge", "charge"]
    assert await iguard.get_balance("org_1") == 10


@pytest.mark.parametrize("failure", ["500", "502", "raise"])
async def test_a_failed_first_try_is_refunded_and_frees_its_key(iguard: CreditGuard, failure: str) -> None:
    """The retry runs again and pays again: net, exactly one charge is kept."""
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    backend.fail_next.append(failure)
    async with client(app) as c:
        first = await c.post("/v1/images", headers=key("k1"), content=BODY)
        await iguard.flush()
        retry = await c.post("/v1/images", headers=key("k1"), content=BODY)
        await iguard.flush()
        replay = await c.post("/v1/images", headers=key("k1"), content=BODY)
    assert first.status_code == (500 if failure == "raise" else int(failure))
    assert not replayed(first)
    assert retry.status_code == 200 and not replayed(retry) and retry.json()["n"] == 2
    same_response(retry, replay)  # the successful retry is what the key now answers
    assert len(backend.calls) == 2
    rows = await ledger_rows(iguard, "org_1")
    assert [(row["kind"], row["amount"]) for row in rows] == [
        ("grant", 20),
        ("charge", -5),
        ("refund", 5),
        ("charge", -5),
    ]
    assert rows[2]["refund_of"] == rows[1]["id"]
    assert await iguard.get_balance("org_1") == 15
    assert await iguard.audit() == []


async def test_keys_are_scoped_per_organization(iguard: CreditGuard) -> None:
    await iguard.grant_credits("org_1", 20)
    await iguard.grant_credits("org_2", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        one = await c.post("/v1/images", headers=key("shared"), content=BODY)
        two = await c.post("/v1/images", headers=key("shared", ORG_2), content=BODY)
        await iguard.flush()
        one_again = await c.post("/v1/images", headers=key("shared"), content=BODY)
        two_again = await c.post("/v1/images", headers=key("shared", ORG_2), content=BODY)
    assert (one.json()["n"], two.json()["n"]) == (1, 2)  # two requests, two runs
    same_response(one, one_again)
    same_response(two, two_again)
    assert len(backend.calls) == 2
    assert await kinds(iguard, "org_1") == await kinds(iguard, "org_2") == ["grant", "charge"]
    assert await iguard.get_balance("org_1") == await iguard.get_balance("org_2") == 15


async def test_a_key_expires_after_idempotency_ttl(db_url: str) -> None:
    """Past its TTL a key names a new request: run and charged again (no sweep needed)."""
    async with open_guard(db_url, idempotency=True, idempotency_ttl=0.2) as g:
        await g.grant_credits("org_1", 20)
        app, backend = build_app(g)
        async with client(app) as c:
            first = await c.post("/v1/images", headers=key("k1"), content=BODY)
            await g.flush()
            await anyio.sleep(0.3)
            second = await c.post("/v1/images", headers=key("k1"), content=BODY)
            await g.flush()
            third = await c.post("/v1/images", headers=key("k1"), content=BODY)
        assert (first.json()["n"], second.json()["n"]) == (1, 2)
        assert not replayed(second)
        same_response(second, third)  # the new claim is a key like any other
        assert len(backend.calls) == 2
        assert await kinds(g) == ["grant", "charge", "charge"]
        assert await g.get_balance("org_1") == 10
        assert await g.audit() == []


async def test_the_sweep_deletes_expired_keys(iguard: CreditGuard) -> None:
    """``release_expired_holds(now=...)`` forgets keys past their TTL (and refunds nothing
    here: every hold was settled)."""
    await iguard.grant_credits("org_1", 20)
    app, _ = build_app(iguard)
    async with client(app) as c:
        first = await c.post("/v1/images", headers=key("k1"), content=BODY)
        await iguard.flush()
        assert await iguard.release_expired_holds(now=utcnow() + timedelta(hours=1)) == 0
        assert await stored_keys(iguard) == 1  # not expired yet: kept
        replay = await c.post("/v1/images", headers=key("k1"), content=BODY)
        later = utcnow() + timedelta(seconds=iguard.idempotency_ttl + 60)
        assert await iguard.release_expired_holds(now=later) == 0
        assert await stored_keys(iguard) == 0
        second = await c.post("/v1/images", headers=key("k1"), content=BODY)
    same_response(first, replay)
    assert second.status_code == 200 and not replayed(second) and second.json()["n"] == 2
    assert await kinds(iguard) == ["grant", "charge", "charge"]
    assert await iguard.get_balance("org_1") == 10


@pytest.mark.parametrize(
    "bad_key",
    [b"", b"   ", b"k" * 256, "café".encode(), b"two words"],
    ids=["empty", "blank", "256-chars", "non-ascii", "space-inside"],
)
async def test_malformed_key_is_400_and_free(iguard: CreditGuard, bad_key: bytes) -> None:
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        for path in ("/v1/images", "/v1/required"):
            r = await c.post(path, headers=key(bad_key), content=BODY)
            assert "Idempotency-Key" in assert_problem(r, 400)["errors"]
        longest = await c.post("/v1/images", headers=key("k" * 255), content=BODY)  # the limit itself is fine
    assert longest.status_code == 200
    assert len(backend.calls) == 1
    assert await kinds(iguard) == ["grant", "charge"]


async def test_required_on_a_route_refuses_a_missing_key(guard: CreditGuard) -> None:
    """``Rule(idempotency="required")`` on a guard whose default is off: that route needs a
    key, a route that opted in with True honours one, and a route that did not opt in
    ignores it (so it charges every time: the header is not a free replay switch)."""
    await guard.grant_credits("org_1", 40)
    rules: dict[str, str | Rule] = {
        "POST /v1/required": Rule("seedream_text_to_image", idempotency="required"),
        "POST /v1/images": Rule("seedream_text_to_image", idempotency=True),
        "POST /v1/plain": "seedream_text_to_image",
    }
    app, backend = build_app(guard, rules)
    async with client(app) as c:
        missing = await c.post("/v1/required", headers=ORG_1, content=BODY)
        with_key = await c.post("/v1/required", headers=key("r1"), content=BODY)
        optional = await c.post("/v1/images", headers=ORG_1, content=BODY)  # True: a key is optional
        plain = [await c.post("/v1/plain", headers=key("p1"), content=BODY) for _ in range(2)]
        await guard.flush()
        with_key_again = await c.post("/v1/required", headers=key("r1"), content=BODY)
    assert "Idempotency-Key" in assert_problem(missing, 400)["errors"]
    assert "x-credits-charged" not in missing.headers
    assert with_key.status_code == optional.status_code == 200
    same_response(with_key, with_key_again)
    assert [r.json()["n"] for r in plain] == [3, 4]
    assert not any(replayed(r) for r in plain)
    assert len(backend.calls) == 4
    assert await kinds(guard) == ["grant"] + ["charge"] * 4
    assert await guard.get_balance("org_1") == 20


async def test_required_at_the_guard_level(db_url: str) -> None:
    async with open_guard(db_url, idempotency="required") as g:
        await g.grant_credits("org_1", 20)
        app, backend = build_app(g, {"POST /v1/images": "seedream_text_to_image"})
        async with client(app) as c:
            missing = await c.post("/v1/images", headers=ORG_1, content=BODY)
            free_route = await c.post("/v1/plain", headers=ORG_1, content=BODY)  # no rule: not paid, no key needed
            ok = await c.post("/v1/images", headers=key("g1"), content=BODY)
        assert_problem(missing, 400)
        assert free_route.status_code == ok.status_code == 200
        assert len(backend.calls) == 2
        assert await kinds(g) == ["grant", "charge"]


async def test_a_body_above_idempotency_max_body_is_replayed_without_it(db_url: str) -> None:
    async with open_guard(db_url, idempotency=True, idempotency_max_body=1000) as g:
        await g.grant_credits("org_1", 20)
        app, backend = build_app(g)
        async with client(app) as c:
            first = await c.post("/v1/big", headers=key("big"), content=BODY)
            small = await c.post("/v1/images", headers=key("small"), content=BODY)
            await g.flush()
            replay = await c.post("/v1/big", headers=key("big"), content=BODY)
            small_replay = await c.post("/v1/images", headers=key("small"), content=BODY)
        assert first.status_code == 200 and first.content == b"x" * 4096
        assert replayed(replay) and replay.headers["idempotent-body-omitted"] == "true"
        assert replay.status_code == 200 and replay.content == b""
        assert replay.headers["content-length"] == "0"
        for name in ("content-type", "x-job", "x-credits-charged", "x-credits-remaining"):
            assert replay.headers[name] == first.headers[name]
        same_response(small, small_replay)  # under the limit: the body is kept
        assert "idempotent-body-omitted" not in small_replay.headers
        assert backend.calls.count("big") == 1
        assert await kinds(g) == ["grant", "charge", "charge"]


async def test_a_request_body_above_the_fingerprint_limit_is_413_and_free(db_url: str) -> None:
    """The middleware holds an idempotent request's body to fingerprint it, so a body over
    ``idempotency_max_request_body`` is refused before any charge; without a key it runs."""
    async with open_guard(db_url, idempotency=True, idempotency_max_request_body=64) as g:
        await g.grant_credits("org_1", 20)
        app, backend = build_app(g)
        async with client(app) as c:
            refused = await c.post("/v1/images", headers=key("huge"), content=b"y" * 65)
            fits = await c.post("/v1/images", headers=key("fits"), content=b"y" * 64)
        problem = assert_problem(refused, 413)
        assert problem["limit"] == 64 and "nothing was charged" in problem["detail"]
        assert fits.status_code == 200 and len(backend.calls) == 1
        assert await kinds(g) == ["grant", "charge"]
        assert await g.get_balance("org_1") == 20 - 5
        assert await g.audit() == []


async def test_a_streamed_body_is_replayed_whole(iguard: CreditGuard) -> None:
    """The recorder keeps every chunk as it goes out, not just the first."""
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        first = await c.post("/v1/stream", headers=key("s1"), content=BODY)
        await iguard.flush()
        retry = await c.post("/v1/stream", headers=key("s1"), content=BODY)
    assert first.content == b"frame-1-0\nframe-1-1\nframe-1-2\n"
    assert replayed(retry) and retry.status_code == 200
    assert retry.content == first.content
    assert retry.headers["content-length"] == str(len(first.content))  # was chunked: now known
    assert backend.calls == ["stream"]
    assert await kinds(iguard) == ["grant", "charge"]


async def test_a_key_does_not_expire_while_its_first_request_runs(db_url: str) -> None:
    """A request that outlives ``idempotency_ttl`` (a long video job, a short TTL) must
    still answer its retries with 409: the TTL is for remembering answers, and a request
    still running has not answered yet."""
    async with open_guard(db_url, idempotency=True, idempotency_ttl=0.2) as g:
        await g.grant_credits("org_1", 20)
        app, backend = build_app(g)
        results: dict[str, httpx.Response] = {}
        async with client(app) as c:

            async def first() -> None:
                results["first"] = await c.post("/v1/slow", headers=key("long"), content=BODY)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(first)
                    await backend.started.wait()
                    await anyio.sleep(0.3)  # past the TTL, the first still running
                    try:  # a retry let through would block in the handler: fail_after ends it
                        results["retry"] = await c.post("/v1/slow", headers=key("long"), content=BODY)
                    finally:
                        backend.release.set()
        assert results["first"].status_code == 200
        assert_problem(results["retry"], 409, TYPE_IDEMPOTENCY_CONFLICT)
        assert backend.calls == ["slow"]
        assert await kinds(g) == ["grant", "charge"]


async def test_402_does_not_consume_the_key(iguard: CreditGuard) -> None:
    """A short balance charges nothing and claims nothing: after a top-up the same key runs."""
    await iguard.grant_credits("org_1", 3)
    app, backend = build_app(iguard)
    async with client(app) as c:
        short = await c.post("/v1/images", headers=key("k1"), content=BODY)
        assert await stored_keys(iguard) == 0
        await iguard.grant_credits("org_1", 10)
        paid = await c.post("/v1/images", headers=key("k1"), content=BODY)
    body = assert_problem(short, 402)
    assert (body["required"], body["available"]) == (5, 3)
    assert paid.status_code == 200 and not replayed(paid)
    assert paid.headers["x-credits-remaining"] == "8"
    assert len(backend.calls) == 1
    assert await kinds(iguard) == ["grant", "grant", "charge"]


# -- concurrency ---------------------------------------------------------------------------


async def test_thirty_concurrent_retries_pay_once(iguard: CreditGuard) -> None:
    """A client that fires the same request 30 times at once (a retry storm) pays once.

    Each answer is the original (200), the in-progress 409, or a replay of the original;
    the key's claim and the charge are one transaction, so no interleaving charges twice.
    """
    await iguard.grant_credits("org_1", 1000)
    app, backend = build_app(iguard)
    responses: list[httpx.Response] = []
    async with client(app) as c:

        async def fire() -> None:
            responses.append(await c.post("/v1/images", headers=key("storm"), content=BODY))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(fire)
        await iguard.flush()
        responses.append(await c.post("/v1/images", headers=key("storm"), content=BODY))
    originals = [r for r in responses if r.status_code == 200 and not replayed(r)]
    assert len(originals) == 1, [r.status_code for r in responses]
    for r in responses:
        if r.status_code == 409:
            assert_problem(r, 409, TYPE_IDEMPOTENCY_CONFLICT)
        elif r is not originals[0]:
            same_response(originals[0], r)
    assert replayed(responses[-1])
    assert len(backend.calls) == 1
    assert len(await charges(iguard)) == 1
    assert await iguard.get_balance("org_1") == 995
    assert await iguard.audit() == []


async def race_distinct_keys(guard: CreditGuard, org: str) -> None:
    await guard.grant_credits(org, 100)
    app, backend = build_app(guard)
    statuses: dict[str, int] = {}
    headers = {"x-org": org}  # key() sends the organization too
    async with client(app) as c:

        async def fire(i: int) -> None:
            response = await c.post("/v1/images", headers=key(f"race-{i}", headers), content=BODY)
            statuses[f"race-{i}"] = response.status_code

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(fire, i)
        await guard.flush()
        assert sorted(statuses.values()).count(200) == 20 and sorted(statuses.values()).count(402) == 40
        async with guard.engine.connect() as conn:
            kept = await conn.scalar(
                select(func.count()).select_from(idempotency_keys).where(idempotency_keys.c.organization_id == org)
            )
        assert kept == 20
        refused = next(k for k, status in statuses.items() if status == 402)
        await guard.grant_credits(org, 5)
        retry = await c.post("/v1/images", headers=key(refused, headers), content=BODY)
    assert retry.status_code == 200 and not replayed(retry)
    assert len(backend.calls) == 21 and len(await charges(guard, org)) == 21
    assert await guard.get_balance(org) == 0
    assert await guard.audit() == []


async def test_distinct_keys_racing_for_a_short_balance_overdraw_nothing_and_keep_no_claim(
    iguard: CreditGuard,
) -> None:
    """60 requests, each with its own key, on an account funded for 20 charges: exactly 20
    are charged; each of the 40 refused ones left its key free (a claim that lost the race
    for the balance is undone with it), so the same key runs after a top-up.

    PostgreSQL claims a paid key in one statement; its fallback (a ledger id without a
    sequence) is the transaction SQLite always uses: on PostgreSQL both are raced."""
    await race_distinct_keys(iguard, "org_1")
    if iguard.engine.dialect.name == "postgresql":
        iguard.store._claims = False  # type: ignore[attr-defined]  # as if the ledger id had no sequence
        await race_distinct_keys(iguard, "org_2")


# -- the decorator ---------------------------------------------------------------------------
# This module imports Starlette, FastAPI and Litestar, so it uses the explicit adapters
# (credit_guard.contrib.*): the top-level decorator rightly refuses to guess here.


deco_calls: list[str] = []


@pytest.fixture(autouse=True)
def _reset_deco_calls() -> None:
    deco_calls.clear()


@requires_credits("seedream_text_to_image", idempotency=True)
async def st_image(request: Request) -> JSONResponse:
    deco_calls.append("starlette")
    n = len(deco_calls)
    return JSONResponse({"n": n}, status_code=201, headers={"x-job": f"job-{n}"})


def starlette_app(guard: CreditGuard) -> Starlette:
    app = Starlette(routes=[Route("/image", st_image, methods=["POST"])])
    app.state.credit_guard = guard
    app.add_middleware(DemoAuth)
    return app


def current_org(request: FastAPIRequest) -> str:
    org = request.headers.get("x-org", "")
    request.state.organization_id = org
    return org


def fastapi_app(guard: CreditGuard) -> FastAPI:
    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/image")
    @requires_credits("seedream_text_to_image", idempotency=True)
    async def image(org: str = Depends(current_org)) -> dict[str, Any]:
        deco_calls.append("fastapi")
        return {"n": len(deco_calls)}

    @app.post("/created", status_code=201)
    @requires_credits("seedream_text_to_image", idempotency=True)
    async def created(org: str = Depends(current_org)) -> dict[str, Any]:
        deco_calls.append("fastapi-created")
        return {"n": len(deco_calls)}

    return app


@litestar_post("/image")
@litestar_requires_credits("seedream_text_to_image", idempotency=True)
async def ls_image(request: LitestarRequest[Any, Any, Any]) -> dict[str, int]:
    deco_calls.append("litestar")
    return {"n": len(deco_calls)}


def litestar_app(guard: CreditGuard) -> Any:  # an ASGI app; Litestar's own scope types are narrower
    app = Litestar([ls_image], middleware=[LitestarAuth()])
    app.state.credit_guard = guard
    return app


async def test_decorator_on_starlette_replays_the_response(guard: CreditGuard) -> None:
    """A returned Response goes out through the same recorder as the middleware's: the
    replay has its body too."""
    await guard.grant_credits("org_1", 20)
    async with client(starlette_app(guard)) as c:
        first = await c.post("/image", headers=key("d1"), content=BODY)
        await guard.flush()
        retry = await c.post("/image", headers=key("d1"), content=BODY)
        other = await c.post("/image", headers=key("d1"), content=b"{}")
    assert first.status_code == 201 and first.json() == {"n": 1}
    same_response(first, retry)
    assert_problem(other, 422, TYPE_IDEMPOTENCY_MISMATCH)
    assert deco_calls == ["starlette"]
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.get_balance("org_1") == 15


async def test_decorator_on_fastapi_dict_replays_the_status_without_the_body(guard: CreditGuard) -> None:
    """A handler returning a dict is serialised by FastAPI *after* the decorator returns, so
    the decorator never sees its bytes: the replay carries the status with
    ``Idempotent-Body-Omitted: true``, the first answer's credit headers and an empty body. What
    matters is kept: the retry is not run and not charged. Return a Response object to
    have the body replayed."""
    await guard.grant_credits("org_1", 20)
    async with client(fastapi_app(guard)) as c:
        first = await c.post("/image", headers=key("f1"), content=BODY)
        await guard.flush()
        retry = await c.post("/image", headers=key("f1"), content=BODY)
    assert first.status_code == 200 and first.json() == {"n": 1}
    assert first.headers["x-credits-charged"] == "5"
    assert retry.status_code == 200 and replayed(retry)
    assert retry.headers["idempotent-body-omitted"] == "true"
    assert (retry.headers["x-credits-charged"], retry.headers["x-credits-remaining"]) == ("5", "15")
    assert retry.content == b""
    assert deco_calls == ["fastapi"]
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.get_balance("org_1") == 15


async def test_decorator_on_fastapi_replays_the_routes_status_code(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 20)
    async with client(fastapi_app(guard)) as c:
        first = await c.post("/created", headers=key("f201"), content=BODY)
        await guard.flush()
        retry = await c.post("/created", headers=key("f201"), content=BODY)
    assert first.status_code == 201
    assert replayed(retry)
    assert retry.status_code == 201


async def test_decorator_on_litestar_replays_the_status_without_the_body(guard: CreditGuard) -> None:
    """Litestar serialises the returned value itself, as FastAPI does: status-only replay."""
    await guard.grant_credits("org_1", 20)
    async with client(litestar_app(guard)) as c:
        first = await c.post("/image", headers=key("l1"), content=BODY)
        await guard.flush()
        retry = await c.post("/image", headers=key("l1"), content=BODY)
        other = await c.post("/image", headers=key("l1"), content=b"{}")
    assert first.status_code == 201 and first.json() == {"n": 1}
    assert retry.status_code == 201 and replayed(retry)
    assert retry.headers["idempotent-body-omitted"] == "true"
    assert retry.content == b""
    assert_problem(other, 422, TYPE_IDEMPOTENCY_MISMATCH)
    assert deco_calls == ["litestar"]
    assert await kinds(guard) == ["grant", "charge"]
    assert await guard.get_balance("org_1") == 15


# -- the engine ----------------------------------------------------------------------------


async def test_engine_deduct_with_a_key_charges_once(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 20)
    first = await guard.deduct_credits("org_1", "seedream_text_to_image", idempotency_key="x")
    second = await guard.deduct_credits("org_1", "seedream_text_to_image", idempotency_key="x")
    assert first.success and not first.replayed
    assert (first.credits_deducted, first.remaining_credits) == (5, 15)
    assert second.success and second.replayed
    assert (second.charge_id, second.credits_deducted, second.remaining_credits) == (first.charge_id, 5, 15)
    assert len(await charges(guard)) == 1
    assert await guard.get_balance("org_1") == 15


@pytest.mark.parametrize(
    "other_call",
    [{"feature_key": "kling_image_to_video"}, {"feature_key": "seedream_text_to_image", "units": 2}],
    ids=["feature", "units"],
)
async def test_engine_key_reused_for_another_call_raises(guard: CreditGuard, other_call: dict[str, Any]) -> None:
    await guard.grant_credits("org_1", 100)
    first = await guard.deduct_credits("org_1", "seedream_text_to_image", idempotency_key="x")
    with pytest.raises(IdempotencyKeyReused) as caught:
        await guard.deduct_credits("org_1", idempotency_key="x", **other_call)
    assert caught.value.idempotency_key == "x"
    assert [row["id"] for row in await charges(guard)] == [first.charge_id]
    assert await guard.get_balance("org_1") == 95


async def test_engine_equal_units_are_the_same_call(guard: CreditGuard) -> None:
    """1, 1.0 and "1.00" units are one amount: a retry that spells it differently replays."""
    await guard.grant_credits("org_1", 20)
    first = await guard.deduct_credits("org_1", "seedream_text_to_image", units=1, idempotency_key="x")
    for units in (1.0, "1.00", "1"):
        again = await guard.deduct_credits("org_1", "seedream_text_to_image", units=units, idempotency_key="x")
        assert again.replayed and again.charge_id == first.charge_id
    assert len(await charges(guard)) == 1


async def test_engine_refuses_an_overlong_key_as_a_bad_argument(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 20)
    with pytest.raises(ValueError):
        await guard.deduct_credits("org_1", "seedream_text_to_image", idempotency_key="k" * 256)
    assert await guard.get_balance("org_1") == 20


async def test_engine_refund_frees_the_key(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 20)
    first = await guard.deduct_credits("org_1", "seedream_text_to_image", idempotency_key="x")
    assert first.charge_id is not None
    refund = await guard.refund_credits(first.charge_id)
    assert refund.refunded and refund.remaining_credits == 20
    again = await guard.deduct_credits("org_1", "seedream_text_to_image", idempotency_key="x")
    assert again.success and not again.replayed
    assert again.charge_id is not None and again.charge_id != first.charge_id
    replay = await guard.deduct_credits("org_1", "seedream_text_to_image", idempotency_key="x")
    assert replay.replayed and replay.charge_id == again.charge_id
    assert await kinds(guard) == ["grant", "charge", "refund", "charge"]
    assert await guard.get_balance("org_1") == 15
    assert await guard.audit() == []


async def test_another_user_of_the_organization_cannot_replay_a_users_response(iguard: CreditGuard) -> None:
    """Keys are the organization's, but a response belongs to the user who asked: the same
    key and body from a colleague is another request (422), never a replay of the first."""
    await iguard.grant_credits("org_1", 20)
    app, backend = build_app(iguard)
    async with client(app) as c:
        alice = await c.post("/v1/images", headers={**key("shared"), "x-user": "alice"}, content=BODY)
        await iguard.flush()
        bob = await c.post("/v1/images", headers={**key("shared"), "x-user": "bob"}, content=BODY)
        again = await c.post("/v1/images", headers={**key("shared"), "x-user": "alice"}, content=BODY)
    assert alice.status_code == 200
    assert_problem(bob, 422)
    assert replayed(again)
    assert len(backend.calls) == 1
    assert await kinds(iguard) == ["grant", "charge"]


async def test_a_running_key_is_not_taken_over_while_its_charge_is_held(iguard: CreditGuard) -> None:
    """A request whose heartbeat could not reach the database for a while (its key's lock
    ran out) still holds its charge: a retry then must get 409, not a second charge."""
    await iguard.grant_credits("org_1", 20)
    from credit_guard._flow import Rule, open_charge

    first = await open_charge(
        iguard,
        Rule("seedream_text_to_image"),
        {
            "type": "http",
            "method": "POST",
            "path": "/v1/images",
            "headers": [(b"idempotency-key", b"k")],
            "query_string": b"",
            "state": {"organization_id": "org_1"},
        },
        body=BODY,
    )
    assert not isinstance(first, Problem) and first.charge_id is not None
    from sqlalchemy import update

    from credit_guard.schema import idempotency_keys

    async with iguard.engine.begin() as conn:  # the lock ran out while the database was away
        await conn.execute(update(idempotency_keys).values(locked_until=datetime(2000, 1, 1, tzinfo=UTC)))
    app, backend = build_app(iguard)
    async with client(app) as c:
        retry = await c.post("/v1/images", headers=key("k"), content=BODY)
    assert_problem(retry, 409)
    assert backend.calls == []
    assert await kinds(iguard) == ["grant", "charge"]
    assert await iguard.get_balance("org_1") == 15


@pytest.mark.slow
async def test_hundreds_of_keyed_requests_racing_with_repeats_charge_each_key_once(iguard: CreditGuard) -> None:
    """Issue 20: keyed charges are batched like plain ones. 150 keys, each sent one to
    three times at once (and a few reused for another body), 600 credits for 120 charges
    of 5: every key is charged at most once, a repeat is a replay, a 409 (its first still
    running) or the same 402, nothing overdraws, and the books are exact."""
    await iguard.grant_credits("org_1", 600)
    app, _ = build_app(iguard)
    calls = [(f"race-{n}", BODY) for n in range(150) for _ in range(1 + n % 3)]
    calls += [(f"race-{n}", b'{"prompt": "another"}') for n in range(0, 150, 25)]  # reused for another request
    order = list(range(len(calls)))
    import random

    random.Random(20).shuffle(order)
    async with client(app) as c:
        answers = await _gather(*(c.post("/v1/images", headers=key(calls[i][0]), content=calls[i][1]) for i in order))
    await iguard.flush()
    by_key: dict[str, list[int]] = {}
    for i, answer in zip(order, answers, strict=True):
        by_key.setdefault(calls[i][0], []).append(answer.status_code)
    statuses = {status for codes in by_key.values() for status in codes}
    assert statuses <= {200, 402, 409, 422}, statuses
    rows = await charges(iguard)
    async with iguard.engine.connect() as conn:
        claimed = dict(
            (await conn.execute(select(idempotency_keys.c.charge_id, idempotency_keys.c.idempotency_key))).all()
        )
    charged_keys = [claimed[row["id"]] for row in rows]
    assert len(charged_keys) == len(set(charged_keys))  # no key charged twice
    assert {k for k, codes in by_key.items() if 200 in codes} == set(charged_keys)
    assert len(rows) <= 120 and await iguard.get_balance("org_1") == 600 - 5 * len(rows)
    assert await iguard.audit() == []
    batcher = getattr(iguard.store, "_batcher", None)
    if batcher is not None:  # PostgreSQL: keyed charges were decided in batches
        assert batcher.batches > 0 and batcher.batched > batcher.batches


async def _gather(*calls: Any) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    async def run(index: int, call: Any) -> None:
        results[index] = await call

    async with anyio.create_task_group() as group:
        for index, call in enumerate(calls):
            group.start_soon(run, index, call)
    return results
