"""Automatic top-ups paid by Stripe, offline: the real ``stripe.StripeClient`` on a fake
``stripe.HTTPClient`` that records each request and answers with canned JSON, as Stripe
would (replaying the first answer for a repeated Idempotency-Key, as Stripe does)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import stripe

from credit_guard import CreditGuard
from credit_guard.contrib.stripe import stripe_webhook
from credit_guard.contrib.stripe_topup import AutoTopupFailed, grant_topup_payment, stripe_auto_topup
from credit_guard.errors import StorageUnavailable

from .conftest import ledger_rows, topup_key
from .helpers import client

pytestmark = pytest.mark.anyio

CUSTOMERS: dict[str, dict[str, Any]] = {
    "cus_card": {"id": "cus_card", "object": "customer", "invoice_settings": {"default_payment_method": "pm_card"}},
    "cus_none": {"id": "cus_none", "object": "customer", "invoice_settings": {"default_payment_method": None}},
    "cus_bare": {"id": "cus_bare", "object": "customer"},
    "cus_gone": {"id": "cus_gone", "object": "customer", "deleted": True},
    "cus_expanded": {
        "id": "cus_expanded",
        "object": "customer",
        "invoice_settings": {"default_payment_method": {"id": "pm_expanded", "object": "payment_method"}},
    },
}
ORGS = {"org_1": "cus_card", "org_2": "cus_none", "org_3": "cus_bare", "org_4": "cus_gone", "org_5": "cus_expanded"}


def intent(number: int, status: str, form: Mapping[str, str]) -> dict[str, Any]:
    """The PaymentIntent Stripe answers for a create call with these form fields."""
    metadata = {k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")}
    return {
        "id": f"pi_{number}",
        "object": "payment_intent",
        "amount": int(form["amount"]),
        "currency": form["currency"],
        "customer": form["customer"],
        "payment_method": form["payment_method"],
        "status": status,
        "metadata": metadata,
    }


def declined(number: int, form: Mapping[str, str]) -> dict[str, Any]:
    """Stripe's 402 body for a declined off-session confirmation (a card error)."""
    return {
        "error": {
            "type": "card_error",
            "code": "card_declined",
            "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
            "payment_intent": intent(number, "requires_payment_method", form),
        }
    }


class FakeStripe(stripe.HTTPClient):
    """Stripe's API for customers and PaymentIntents, in memory; ``outcome`` says how the
    next PaymentIntent ends: ``succeeded``, ``requires_action``, ``processing`` or
    ``declined``. Only the async path is served: a sync call would block the event loop."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.slept: list[float] = []
        self.outcome = "succeeded"
        self.replies: dict[str, tuple[str, int, dict[str, str]]] = {}
        self.intents = 0
        #: Outages before the next PaymentIntent: "unreachable" (no answer) or "500".
        self.failures: list[str] = []

    def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a synchronous Stripe call: it would block the event loop")

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        path = urlsplit(url).path
        form = dict(parse_qsl(post_data or ""))
        self.requests.append({"method": method, "path": path, "headers": dict(headers), "form": form})
        body, status, reply_headers = self.answer(method, path, headers, form)
        return body.encode(), status, reply_headers

    def answer(
        self, method: str, path: str, headers: Mapping[str, str], form: dict[str, str]
    ) -> tuple[str, int, dict[str, str]]:
        if method == "get" and path.startswith("/v1/customers/"):
            found = CUSTOMERS.get(path.rsplit("/", 1)[1])
            if found is None:
                error = {"type": "invalid_request_error", "code": "resource_missing", "message": "No such customer"}
                return json.dumps({"error": error}), 404, {}
            return json.dumps(found), 200, {}
        assert (method, path) == ("post", "/v1/payment_intents"), (method, path)
        key = headers["Idempotency-Key"]
        if key in self.replies:  # Stripe replays the first answer to a key
            return self.replies[key]
        if self.failures:  # an outage: before Stripe made anything
            failure = self.failures.pop(0)
            if failure == "unreachable":
                raise stripe.APIConnectionError("connection refused", should_retry=True)  # type: ignore[no-untyped-call]
            error = {"type": "api_error", "message": "Something went wrong on Stripe's end."}
            return json.dumps({"error": error}), 500, {}
        self.intents += 1
        if self.outcome == "declined":
            reply = json.dumps(declined(self.intents, form)), 402, {"request-id": "req_1"}
        else:
            reply = json.dumps(intent(self.intents, self.outcome, form)), 200, {"request-id": "req_1"}
        self.replies[key] = reply
        return reply

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "post"]

    def close(self) -> None:
        pass

    async def close_async(self) -> None:
        pass

    async def sleep_async(self, secs: float) -> None:  # stripe's backoff between its retries
        self.slept.append(secs)


@pytest.fixture
def fake() -> FakeStripe:
    return FakeStripe()


@pytest.fixture
def stripe_client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_x", http_client=fake)


async def customer_of(organization_id: str) -> str | None:
    return ORGS.get(organization_id)


async def grants_of(guard: CreditGuard, organization_id: str) -> list[tuple[object, object]]:
    return [
        (row["amount"], row["idempotency_key"])
        for row in await ledger_rows(guard, organization_id)
        if row["kind"] == "grant"
    ]


async def test_a_top_up_charges_the_saved_card_off_session_and_grants_once(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    assert await charge("org_1", 500, key="crossing-1") == "pi_1"
    assert [(r["method"], r["path"]) for r in fake.requests] == [
        ("get", "/v1/customers/cus_card"),
        ("post", "/v1/payment_intents"),
    ]
    [post] = fake.posts()
    assert post["form"] == {
        "customer": "cus_card",
        "amount": "1000",
        "currency": "usd",
        "payment_method": "pm_card",
        "confirm": "true",
        "off_session": "true",
        "description": "500 credits (automatic top-up)",
        "metadata[organization_id]": "org_1",
        "metadata[credits]": "500",
        "metadata[credit_guard]": "auto_topup",
    }
    assert post["headers"]["Idempotency-Key"] == "credit_guard-topup:org_1:crossing-1"
    assert post["headers"]["Authorization"] == "Bearer sk_test_x"
    assert await guard.get_balance("org_1") == 500
    assert await grants_of(guard, "org_1") == [(500, "stripe:pi_1")]
    [grant] = await guard.list_grants("org_1")
    assert grant.reason == "stripe auto top-up pi_1"
    assert await guard.audit() == []


async def test_the_same_crossing_run_twice_pays_and_grants_once(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    """A crossing run again (its runner died, its answer was lost) sends the same key:
    Stripe answers with the same PaymentIntent, and its id being the grant's key, one grant."""
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    assert await charge("org_1", 500, key="crossing-7") == "pi_1"
    assert await charge("org_1", 500, "crossing-7") == "pi_1"  # the key may come positionally too
    assert fake.intents == 1
    assert [p["headers"]["Idempotency-Key"] for p in fake.posts()] == ["credit_guard-topup:org_1:crossing-7"] * 2
    assert await guard.get_balance("org_1") == 500
    assert await grants_of(guard, "org_1") == [(500, "stripe:pi_1")]
    # another crossing is another payment
    assert await charge("org_1", 500, key="crossing-8") == "pi_2"
    assert await guard.get_balance("org_1") == 1000
    assert await guard.audit() == []


async def test_without_a_key_each_call_is_its_own_payment(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    charge = stripe_auto_topup(
        guard, client=stripe_client, customer_for=customer_of, unit_amount=150, currency="EUR", description="Top-up"
    )
    assert [await charge("org_5", 10), await charge("org_5", 10)] == ["pi_1", "pi_2"]
    first, second = fake.posts()
    assert first["headers"]["Idempotency-Key"].startswith("credit_guard-topup-")
    assert first["headers"]["Idempotency-Key"] != second["headers"]["Idempotency-Key"]
    assert (first["form"]["amount"], first["form"]["currency"], first["form"]["description"]) == (
        "1500",
        "eur",
        "Top-up",
    )
    assert first["form"]["payment_method"] == "pm_expanded"  # an expanded default payment method: its id
    assert await guard.get_balance("org_5") == 20
    assert await guard.audit() == []


async def test_a_long_key_is_hashed_to_fit_stripe(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=1)
    await charge("org_1", 5, key="k" * 300)
    await charge("org_1", 5, key="k" * 300)
    keys = {p["headers"]["Idempotency-Key"] for p in fake.posts()}
    assert len(keys) == 1 and len(keys.pop()) <= 255
    assert await guard.get_balance("org_1") == 5


async def test_a_declined_card_raises_with_the_decline_code_and_grants_nothing(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    await guard.grant_credits("org_1", 40, idempotency_key="seed")
    fake.outcome = "declined"
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    with pytest.raises(AutoTopupFailed) as caught:
        await charge("org_1", 500, key="crossing-1")
    failure = caught.value
    assert isinstance(failure.__cause__, stripe.CardError)
    assert (failure.reason, failure.decline_code, failure.payment_intent_id) == (
        "card_declined",
        "insufficient_funds",
        "pi_1",
    )
    assert failure.organization_id == "org_1"
    assert "insufficient funds" in str(failure) and "card_declined" in str(failure) and "org_1" in str(failure)
    assert len(fake.posts()) == 1  # a card error is final: stripe does not retry it
    assert await guard.get_balance("org_1") == 40
    assert await grants_of(guard, "org_1") == [(40, "seed")]
    assert await guard.audit() == []


@pytest.mark.parametrize("status", ["requires_action", "processing", "requires_payment_method"])
async def test_a_payment_that_did_not_succeed_raises_and_grants_nothing(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient, status: str
) -> None:
    fake.outcome = status
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    with pytest.raises(AutoTopupFailed, match=f"pi_1 is {status}") as caught:
        await charge("org_1", 500, key="crossing-1")
    assert (caught.value.reason, caught.value.status, caught.value.payment_intent_id) == (status, status, "pi_1")
    if status == "requires_action":
        assert "needs its holder" in str(caught.value)
    assert await guard.get_balance("org_1") == 0
    assert await ledger_rows(guard, "org_1") == []
    assert await guard.audit() == []


@pytest.mark.parametrize(
    ("organization_id", "reason", "message"),
    [
        ("org_unknown", "no_customer", "has no Stripe customer"),
        ("org_2", "no_payment_method", "cus_none has no default payment method"),
        ("org_3", "no_payment_method", "cus_bare has no default payment method"),
        ("org_4", "customer_deleted", "cus_gone is deleted"),
    ],
)
async def test_no_customer_or_no_saved_card_raises_before_any_payment(
    guard: CreditGuard,
    fake: FakeStripe,
    stripe_client: stripe.StripeClient,
    organization_id: str,
    reason: str,
    message: str,
) -> None:
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    with pytest.raises(AutoTopupFailed, match=message) as caught:
        await charge(organization_id, 500)
    assert caught.value.reason == reason and caught.value.payment_intent_id is None
    assert fake.posts() == []
    if reason == "no_customer":
        assert fake.requests == []
    assert await ledger_rows(guard) == []


async def test_a_sync_customer_lookup_and_a_missing_stripe_customer(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=lambda org: "cus_missing", unit_amount=2)
    with pytest.raises(AutoTopupFailed, match="cus_missing could not be read") as caught:
        await charge("org_1", 500)
    assert caught.value.reason == "resource_missing"
    assert isinstance(caught.value.__cause__, stripe.InvalidRequestError)
    assert fake.posts() == []
    sync = stripe_auto_topup(guard, client=stripe_client, customer_for=ORGS.get, unit_amount=2)
    assert await sync("org_1", 3) == "pi_1"
    assert await guard.get_balance("org_1") == 3


async def test_bad_arguments_are_refused_before_stripe_is_called(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    for unit_amount in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="unit_amount"):
            stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=unit_amount)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="currency"):
        stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=1, currency=" ")
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=1)
    for credits in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="credits"):
            await charge("org_1", credits)  # type: ignore[arg-type]
    assert fake.requests == []


async def test_paid_but_not_granted_says_so_and_the_same_key_grants_it_later(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    grant = guard.grant_credits

    async def database_down(*args: Any, **kwargs: Any) -> int:
        raise StorageUnavailable("the database is down")

    monkeypatch.setattr(guard, "grant_credits", database_down)
    with pytest.raises(AutoTopupFailed, match="pi_1 succeeded but granting the credits failed") as caught:
        await charge("org_1", 500, key="crossing-1")
    assert (caught.value.reason, caught.value.payment_intent_id) == ("grant_failed", "pi_1")
    assert isinstance(caught.value.__cause__, StorageUnavailable)
    monkeypatch.setattr(guard, "grant_credits", grant)
    assert await charge("org_1", 500, key="crossing-1") == "pi_1"  # Stripe replays, nothing charged twice
    assert fake.intents == 1
    assert await grants_of(guard, "org_1") == [(500, "stripe:pi_1")]
    assert await guard.audit() == []


async def test_stripe_retries_an_outage_under_the_same_key_and_grants_once(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    """A StripeClient retries only when told (``max_network_retries``; none by default), and
    resends the same Idempotency-Key: one payment."""
    fake.failures = ["unreachable", "500"]
    retrying = stripe.StripeClient("sk_test_x", http_client=fake, max_network_retries=2)
    charge = stripe_auto_topup(guard, client=retrying, customer_for=customer_of, unit_amount=2)
    assert await charge("org_1", 500, key="crossing-1") == "pi_1"
    assert [p["headers"]["Idempotency-Key"] for p in fake.posts()] == ["credit_guard-topup:org_1:crossing-1"] * 3
    assert len(fake.slept) == 2
    assert await grants_of(guard, "org_1") == [(500, "stripe:pi_1")]
    assert await guard.audit() == []


async def test_no_answer_from_stripe_raises_an_unknown_outcome_and_grants_nothing(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    fake.failures = ["unreachable"]
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    with pytest.raises(AutoTopupFailed, match="whether it was charged is unknown") as caught:
        await charge("org_1", 500, key="crossing-1")
    assert (caught.value.reason, caught.value.payment_intent_id) == ("APIConnectionError", None)
    assert await ledger_rows(guard, "org_1") == []
    # the same crossing run again asks Stripe under the same key: paid once, granted once
    assert await charge("org_1", 500, key="crossing-1") == "pi_1"
    assert await guard.get_balance("org_1") == 500
    assert await guard.audit() == []


def signed(payload: bytes, secret: str) -> dict[str, str]:
    timestamp = int(time.time())
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={timestamp},v1={mac}", "Content-Type": "application/json"}


async def test_a_webhook_grants_a_top_up_that_succeeded_later_once(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    """A top-up left ``processing`` (or authenticated later by the customer) is granted by
    ``payment_intent.succeeded``, under the same key as the synchronous path: never twice."""
    fake.outcome = "processing"
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    with pytest.raises(AutoTopupFailed):
        await charge("org_1", 500, key="crossing-1")
    succeeded = {**json.loads(fake.replies["credit_guard-topup:org_1:crossing-1"][0]), "status": "succeeded"}

    async def credits_for(event: Any) -> None:
        if event["type"] == "payment_intent.succeeded":
            await grant_topup_payment(guard, event["data"]["object"])

    secret = "whsec_topup"
    async with client(stripe_webhook(guard, secret=secret, credits_for=credits_for)) as http:
        for event_id in ("evt_1", "evt_2"):  # delivered twice, under two event ids even
            data = {"id": event_id, "object": "event", "type": "payment_intent.succeeded"}
            payload = json.dumps({**data, "data": {"object": succeeded}}).encode()
            answer = await http.post("/", content=payload, headers=signed(payload, secret))
            assert answer.status_code == 200, answer.text
    assert await grants_of(guard, "org_1") == [(500, "stripe:pi_1")]
    # the synchronous path, had it seen it succeed, would have granted nothing more
    assert await grant_topup_payment(guard, succeeded) is True
    assert await guard.get_balance("org_1") == 500
    # someone else's PaymentIntent, or one not succeeded: not a top-up, nothing granted
    assert await grant_topup_payment(guard, {**succeeded, "id": "pi_9", "metadata": {}}) is False
    assert await grant_topup_payment(guard, {**succeeded, "id": "pi_9", "status": "processing"}) is False
    assert await guard.get_balance("org_1") == 500
    assert await guard.audit() == []


async def test_set_auto_topup_with_stripe_charges_the_card_once_when_the_line_is_crossed(
    guard: CreditGuard, fake: FakeStripe, stripe_client: stripe.StripeClient
) -> None:
    """The two together: a charge crosses the line, the guard runs the Stripe callable
    off the request under the crossing's key, the card is charged once and the credits
    granted once; the row records the PaymentIntent."""
    charge = stripe_auto_topup(guard, client=stripe_client, customer_for=customer_of, unit_amount=2)
    await guard.grant_credits("org_1", 120)
    await guard.set_auto_topup("org_1", below=100, credits=500, charge=charge)
    assert (await guard.deduct_credits("org_1", "seedream_text_to_image", units=5)).success  # 95
    for _ in range(3):
        await guard.topups.run_once()
    [post] = fake.posts()
    assert post["headers"]["Idempotency-Key"] == "credit_guard-topup:org_1:" + await topup_key(guard, "org_1", 1)
    assert await guard.get_balance("org_1") == 595
    topup = await guard.auto_topup("org_1")
    assert topup is not None and (topup.state, topup.last_result) == ("armed", "pi_1")
    assert await guard.audit() == []
