"""Paid top-ups from Stripe, offline: real signatures computed from a test secret.

The header is built exactly as Stripe signs (HMAC-SHA256 of ``"{timestamp}.{payload}"``);
verifying it is the official ``stripe`` package's job inside the webhook.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from credit_guard import CreditGuard
from credit_guard.contrib.stripe import stripe_webhook

from .conftest import ledger_rows
from .helpers import client

pytestmark = pytest.mark.anyio

SECRET = "whsec_test_secret"


def event(
    event_id: str, *, org: str = "org_1", credits: str = "500", kind: str = "checkout.session.completed"
) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "data": {
                "object": {"id": "cs_1", "object": "checkout.session", "metadata": {"org": org, "credits": credits}}
            },
        }
    ).encode()


def signed(payload: bytes, *, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={timestamp},v1={mac}", "Content-Type": "application/json"}


def checkout_credits(event: Any) -> tuple[str, int] | None:
    if event["type"] != "checkout.session.completed":
        return None
    metadata = event["data"]["object"]["metadata"]
    if metadata["credits"] == "boom":
        raise RuntimeError("the app's mapping failed")
    return metadata["org"], int(metadata["credits"])


@pytest.fixture
async def webhook(guard: CreditGuard) -> AsyncIterator[Any]:
    async with client(stripe_webhook(guard, secret=SECRET, credits_for=checkout_credits)) as http:
        yield http


async def test_a_signed_event_grants_once_however_often_it_is_delivered(guard: CreditGuard, webhook: Any) -> None:
    payload = event("evt_1")
    for _ in range(3):
        answer = await webhook.post("/", content=payload, headers=signed(payload))
        assert answer.status_code == 200
        assert answer.json() == {"received": True, "granted": 500, "balance": 500}
    assert await guard.get_balance("org_1") == 500
    [grant] = [row for row in await ledger_rows(guard, "org_1") if row["kind"] == "grant"]
    assert (grant["amount"], grant["idempotency_key"]) == (500, "evt_1")
    assert await guard.audit() == []


async def test_bad_missing_or_stale_signatures_are_400_and_grant_nothing(guard: CreditGuard, webhook: Any) -> None:
    payload = event("evt_2")
    wrong_secret = await webhook.post("/", content=payload, headers=signed(payload, secret="whsec_other"))
    missing = await webhook.post("/", content=payload, headers={"Content-Type": "application/json"})
    stale = await webhook.post("/", content=payload, headers=signed(payload, at=int(time.time()) - 301))
    tampered = await webhook.post("/", content=event("evt_2", credits="50000"), headers=signed(payload))
    for answer in (wrong_secret, missing, stale, tampered):
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert "verified" in answer.json()["detail"]
    assert await guard.get_balance("org_1") == 0
    assert await ledger_rows(guard) == []


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"null",
        b'"evt_1"',
        b'{"id": "evt_1"}',
        b'{"type": "checkout.session.completed"}',
        b'{"id": 5, "type": "x"}',
    ],
)
async def test_a_signed_body_that_is_no_event_is_400_and_grants_nothing(
    guard: CreditGuard, webhook: Any, payload: bytes
) -> None:
    """Correctly signed, but not an event (no text id or type): the sender's mistake, a 400
    problem like a bad signature, never a bare 500 that drops the connection."""
    answer = await webhook.post("/", content=payload, headers=signed(payload))
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert "not a Stripe event" in answer.json()["detail"] or "verified" in answer.json()["detail"]
    assert await ledger_rows(guard) == []


async def test_an_oversized_event_or_another_method_is_refused_and_grants_nothing(
    guard: CreditGuard, webhook: Any
) -> None:
    from credit_guard.contrib.stripe import MAX_BODY

    huge = json.dumps({"id": "evt_big", "padding": "x" * MAX_BODY}).encode()
    too_large = await webhook.post("/", content=huge, headers=signed(huge))
    assert (too_large.status_code, too_large.headers["content-type"]) == (413, "application/problem+json")
    assert (await webhook.get("/")).status_code == 405
    assert await ledger_rows(guard) == []


async def test_a_failing_mapping_is_500_so_stripe_retries_and_grants_nothing(guard: CreditGuard, webhook: Any) -> None:
    payload = event("evt_3", credits="boom")
    answer = await webhook.post("/", content=payload, headers=signed(payload))
    assert answer.status_code == 500
    assert await ledger_rows(guard) == []
    ignored = event("evt_4", kind="invoice.created")
    answer = await webhook.post("/", content=ignored, headers=signed(ignored))
    assert (answer.status_code, answer.json()) == (200, {"received": True, "granted": 0})
    assert await ledger_rows(guard) == []


async def test_a_mapping_sets_expiry_priority_and_reason(guard: CreditGuard) -> None:
    from datetime import UTC, datetime, timedelta

    expires = datetime.now(UTC) + timedelta(days=30)

    async def plan_credits(event: Any) -> dict[str, Any]:
        org = event["data"]["object"]["metadata"]["org"]
        return {"organization_id": org, "amount": 1000, "expires_at": expires, "priority": -1, "reason": "plan"}

    async with client(stripe_webhook(guard, secret=SECRET, credits_for=plan_credits)) as http:
        payload = event("evt_5")
        assert (await http.post("/", content=payload, headers=signed(payload))).status_code == 200
        assert (await http.get("/")).status_code == 405
    [grant] = await guard.list_grants("org_1")
    assert (grant.amount, grant.priority, grant.reason) == (1000, -1, "plan")
    assert grant.expires_at is not None and abs(grant.expires_at - expires).total_seconds() < 1
