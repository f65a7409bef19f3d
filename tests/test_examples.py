"""The two example apps, as a newcomer runs them: lifespan seeding, demo keys, 200/402/refund."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest
from examples.demo import POOLED_PRICING, PRICING
from starlette.testclient import TestClient

from credit_guard.testing import CreditKit, assert_charged, assert_refunded, assert_refused

from .conftest import kit_base_url

RICH = {"X-API-Key": "demo-key-rich"}
POOR = {"X-API-Key": "demo-key-poor"}
PRO = {"X-API-Key": "demo-key-pro"}


@pytest.fixture(params=["sqlite", "postgres"])
def credit_guard_base_url(request: pytest.FixtureRequest) -> str | None:
    """credit_guard.testing's override: each example test on SQLite and on a PostgreSQL schema."""
    return kit_base_url(request.param)


@pytest.fixture(params=["fastapi_app", "litestar_app"])
def example(request: pytest.FixtureRequest, credit_guard_url: str) -> Iterator[TestClient]:
    # The test kit's isolated database is in CREDIT_GUARD_DATABASE_URL, which the example reads.
    module: Any = importlib.reload(importlib.import_module(f"examples.{request.param}.app"))
    with TestClient(module.app) as client:
        yield client


def test_example_charges_refuses_and_refunds(example: TestClient) -> None:
    assert_charged(example.post("/v1/images", json={"prompt": "a red fox"}, headers=RICH), 5, remaining=95)

    video = example.post("/v1/videos", json={"image_url": "https://example.com/cat.png"}, headers=RICH)
    assert (video.status_code, video.headers["x-credits-remaining"]) == (202, "75")

    short = example.post("/v1/images", json={"prompt": "a red fox"}, headers=POOR)
    assert_refused(short, required=5, available=3)
    assert short.headers["content-type"] == "application/problem+json"
    assert (short.json()["required"], short.json()["available"]) == (5, 3)

    failed = example.post("/v1/voice/fail", headers=RICH)
    assert failed.status_code == 502
    assert_refunded(failed, 2)
    assert (failed.headers["x-credits-refunded"], failed.headers["x-credits-remaining"]) == ("2", "75")

    assert example.get("/api/credits/balance", headers=RICH).json() == {"organization_id": "org_demo", "credits": 75}
    check = example.get("/api/credits/check", params={"feature": "kling_image_to_video"}, headers=POOR)
    assert check.json() == {"feature": "kling_image_to_video", "has_enough": False, "required": 20, "available": 3}
    anonymous = example.post("/v1/images", json={"prompt": "a red fox"})
    assert anonymous.status_code == 401
    CreditKit.of(example).audit()


def test_example_org_on_the_pro_plan_spends_its_months_allowance(example: TestClient) -> None:
    assert_charged(example.post("/v1/images", json={"prompt": "a red fox"}, headers=PRO), 5, remaining=995)
    [allowance] = example.get("/api/credits/grants", headers=PRO).json()["grants"]
    assert (allowance["amount"], allowance["remaining"]) == (1000, 995)
    assert allowance["reason"].startswith("Pro: allowance from ") and allowance["expires_at"] is not None
    CreditKit.of(example).audit()


def test_example_exposes_credit_headers_to_browsers(example: TestClient) -> None:
    r = example.post("/v1/images", json={"prompt": "x"}, headers={**RICH, "Origin": "https://app.example"})
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-credits-remaining", "x-credits-charged", "x-credits-refunded", "x-credits-required"} <= exposed


def test_demo_admin_login_opens_the_admin_page_in_a_browser(example: TestClient) -> None:
    page = example.get("/demo/admin")  # follows the redirect with the demo cookie set
    assert page.status_code == 200
    assert page.url.path == "/admin/feature-pricing"
    assert "text/html" in page.headers["content-type"]
    assert "seedream_text_to_image" in page.text
    listed = example.get("/api/admin/feature-pricing")  # the cookie signs the API calls too
    assert listed.status_code == 200 and len(listed.json()) == len(PRICING) + len(POOLED_PRICING)


@pytest.mark.parametrize("example", ["fastapi_app"], indirect=True)
def test_fastapi_example_video_is_a_job_reserved_then_captured_or_released(example: TestClient) -> None:
    """The FastAPI example's video route is an async job: 10 s reserve 40 credits under the
    job's id; the provider's completion captures the 8 s rendered (32) and refunds 8, once
    however often it calls; a failed job is released whole. A retry with the same
    Idempotency-Key gets the same job back, unpaid."""
    keyed = {**RICH, "Idempotency-Key": "video-42"}
    started = example.post("/v1/videos", json={"image_url": "https://e.x/b.png", "seconds": 10}, headers=keyed)
    assert (started.status_code, started.headers["x-credits-charged"], started.headers["x-credits-remaining"]) == (
        202,
        "40",
        "60",
    )
    job = started.json()["job_id"]
    again = example.post("/v1/videos", json={"image_url": "https://e.x/b.png", "seconds": 10}, headers=keyed)
    assert (again.status_code, again.headers["idempotent-replayed"], again.json()["job_id"]) == (202, "true", job)
    assert example.portal is not None
    example.portal.call(example.app.state.credit_guard.flush)  # the request's end lands
    assert example.get("/api/credits/balance", headers=RICH).json()["credits"] == 60  # still reserved
    for _ in range(2):  # the provider calls twice: the second moves nothing
        done = example.post(f"/v1/videos/{job}/complete", json={"status": "succeeded", "seconds_rendered": 10})
        assert done.status_code == 200 and done.json()["state"] == "captured"
    assert example.get("/api/credits/balance", headers=RICH).json()["credits"] == 68
    failed_job = example.post("/v1/videos", json={"image_url": "https://e.x/c.png", "seconds": 5}, headers=RICH)
    assert failed_job.headers["x-credits-remaining"] == "48"
    failed = example.post(f"/v1/videos/{failed_job.json()['job_id']}/complete", json={"status": "failed"})
    assert (failed.json()["state"], failed.json()["credits_refunded"]) == ("released", 20)
    assert example.get("/api/credits/balance", headers=RICH).json()["credits"] == 68
    unknown = example.post("/v1/videos/vid_nope/complete", json={"status": "failed"})
    assert unknown.status_code == 404
    for not_an_id in ("vid%00nul", "v" * 300):  # a NUL, too long: bad input, never a 500
        bad = example.post(f"/v1/videos/{not_an_id}/complete", json={"status": "failed"})
        assert bad.status_code == 422 and "job_id" in bad.json()["detail"], bad.text
    assert example.portal.call(example.app.state.credit_guard.audit) == []


@pytest.mark.parametrize("example", ["fastapi_app"], indirect=True)
def test_fastapi_example_clip_is_paid_from_the_video_credit_pool(example: TestClient) -> None:
    """The example's /v1/clips is priced in the "video" pool: the studio's 50 video credits
    pay for two clips (its 10 general credits are not the pool's), and the 402 names the
    pool; an organization with only general credits cannot buy a clip at all."""
    studio = {"X-API-Key": "demo-key-studio"}
    for left in (25, 0):
        clip = example.post("/v1/clips", json={"prompt": "a fox"}, headers=studio)
        assert_charged(clip, 25, remaining=left)
        assert clip.headers["x-credits-pool"] == "video"
    short = example.post("/v1/clips", json={"prompt": "a fox"}, headers=studio)
    assert_refused(short, required=25, available=0)
    assert (short.headers["x-credits-pool"], short.json()["pool"]) == ("video", "video")
    assert_charged(example.post("/v1/images", json={"prompt": "a fox"}, headers=studio), 5, remaining=5)
    assert_refused(example.post("/v1/clips", json={"prompt": "a fox"}, headers=RICH), required=25, available=0)
    assert example.get("/api/credits/balance", headers=studio).json()["credits"] == 5
    assert example.portal is not None
    assert example.portal.call(example.app.state.credit_guard.audit) == []


@pytest.mark.parametrize("example", ["litestar_app"], indirect=True)
def test_litestar_example_video_is_priced_by_length_refunds_unrendered_seconds_and_replays(
    example: TestClient,
) -> None:
    """Five seconds cost 20 credits: 7 s reserve 28 (1.4 units, rounded up); 10 s reserve 40,
    of which the 2 s the model did not render (8 s max) go back. A retry with the same
    Idempotency-Key is answered again and charged nothing."""
    seven = example.post("/v1/videos", json={"image_url": "https://e.x/a.png", "seconds": 7}, headers=RICH)
    assert (seven.status_code, seven.headers["x-credits-charged"], seven.headers["x-credits-remaining"]) == (
        202,
        "28",
        "72",
    )
    keyed = {**RICH, "Idempotency-Key": "video-42"}
    ten = example.post("/v1/videos", json={"image_url": "https://e.x/b.png", "seconds": 10}, headers=keyed)
    assert (ten.status_code, ten.headers["x-credits-charged"]) == (202, "40")
    assert ten.json()["seconds"] == 8
    assert example.portal is not None
    example.portal.call(example.app.state.credit_guard.flush)  # the batched settlement lands
    assert example.get("/api/credits/balance", headers=RICH).json()["credits"] == 72 - 40 + 8

    again = example.post("/v1/videos", json={"image_url": "https://e.x/b.png", "seconds": 10}, headers=keyed)
    assert (again.status_code, again.headers["idempotent-replayed"]) == (202, "true")
    if "idempotent-body-omitted" not in again.headers:  # Litestar's decorator replays status and headers
        assert again.json() == ten.json()
    other = example.post("/v1/videos", json={"image_url": "https://e.x/c.png", "seconds": 10}, headers=keyed)
    assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
    assert example.get("/api/credits/balance", headers=RICH).json()["credits"] == 40


@pytest.mark.parametrize("example", ["fastapi_app"], indirect=True)
def test_fastapi_example_grants_a_paid_checkout_once(example: TestClient) -> None:
    """The example's Stripe webhook: a paid checkout.session.completed grants the pack in
    its metadata, once however often Stripe delivers it; a bad signature grants nothing."""
    import hashlib
    import hmac
    import json
    import time

    session = {
        "object": "checkout.session",
        "payment_status": "paid",
        "metadata": {"organization_id": "org_demo", "credits": "250"},
    }
    payload = json.dumps(
        {"id": "evt_pack_1", "object": "event", "type": "checkout.session.completed", "data": {"object": session}}
    ).encode()
    stamp = int(time.time())
    mac = hmac.new(b"whsec_demo", f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    before = example.get("/api/credits/balance", headers=RICH).json()["credits"]
    for _ in range(2):
        paid = example.post("/webhooks/stripe", content=payload, headers={"Stripe-Signature": f"t={stamp},v1={mac}"})
        assert paid.status_code == 200, paid.text
    forged = example.post("/webhooks/stripe", content=payload, headers={"Stripe-Signature": f"t={stamp},v1={'0' * 64}"})
    assert forged.status_code == 400
    assert example.get("/api/credits/balance", headers=RICH).json()["credits"] == before + 250


def test_admin_page_without_a_session_hints_at_signing_in(example: TestClient) -> None:
    """A browser gets a page that says how to sign in; an API client still gets the problem."""
    browser = example.get("/admin/feature-pricing", headers={"Accept": "text/html,application/xhtml+xml"})
    assert browser.status_code == 401
    assert browser.headers["content-type"].startswith("text/html")
    assert 'href="/demo/admin"' in browser.text and "administrator" in browser.text
    api = example.get("/admin/feature-pricing", headers={"Accept": "application/json"})
    assert (api.status_code, api.headers["content-type"]) == (401, "application/problem+json")
    signed_in = example.get("/admin/feature-pricing", headers={"X-API-Key": "demo-key-admin", "Accept": "text/html"})
    assert signed_in.status_code == 200 and "<form" in signed_in.text.lower()
