"""OpenAPI for paid routes: FastAPI documents what the guard answers, and the answers match.

The document is validated (openapi-spec-validator), compared with what the routes declare,
and then checked against real answers: the headers it says a success carries are on a
real 200, a real 402's body validates against the documented problem schema.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule, credit_endpoints, requires_credits
from credit_guard.contrib.fastapi import document_credits

from .helpers import UvicornServer

PRICES = [
    {"feature_key": "image", "feature_name": "Image", "category": "Image", "credits": 5},
    {"feature_key": "video", "feature_name": "Video", "category": "Video", "credits": 20},
    {"feature_key": "voice", "feature_name": "Voice", "category": "Audio", "credits": 3},
]


class Prompt(BaseModel):
    prompt: str


class Signed:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"x-org"):
            scope.setdefault("state", {})["organization_id"] = dict(scope["headers"])[b"x-org"].decode()
        await self.app(scope, receive, send)


def make_app(guard: CreditGuard) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await guard.create_schema()
        async with guard:
            yield

    app = FastAPI(lifespan=lifespan)
    document_credits(app)  # before the routes: they are found when the document is built

    @app.post("/v1/images")
    @requires_credits("image")
    async def image(body: Prompt) -> dict[str, str]:
        return {"url": "https://cdn.example/" + body.prompt}

    router = APIRouter()

    @router.post("/v1/videos/{video_id}/extend", status_code=202)
    @requires_credits("video", idempotency="required", units=lambda request: 2)
    async def extend(video_id: str, request: Request) -> dict[str, str]:
        return {"job": video_id}

    app.include_router(router)

    @app.post("/v1/voice")
    async def voice() -> dict[str, str]:  # paid by the middleware rule
        return {"audio": "ok"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    app.mount("/api/credits", credit_endpoints(guard))
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules={"POST /v1/voice": Rule("voice")})
    app.add_middleware(Signed)
    app.state.credit_guard = guard
    return app


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return make_app(CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'openapi.db'}"))


def test_document_is_valid_and_shows_what_paid_routes_answer(app: FastAPI) -> None:
    document = app.openapi()
    validate(document)  # type: ignore[arg-type]
    image = document["paths"]["/v1/images"]["post"]
    assert {"401", "402", "403", "503", "200", "422"} <= set(image["responses"])
    assert image["x-credit-guard"] == {
        "feature": "image",
        "priceSource": "pricing-table",
        "units": "fixed",
        "idempotency": "off",
        "priceCheck": "/api/credits/check?feature=image",
    }
    ok_headers = image["responses"]["200"]["headers"]
    assert ok_headers["X-Credits-Charged"]["required"] is True
    assert {"X-Credits-Remaining", "X-Credits-Refunded"} <= set(ok_headers)
    assert "Idempotent-Replayed" not in ok_headers
    assert not any(p["name"] == "Idempotency-Key" for p in image.get("parameters", []))
    shortfall = image["responses"]["402"]
    assert set(shortfall["headers"]) == {"X-Credits-Required", "X-Credits-Remaining", "X-Credits-Pool"}
    assert shortfall["headers"]["X-Credits-Pool"]["required"] is False  # a feature of a credit pool only
    assert shortfall["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/CreditGuardProblem"
    }
    # FastAPI's validation 422 keeps its JSON schema; the 402-family problems are separate codes.
    assert "application/json" in image["responses"]["422"]["content"]
    assert "Retry-After" in image["responses"]["503"]["headers"]

    extend = document["paths"]["/v1/videos/{video_id}/extend"]["post"]
    assert extend["x-credit-guard"]["units"] == "variable"
    assert extend["x-credit-guard"]["idempotency"] == "required"
    key = next(p for p in extend["parameters"] if p["name"] == "Idempotency-Key")
    assert (key["in"], key["required"]) == ("header", True)
    assert {"400", "409"} <= set(extend["responses"])
    assert "application/problem+json" in extend["responses"]["422"]["content"]
    assert "Idempotent-Replayed" in extend["responses"]["202"]["headers"]

    voice = document["paths"]["/v1/voice"]["post"]
    assert voice["x-credit-guard"]["feature"] == "voice"
    assert "402" in voice["responses"]

    health = document["paths"]["/health"]["get"]
    assert "x-credit-guard" not in health and "402" not in health["responses"]
    assert "X-Credits-Charged" not in health["responses"]["200"].get("headers", {})


def test_documenting_twice_changes_nothing(app: FastAPI) -> None:
    first = app.openapi()
    document_credits(app)
    app.openapi_schema = None
    second = app.openapi()
    assert first == second
    assert [p["name"] for p in second["paths"]["/v1/videos/{video_id}/extend"]["post"]["parameters"]].count(
        "Idempotency-Key"
    ) == 1


def _validates(document: dict[str, Any], schema: dict[str, Any], instance: object) -> None:
    resolver_doc = {**schema, "components": document["components"]}
    OAS31Validator(resolver_doc).validate(instance)


def test_real_answers_match_the_document(app: FastAPI) -> None:
    with TestClient(app) as client:
        guard: CreditGuard = app.state.credit_guard
        client.portal.call(lambda: guard.import_pricing(PRICES, update_existing=True))
        client.portal.call(lambda: guard.grant_credits("org_doc", 7, idempotency_key="fund-doc"))
        document = client.get("/openapi.json").json()
        image = document["paths"]["/v1/images"]["post"]

        paid = client.post("/v1/images", json={"prompt": "cat"}, headers={"x-org": "org_doc"})
        assert paid.status_code == 200
        for name, header in image["responses"]["200"]["headers"].items():
            if header["required"]:
                assert name in paid.headers
        assert paid.headers["X-Credits-Charged"] == "5"
        assert paid.headers["X-Credits-Remaining"] == "2"

        short = client.post("/v1/images", json={"prompt": "cat"}, headers={"x-org": "org_doc"})
        assert short.status_code == 402
        assert short.headers["content-type"] == "application/problem+json"
        for name, header in image["responses"]["402"]["headers"].items():
            if header["required"]:
                assert name in short.headers
        assert "X-Credits-Pool" not in short.headers  # a general feature
        _validates(document, image["responses"]["402"]["content"]["application/problem+json"]["schema"], short.json())
        assert (short.json()["required"], short.json()["available"]) == (5, 2)

        unsigned = client.post("/v1/images", json={"prompt": "cat"})
        assert unsigned.status_code == 401
        _validates(
            document, image["responses"]["401"]["content"]["application/problem+json"]["schema"], unsigned.json()
        )

        no_key = client.post("/v1/videos/v1/extend", headers={"x-org": "org_doc"})
        assert no_key.status_code == 400  # the document says the key is required, and it is
        assert client.portal.call(guard.get_balance, "org_doc") == 2


def test_a_client_generated_from_the_example_reads_problems_and_credit_headers(tmp_path: Path) -> None:
    """openapi-python-client turns the example's document into a client; against the example
    served by uvicorn, the 402 comes back as the documented problem model, and the credit
    headers are on the generated client's responses."""
    env = {"CREDIT_GUARD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'generated.db'}"}
    server = UvicornServer("examples.fastapi_app.app:app", env, tmp_path / "uvicorn.log", factory=False)
    with server.start(health="/openapi.json"):
        (tmp_path / "doc.json").write_text(httpx.get(server.base + "/openapi.json").text)
        generator = Path(sys.executable).with_name("openapi-python-client")
        subprocess.run(
            [str(generator), "generate", "--path", "doc.json", "--meta", "none", "--output-path", "media_client"],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )
        sys.path.insert(0, str(tmp_path))
        try:
            client_module = importlib.import_module("media_client")
            images = importlib.import_module("media_client.api.default.text_to_image_v1_images_post")
            models = importlib.import_module("media_client.models")
            client = client_module.Client(base_url=server.base, headers={"X-API-Key": "demo-key-rich"})
            body = models.ImageRequest(prompt="a cat")
            paid = images.sync_detailed(client=client, body=body)
            assert paid.status_code == 200
            assert (paid.headers["X-Credits-Charged"], paid.headers["X-Credits-Remaining"]) == ("5", "95")
            short = images.sync_detailed(client=client.with_headers({"X-API-Key": "demo-key-poor"}), body=body)
            assert short.status_code == 402
            assert isinstance(short.parsed, models.CreditGuardProblem)
            assert (short.parsed.required, short.parsed.available) == (5, 3)
            assert short.headers["X-Credits-Required"] == "5"
        finally:
            sys.path.remove(str(tmp_path))
            for name in [m for m in sys.modules if m == "media_client" or m.startswith("media_client.")]:
                del sys.modules[name]


def test_litestar_plugin_documents_opt_and_decorated_routes(tmp_path: Path) -> None:
    from litestar import Litestar, get, post
    from litestar.testing import TestClient as LitestarTestClient

    from credit_guard.contrib.litestar import CreditGuardPlugin
    from credit_guard.contrib.litestar import requires_credits as litestar_requires_credits
    from credit_guard.testing import CreditKit, assert_refused

    guard = CreditGuard(f"sqlite+aiosqlite:///{tmp_path / 'litestar.db'}")

    @post("/v1/images", opt={"credits": "image"})
    async def image() -> dict[str, str]:
        return {"url": "https://cdn.example/cat.png"}

    @post("/v1/videos", status_code=202)
    @litestar_requires_credits("video", idempotency=True)
    async def video() -> dict[str, str]:
        return {"job": "queued"}

    @get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    app = Litestar([image, video, health], plugins=[CreditGuardPlugin(guard, create_schema=True)], middleware=[Signed])
    with LitestarTestClient(app) as client:
        document = client.get("/schema/openapi.json").json()
        validate(document)
        images = document["paths"]["/v1/images"]["post"]
        assert images["x-credit-guard"]["feature"] == "image"
        assert {"401", "402", "403", "503"} <= set(images["responses"])
        assert images["responses"]["201"]["headers"]["X-Credits-Charged"]["required"] is True
        videos = document["paths"]["/v1/videos"]["post"]
        assert (videos["x-credit-guard"]["feature"], videos["x-credit-guard"]["idempotency"]) == ("video", "optional")
        assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in videos["parameters"])
        assert "Idempotent-Replayed" in videos["responses"]["202"]["headers"]
        assert "x-credit-guard" not in document["paths"]["/health"]["get"]

        credits = CreditKit.of(client)
        credits.set_price("image", 5)
        refused = client.post("/v1/images", headers={"X-Org": "org_ls"})
        assert_refused(refused, required=5, available=0)
        schema = images["responses"]["402"]["content"]["application/problem+json"]["schema"]
        OAS31Validator(schema).validate(refused.json())
