"""@requires_credits on Starlette endpoints, FastAPI path operations and Litestar handlers."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Response
from fastapi import Request as FastAPIRequest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from credit_guard import CreditGuard, requires_credits

from . import litestar_handlers
from .conftest import ledger_rows
from .helpers import client

pytestmark = pytest.mark.anyio

ORG = {"x-org": "org_1"}
ran: list[str] = []


#: FastAPI 0.121+ has function-scoped yield dependencies (their exit runs before the response
#: is sent); before, every yield dependency's exit ran after the response was delivered.
HAS_FUNCTION_SCOPE = "scope" in inspect.signature(Depends).parameters


def FUNCTION_SCOPED(dependency: Any) -> Any:
    return Depends(dependency, scope="function") if HAS_FUNCTION_SCOPE else Depends(dependency)


@pytest.fixture(autouse=True)
def _reset() -> None:
    ran.clear()
    litestar_handlers.ran.clear()


# -- Starlette ----------------------------------------------------------------------------


@requires_credits("seedream_text_to_image")
async def st_image(request: Request) -> JSONResponse:
    ran.append("image")
    return JSONResponse({"ok": True}, status_code=201)


@requires_credits("seedream_text_to_image")
async def st_crash(request: Request) -> JSONResponse:
    ran.append("crash")
    raise RuntimeError("boom")


@requires_credits("seedream_text_to_image")
async def st_500(request):  # type: ignore[no-untyped-def]  # an unannotated Starlette endpoint
    ran.append("500")
    return JSONResponse({"error": "model failed"}, status_code=500)


@requires_credits("seedream_text_to_image")
async def st_stream(request: Request) -> StreamingResponse:
    async def frames() -> AsyncIterator[bytes]:
        yield b"frame-1\n"
        raise RuntimeError("encoder died mid-stream")

    ran.append("stream")
    return StreamingResponse(frames(), media_type="text/plain")


def starlette_app(guard: CreditGuard) -> Starlette:
    class Auth:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            org = dict(scope.get("headers", [])).get(b"x-org")
            if org:
                scope.setdefault("state", {})["organization_id"] = org.decode()
            await self.app(scope, receive, send)

    app = Starlette(
        routes=[
            Route("/image", st_image, methods=["POST"]),
            Route("/crash", st_crash, methods=["POST"]),
            Route("/fail", st_500, methods=["POST"]),
            Route("/stream", st_stream, methods=["POST"]),
        ]
    )
    app.state.credit_guard = guard
    app.add_middleware(Auth)
    return app


# -- FastAPI --------------------------------------------------------------------------------


class Prompt(BaseModel):
    prompt: str
    seconds: int = 5


def current_org(request: FastAPIRequest) -> str:
    """A dependency standing in for the app's auth: it sets the org on request state."""
    org = request.headers.get("x-org")
    if org:
        request.state.organization_id = org
        request.state.user_id = "user_9"
    return org or ""


class Strict(BaseModel):
    prompt: str
    seconds: int


async def fails_on_exit() -> AsyncIterator[None]:
    yield
    raise RuntimeError("the dependency's exit code failed")


def all_ran() -> list[str]:
    return ran + litestar_handlers.ran


def fastapi_app(guard: CreditGuard) -> FastAPI:
    app = FastAPI()
    app.state.credit_guard = guard

    @app.post("/image")
    @requires_credits("seedream_text_to_image")
    async def image(body: Prompt, org: str = Depends(current_org), quality: str = "hd") -> dict[str, Any]:
        ran.append(f"image {body.prompt} {quality} {org}")
        return {"prompt": body.prompt, "quality": quality}

    @app.post("/video/{video_id}", status_code=202)
    @requires_credits("kling_image_to_video")
    def video(video_id: int, body: Prompt, response: Response, org: str = Depends(current_org)) -> dict[str, Any]:
        ran.append(f"video {video_id}")  # a sync handler with its own Response parameter
        response.headers["x-job"] = "j1"
        return {"video_id": video_id}

    @app.post("/crash")
    @requires_credits("seedream_text_to_image")
    async def crash(org: str = Depends(current_org)) -> dict[str, Any]:
        ran.append("crash")
        raise RuntimeError("boom")

    @app.post("/fail")
    @requires_credits("seedream_text_to_image")
    async def fail(response: Response, org: str = Depends(current_org)) -> dict[str, Any]:
        ran.append("fail")
        response.status_code = 503
        return {"error": "upstream busy"}

    @app.post("/not-found")
    @requires_credits("seedream_text_to_image")
    async def not_found(org: str = Depends(current_org)) -> dict[str, Any]:
        ran.append("not-found")
        raise HTTPException(status_code=404, detail="no such job")

    @app.post("/bad-model", response_model=Strict)
    @requires_credits("seedream_text_to_image")
    async def bad_model(org: str = Depends(current_org)) -> Any:
        ran.append("bad-model")
        return {"prompt": "a dog"}  # no "seconds": FastAPI's response validation fails after we return

    @app.post("/dependency-exit-fails")
    @requires_credits("seedream_text_to_image")
    async def dependency_exit_fails(
        org: str = Depends(current_org), _: None = FUNCTION_SCOPED(fails_on_exit)
    ) -> dict[str, Any]:
        ran.append("dependency-exit-fails")
        return {"ok": True}

    @app.post("/with-tasks")
    @requires_credits("seedream_text_to_image")
    async def with_tasks(tasks: BackgroundTasks, org: str = Depends(current_org)) -> dict[str, Any]:
        async def after() -> None:
            ran.append("task")
            raise RuntimeError("the app's background task failed")

        tasks.add_task(after)
        return {"queued": True}

    @app.post("/fail-response")
    @requires_credits("seedream_text_to_image")
    async def fail_response(request: FastAPIRequest, org: str = Depends(current_org)) -> JSONResponse:
        ran.append("fail-response")
        return JSONResponse({"error": "model failed"}, status_code=500)

    return app


# -- Litestar: its handlers live in their own module, like a real Litestar app's ----------


def litestar_app(guard: CreditGuard) -> Any:
    return litestar_handlers.build(guard)


# -- the same expectations on all three ---------------------------------------------------

Builder = Callable[[CreditGuard], ASGIApp]
FRAMEWORKS: dict[str, tuple[Builder, dict[str, Any], int]] = {
    "starlette": (starlette_app, {}, 201),
    "fastapi": (fastapi_app, {"json": {"prompt": "a cat"}}, 200),
    "litestar": (litestar_app, {"json": {"prompt": "a cat"}}, 201),
}


@pytest.fixture(params=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_paid_call_succeeds_with_credit_headers(guard: CreditGuard, framework: str) -> None:
    build, body, status = FRAMEWORKS[framework]
    await guard.grant_credits("org_1", 12)
    async with client(build(guard)) as c:
        r = await c.post("/image", headers=ORG, **body)
    assert r.status_code == status, r.text
    assert (r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == ("5", "7")
    assert len(all_ran()) == 1
    assert await guard.get_balance("org_1") == 7
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge"]


async def test_short_balance_is_402_with_problem_and_headers(guard: CreditGuard, framework: str) -> None:
    build, body, _ = FRAMEWORKS[framework]
    await guard.grant_credits("org_1", 3)
    async with client(build(guard)) as c:
        r = await c.post("/image", headers=ORG, **body)
    assert r.status_code == 402
    assert r.headers["content-type"] == "application/problem+json"
    assert (r.headers["x-credits-required"], r.headers["x-credits-remaining"]) == ("5", "3")
    problem = r.json()
    assert (problem["status"], problem["required"], problem["available"], problem["feature"]) == (
        402,
        5,
        3,
        "seedream_text_to_image",
    )
    assert all_ran() == []
    assert len(await ledger_rows(guard)) == 1


async def test_exception_refunds_the_charge(guard: CreditGuard, framework: str) -> None:
    build, _, _ = FRAMEWORKS[framework]
    await guard.grant_credits("org_1", 12)
    async with client(build(guard)) as c:
        r = await c.post("/crash", headers=ORG)
    assert r.status_code == 500
    assert all_ran() == ["crash"]
    assert await guard.get_balance("org_1") == 12
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]


async def test_returned_5xx_refunds_with_header(guard: CreditGuard, framework: str) -> None:
    build, _, _ = FRAMEWORKS[framework]
    await guard.grant_credits("org_1", 12)
    async with client(build(guard)) as c:
        r = await c.post("/fail", headers=ORG)
    assert r.status_code >= 500
    assert (r.headers["x-credits-refunded"], r.headers["x-credits-remaining"]) == ("5", "12")
    assert await guard.get_balance("org_1") == 12
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]


async def test_missing_org_is_401(guard: CreditGuard, framework: str) -> None:
    build, body, _ = FRAMEWORKS[framework]
    async with client(build(guard)) as c:
        r = await c.post("/image", **body)
    assert r.status_code == 401 and r.json()["type"].endswith("no-organization")
    assert all_ran() == [] and await ledger_rows(guard) == []


# -- FastAPI specifics ----------------------------------------------------------------------


async def test_fastapi_keeps_depends_body_query_and_path_params(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    async with client(fastapi_app(guard)) as c:
        r = await c.post("/image?quality=4k", headers=ORG, json={"prompt": "a dog"})
        v = await c.post("/video/42", headers=ORG, json={"prompt": "pan left"})
        bad = await c.post("/image", headers=ORG, json={"nope": 1})
    assert r.json() == {"prompt": "a dog", "quality": "4k"}
    assert ran[:2] == ["image a dog 4k org_1", "video 42"]
    assert (v.status_code, v.headers["x-job"], v.headers["x-credits-charged"], v.headers["x-credits-remaining"]) == (
        202,
        "j1",
        "20",
        "75",
    )
    assert bad.status_code == 422  # validation runs before the handler, so nothing is charged
    assert await guard.get_balance("org_1") == 75


async def test_fastapi_openapi_hides_injected_parameters(guard: CreditGuard) -> None:
    schema = fastapi_app(guard).openapi()
    params = {p["name"] for p in schema["paths"]["/image"]["post"].get("parameters", [])}
    assert params == {"quality"}


async def test_fastapi_returned_response_object_refunds(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(fastapi_app(guard)) as c:
        r = await c.post("/fail-response", headers=ORG)
    assert (r.status_code, r.headers["x-credits-refunded"]) == (500, "5")
    assert await guard.get_balance("org_1") == 12


@pytest.mark.parametrize("path", ["/bad-model", "/dependency-exit-fails"])
async def test_fastapi_failure_after_the_handler_returned_is_refunded(guard: CreditGuard, path: str) -> None:
    """FastAPI validates the returned value and runs function-scoped dependency exits after
    the decorated handler has returned: the charge is held until the response is sent, so a
    500 from either is refunded."""
    await guard.grant_credits("org_1", 12)
    async with client(fastapi_app(guard)) as c:
        r = await c.post(path, headers=ORG)
    if path == "/dependency-exit-fails" and not HAS_FUNCTION_SCOPE:
        # FastAPI 0.118-0.120: the exit ran after the 200 was delivered; the client was served.
        assert r.status_code == 200
        await guard.flush()
        assert await guard.get_balance("org_1") == 7
        return
    assert r.status_code == 500
    assert all_ran() == [path.strip("/")]
    await guard.flush()
    assert await guard.get_balance("org_1") == 12
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]
    assert await guard.open_holds("org_1") == []
    assert await guard.audit() == []


async def test_fastapi_plain_value_is_settled_once_delivered(guard: CreditGuard) -> None:
    """Its settlement is the first background task: the app's own tasks run after it, and
    their failure after delivery refunds nothing."""
    await guard.grant_credits("org_1", 12)
    async with client(fastapi_app(guard)) as c:
        r = await c.post("/with-tasks", headers=ORG)
    assert (r.status_code, r.json(), r.headers["x-credits-remaining"]) == (200, {"queued": True}, "7")
    assert all_ran() == ["task"]
    await guard.flush()
    assert await guard.get_balance("org_1") == 7
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge"]
    assert await guard.open_holds("org_1") == []
    assert await guard.audit() == []


async def test_litestar_handler_with_its_own_request(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(litestar_app(guard)) as c:
        r = await c.post("/image-with-request", headers=ORG)
    assert (r.status_code, r.json(), r.headers["x-credits-remaining"]) == (200, {"path": "/image-with-request"}, "7")


async def test_missing_guard_is_a_clear_error(guard: CreditGuard) -> None:
    app = starlette_app(guard)
    del app.state.credit_guard
    async with client(app) as c:
        r = await c.post("/image", headers=ORG)
    assert r.status_code == 500
    assert all_ran() == []


def test_ambiguous_module_is_refused_not_guessed() -> None:
    """This module imports FastAPI and (through litestar_handlers) Litestar's types."""
    import litestar

    globals()["_LitestarMarker"] = litestar.Litestar
    try:

        async def handler(prompt: str) -> dict[str, str]:
            return {}

        with pytest.raises(TypeError, match="contrib"):
            requires_credits("seedream_text_to_image")(handler)
    finally:
        del globals()["_LitestarMarker"]


async def test_starlette_stream_failing_after_headers_is_refunded(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(starlette_app(guard)) as c, c.stream("POST", "/stream", headers=ORG) as r:
        assert r.headers["x-credits-charged"] == "5"  # sent before the body broke
        assert await r.aread() == b"frame-1\n"
    assert await guard.get_balance("org_1") == 12
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]


async def test_http_exception_below_500_is_refunded_like_a_returned_4xx(guard: CreditGuard) -> None:
    """The middleware sees such an exception only as the 4xx response it becomes, and refunds
    it (users pay for results); the decorator applies the same rule so one handler bills the
    same under both."""
    await guard.grant_credits("org_1", 12)
    async with client(fastapi_app(guard)) as c:
        r = await c.post("/not-found", headers=ORG)
    assert (r.status_code, r.headers["x-credits-refunded"], r.headers["x-credits-remaining"]) == (404, "5", "12")
    assert "x-credits-charged" not in r.headers
    assert await guard.get_balance("org_1") == 12
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge", "refund"]


async def test_http_exception_below_500_is_charged_when_the_guard_charges_client_errors(guard: CreditGuard) -> None:
    guard.charge_client_errors = True
    await guard.grant_credits("org_1", 12)
    async with client(fastapi_app(guard)) as c:
        r = await c.post("/not-found", headers=ORG)
    assert (r.status_code, r.headers["x-credits-charged"], r.headers["x-credits-remaining"]) == (404, "5", "7")
    assert await guard.get_balance("org_1") == 7


async def test_litestar_return_dto_still_applies(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    async with client(litestar_app(guard)) as c:
        r = await c.post("/account", headers=ORG)
    assert (r.status_code, r.json(), r.headers["x-credits-charged"]) == (201, {"name": "ann"}, "5")
    assert await guard.get_balance("org_1") == 7


async def test_litestar_return_dto_route_refuses_and_replays_without_the_dto(guard: CreditGuard) -> None:
    """A route with a return DTO would have the DTO read a refusal or a stored response as
    its model (a 500); they go past it, problem+json and headers intact."""
    guard.idempotency = True
    async with client(litestar_app(guard)) as c:
        unsigned = await c.post("/account")
        short = await c.post("/account", headers=ORG)
        await guard.grant_credits("org_1", 12)
        first = await c.post("/account", headers={**ORG, "idempotency-key": "dto-1"})
        await guard.flush()
        retry = await c.post("/account", headers={**ORG, "idempotency-key": "dto-1"})
    assert unsigned.status_code == 401 and unsigned.headers["content-type"] == "application/problem+json"
    assert short.status_code == 402 and short.headers["content-type"] == "application/problem+json"
    assert (short.json()["required"], short.headers["x-credits-required"]) == (5, "5")
    assert (first.status_code, first.json()) == (201, {"name": "ann"})
    assert (retry.status_code, retry.headers["idempotent-replayed"]) == (201, "true")
    assert all_ran() == ["account"]
    assert await guard.get_balance("org_1") == 7
    assert [row["kind"] for row in await ledger_rows(guard, "org_1")] == ["grant", "charge"]
