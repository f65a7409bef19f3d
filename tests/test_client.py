"""credit_guard.client against the real FastAPI example, served by uvicorn over real HTTP.

The server is a subprocess (the example's lifespan seeds it: org_demo has 100 credits,
org_poor 3), so every header and problem body crosses a real socket. Unit tests of the
hook's rules use in-process apps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from credit_guard import CreditGuard, credit_endpoints
from credit_guard.client import (
    CreditInfo,
    CreditsUnavailable,
    CreditTracker,
    FeatureUnavailable,
    InsufficientCredits,
    InvalidCreditRequest,
    NoOrganization,
    credits_of,
)
from credit_guard.contrib.starlette import requires_credits

from .conftest import reset_postgres, seed_prices
from .test_middleware import ORG, DemoAuth
from .test_outage import Outage

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
RICH = {"X-API-Key": "demo-key-rich"}
POOR = {"X-API-Key": "demo-key-poor"}
IMAGE = {"prompt": "a red fox"}
VIDEO = {"image_url": "https://example.com/cat.png"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _reset(db_url: str) -> None:
    async with CreditGuard(db_url) as g:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)


@pytest.fixture
def server(db_url: str) -> Iterator[str]:
    """The FastAPI example on a loopback port; its base URL. Always stopped afterwards."""
    anyio.run(_reset, db_url)
    port = _free_port()
    env = {**os.environ, "CREDIT_GUARD_DATABASE_URL": db_url}
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"uvicorn exited with {proc.returncode}:\n{output}")
            try:
                # 401 means routing, auth and the lifespan (seeding) are all up.
                if httpx.get(f"{base_url}/api/credits/balance", timeout=1).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("uvicorn did not answer within 30 s")
            time.sleep(0.1)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_sync_client_says_which_credit_pool_paid_and_which_one_is_short(server: str) -> None:
    tracker = CreditTracker()
    with tracker.client(base_url=server, headers={"X-API-Key": "demo-key-studio"}) as api:
        for left in (25, 0):
            assert api.post("/v1/clips", json=IMAGE).status_code == 200
            assert tracker.last == CreditInfo(remaining=left, charged=25, pool="video")
        with pytest.raises(InsufficientCredits) as refused:
            api.post("/v1/clips", json=IMAGE)
    assert (refused.value.pool, refused.value.available) == ("video", 0)
    assert refused.value.credits == CreditInfo(remaining=0, required=25, pool="video")


def test_sync_client_tracks_credits_and_raises_refusals(server: str) -> None:
    tracker = CreditTracker()
    with tracker.client(base_url=server, headers=RICH) as api:
        assert api.get("/api/credits/balance").json() == {"organization_id": "org_demo", "credits": 100}
        assert tracker.remaining == 100

        image = api.post("/v1/images", json=IMAGE)
        assert image.status_code == 200
        assert credits_of(image) == CreditInfo(remaining=95, charged=5)
        assert tracker.remaining == 95

        video = api.post("/v1/videos", json=VIDEO)
        assert video.status_code == 202
        assert tracker.last == CreditInfo(remaining=75, charged=20)

        # The app's own 502 is returned, not raised: the refund is in the headers, the
        # error is the caller's to handle like any other httpx response.
        failed = api.post("/v1/voice/fail")
        assert failed.status_code == 502
        assert tracker.last == CreditInfo(remaining=75, refunded=2)
        with pytest.raises(httpx.HTTPStatusError):
            failed.raise_for_status()

        with pytest.raises(InsufficientCredits) as refused:
            api.post("/v1/images", json=IMAGE, headers=POOR)
        with pytest.raises(NoOrganization) as anonymous:
            api.post("/v1/images", json=IMAGE, headers={"X-API-Key": ""})

    exc = refused.value
    assert (exc.status, exc.feature, exc.required, exc.available) == (402, "seedream_text_to_image", 5, 3)
    assert exc.credits == CreditInfo(remaining=3, required=5)
    assert exc.pool is None
    assert isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 402
    assert tracker.remaining == 3  # the last balance seen was org_poor's
    assert anonymous.value.status == 401


async def test_async_client_tracks_credits_and_checks_features(server: str) -> None:
    tracker = CreditTracker()
    async with tracker.async_client(base_url=server, headers=RICH) as api:
        assert (await api.post("/v1/images", json=IMAGE)).status_code == 200
        assert tracker.remaining == 95
        assert (await api.post("/v1/videos", json=VIDEO)).status_code == 202
        assert tracker.remaining == 75

        failed = await api.post("/v1/voice/fail")
        assert (failed.status_code, credits_of(failed)) == (502, CreditInfo(remaining=75, refunded=2))

        balance = await api.get("/api/credits/balance")
        affordable = await api.get("/api/credits/check", params={"feature": "kling_image_to_video"})
        too_dear = await api.get("/api/credits/check", params={"feature": "kling_image_to_video"}, headers=POOR)
        with pytest.raises(FeatureUnavailable) as unknown:
            await api.get("/api/credits/check", params={"feature": "no_such_feature"})
        with pytest.raises(InvalidCreditRequest) as missing:
            await api.get("/api/credits/check")
        with pytest.raises(InsufficientCredits) as refused:
            await api.post("/v1/images", json=IMAGE, headers=POOR)
        with pytest.raises(NoOrganization):
            await api.get("/api/credits/balance", headers={"X-API-Key": ""})

    assert balance.json() == {"organization_id": "org_demo", "credits": 75}
    assert affordable.json() == {"feature": "kling_image_to_video", "has_enough": True, "required": 20, "available": 75}
    assert too_dear.json() == {"feature": "kling_image_to_video", "has_enough": False, "required": 20, "available": 3}
    assert (unknown.value.status, unknown.value.feature) == (404, "no_such_feature")
    assert missing.value.errors == {"feature": "required query parameter"}
    assert (refused.value.required, refused.value.available) == (5, 3)


# -- the hook's rules, in-process ------------------------------------------------------------


async def app_problem(request: Request) -> Response:
    body = b'{"type":"https://app.example/probs/out-of-stock","title":"Out of stock","status":409}'
    return Response(body, status_code=409, media_type="application/problem+json")


async def app_error(request: Request) -> JSONResponse:
    return JSONResponse({"error": "nope"}, status_code=400)


def hook_app(guard: CreditGuard) -> DemoAuth:
    async def paid(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/app-problem", app_problem),
            Route("/app-error", app_error),
            Route("/paid", requires_credits("seedream_text_to_image", guard=guard)(paid), methods=["POST"]),
            Mount("/api/credits", credit_endpoints(guard)),
        ]
    )
    return DemoAuth(app)


def tracked(tracker: CreditTracker, guard: CreditGuard) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=hook_app(guard))
    return tracker.install(httpx.AsyncClient(transport=transport, base_url="http://t", headers=ORG))


async def test_other_errors_and_foreign_problems_are_left_alone(guard: CreditGuard) -> None:
    tracker = CreditTracker()
    async with tracked(tracker, guard) as api:
        foreign = await api.get("/app-problem")
        plain = await api.get("/app-error")
    assert (foreign.status_code, plain.status_code) == (409, 400)
    assert tracker.last is None and credits_of(plain) is None


async def test_raise_problems_false_only_tracks(guard: CreditGuard) -> None:
    tracker = CreditTracker(raise_problems=False)
    async with tracked(tracker, guard) as api:
        r = await api.get("/api/credits/balance", headers={"x-org": ""})
    assert r.status_code == 401


def test_install_is_idempotent() -> None:
    tracker = CreditTracker()
    with tracker.install(tracker.install(httpx.Client())) as api:
        assert api.event_hooks["response"] == [tracker._sync_hook]


async def test_ledger_outage_raises_credits_unavailable_with_retry_after(db_url: str) -> None:
    async with Outage(db_url) as o, CreditGuard(db_url) as direct:
        await direct.create_schema()
        if direct.engine.dialect.name == "postgresql":
            await reset_postgres(direct)
        await seed_prices(direct)
        await direct.grant_credits("org_1", 10)
        async with CreditGuard(o.url, timeout=0.5, retry_after=9) as guard:
            tracker = CreditTracker()
            async with tracked(tracker, guard) as api:
                await o.down()
                with pytest.raises(CreditsUnavailable) as down:
                    # A charge: on SQLite (WAL) reads never wait for the held write lock.
                    await api.post("/paid")
                await o.up()
    assert (down.value.status, down.value.retry_after) == (503, 9)


def test_server_side_never_imports_httpx() -> None:
    probe = "import sys, credit_guard; print(sorted(m for m in ('httpx', 'credit_guard.client') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
