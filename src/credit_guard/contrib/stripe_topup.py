"""Automatic top-ups paid by Stripe: charge the organization's saved card, then grant.

    charge = stripe_auto_topup(guard, client=stripe.StripeClient(os.environ["STRIPE_SECRET_KEY"]),
                               customer_for=customer_of_org, unit_amount=2)  # 2 cents a credit
    await guard.set_auto_topup("org_1", below=100, credits=1000, charge=charge)

The callable it returns is what ``set_auto_topup`` runs once per crossing of the line: it
looks up the organization's Stripe customer (``customer_for``, sync or async, None when the
organization has none), reads the customer's ``invoice_settings.default_payment_method``
and creates a PaymentIntent for ``credits * unit_amount`` (in the currency's smallest unit)
confirmed off-session on that payment method. When the PaymentIntent ``succeeded``, it
grants the credits with the idempotency key ``stripe:<payment intent id>`` and returns the
PaymentIntent's id (what the top-up records). Anything else raises :class:`AutoTopupFailed`
and grants nothing: a declined card (``reason`` is Stripe's code, ``decline_code`` the
bank's), a card that needs its holder (``requires_action``, ``authentication_required``),
no customer, no saved payment method, any other Stripe error.

Stripe's idempotency key for the PaymentIntent is derived from ``key`` when the caller
gives one (the guard gives one per crossing): the same crossing run twice, after a crash or
a lost answer, gets Stripe's first answer back instead of charging twice, and the grant's
key being the PaymentIntent's id, it grants once. Stripe keeps idempotency keys 24 hours.

All calls use the client's async methods (``create_async``, ``retrieve_async``): they run
on the client's async HTTP client and never block the event loop.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._guard import CreditGuard
from ..errors import CreditGuardError

try:
    import stripe
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "credit_guard.contrib.stripe_topup needs the stripe package: pip install credit_guard[stripe]"
    ) from exc

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams

log = logging.getLogger("credit_guard")

#: Who pays for an organization: its Stripe customer id (``cus_...``), or None.
CustomerFor = Callable[[str], Awaitable[str | None] | str | None]
#: The metadata mark of the PaymentIntents made here (``metadata["credit_guard"]``).
TOPUP_MARK = "auto_topup"
#: Stripe refuses idempotency keys longer than this.
_MAX_KEY = 255


class AutoTopupFailed(CreditGuardError):
    """The top-up was not paid, so nothing was granted (or, ``reason == "grant_failed"``,
    it was paid and the grant failed: run it again with the same ``key`` to grant it).

    ``reason``: why, as a short code: ``no_customer``, ``customer_deleted``,
    ``no_payment_method``, a PaymentIntent status that is not ``succeeded``
    (``requires_action``: the card needs its holder, ``processing``,
    ``requires_payment_method``...), Stripe's error code (``card_declined``,
    ``authentication_required``, ``expired_card``, ``resource_missing``...) or, when Stripe
    gave none, the error's class (``APIConnectionError``...), or ``grant_failed``.
    ``decline_code``: the bank's reason for a declined card (``insufficient_funds``...).
    ``payment_intent_id``: the PaymentIntent Stripe made, when it made one.
    ``status``: that PaymentIntent's status, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        organization_id: str,
        reason: str,
        decline_code: str | None = None,
        payment_intent_id: str | None = None,
        status: str | None = None,
    ) -> None:
        super().__init__(message)
        self.organization_id = organization_id
        self.reason = reason
        self.decline_code = decline_code
        self.payment_intent_id = payment_intent_id
        self.status = status


def stripe_auto_topup(
    guard: CreditGuard,
    *,
    client: stripe.StripeClient,
    customer_for: CustomerFor,
    unit_amount: int,
    currency: str = "usd",
    description: str | None = None,
) -> StripeAutoTopup:
    """The ``charge`` callable of ``guard.set_auto_topup`` that pays with Stripe.

    ``unit_amount``: the price of one credit in the currency's smallest unit (cents for
    ``usd``), a positive integer; ``currency``: an ISO code Stripe knows; ``description``:
    the PaymentIntent's (on the customer's receipt), by default "<credits> credits (automatic
    top-up)". ValueError for a bad argument.
    """
    return StripeAutoTopup(
        guard,
        client=client,
        customer_for=customer_for,
        unit_amount=unit_amount,
        currency=currency,
        description=description,
    )


class StripeAutoTopup:
    """``await topup(organization_id, credits, key=None)``: pay, grant, return the
    PaymentIntent's id; raises :class:`AutoTopupFailed` when nothing was paid."""

    def __init__(
        self,
        guard: CreditGuard,
        *,
        client: stripe.StripeClient,
        customer_for: CustomerFor,
        unit_amount: int,
        currency: str,
        description: str | None,
    ) -> None:
        if isinstance(unit_amount, bool) or not isinstance(unit_amount, int) or unit_amount <= 0:
            raise ValueError(
                f"unit_amount must be a positive integer (the smallest currency unit), not {unit_amount!r}"
            )
        if not isinstance(currency, str) or not currency.strip():
            raise ValueError(f"currency must be an ISO currency code such as 'usd', not {currency!r}")
        self.guard, self.client, self.customer_for = guard, client, customer_for
        self.unit_amount, self.currency, self.description = unit_amount, currency.strip().lower(), description

    async def __call__(self, organization_id: str, credits: int, key: str | None = None) -> str:
        if isinstance(credits, bool) or not isinstance(credits, int) or credits <= 0:
            raise ValueError(f"credits must be a positive integer, not {credits!r}")

        def failed(message: str, reason: str, **details: Any) -> AutoTopupFailed:
            text = f"auto top-up of {credits} credits for {organization_id!r} failed: {message}"
            return AutoTopupFailed(text, organization_id=organization_id, reason=reason, **details)

        customer_id = self.customer_for(organization_id)
        if inspect.isawaitable(customer_id):
            customer_id = await customer_id
        if not customer_id:
            raise failed("the organization has no Stripe customer", "no_customer")
        try:
            customer = await self.client.v1.customers.retrieve_async(customer_id)
        except stripe.StripeError as exc:
            raise failed(f"Stripe customer {customer_id} could not be read: {_said(exc)}", _code(exc)) from exc
        if _field(customer, "deleted"):
            raise failed(f"Stripe customer {customer_id} is deleted", "customer_deleted")
        payment_method = _default_payment_method(customer)
        if payment_method is None:
            message = f"Stripe customer {customer_id} has no default payment method (invoice_settings)"
            raise failed(message, "no_payment_method")

        amount = credits * self.unit_amount
        params: PaymentIntentCreateParams = {
            "customer": customer_id,
            "amount": amount,
            "currency": self.currency,
            "payment_method": payment_method,
            "confirm": True,
            "off_session": True,
            "description": self.description or f"{credits} credits (automatic top-up)",
            "metadata": {"organization_id": organization_id, "credits": str(credits), "credit_guard": TOPUP_MARK},
        }
        idempotency_key = _stripe_key(organization_id, key)
        try:
            intent = await self.client.v1.payment_intents.create_async(
                params=params, options={"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as exc:
            made = _field(exc.error, "payment_intent")  # a declined card's PaymentIntent
            if isinstance(exc, stripe.APIConnectionError | stripe.APIError):
                message = (
                    f"Stripe did not answer the payment of {amount} {self.currency} ({_said(exc)}): whether it"
                    f" was charged is unknown; run it again with the same key ({idempotency_key}) to find out"
                )
            else:
                message = f"Stripe refused the payment of {amount} {self.currency} on {payment_method}: {_said(exc)}"
            raise failed(
                message,
                _code(exc),
                decline_code=_field(exc.error, "decline_code"),
                payment_intent_id=_id_of(made),
                status=_field(made, "status"),
            ) from exc
        if intent.status != "succeeded":
            raise failed(
                f"PaymentIntent {intent.id} is {intent.status}, not succeeded"
                + (": the card needs its holder (authentication)" if intent.status == "requires_action" else ""),
                intent.status,
                payment_intent_id=intent.id,
                status=intent.status,
            )
        try:
            await self.guard.grant_credits(
                organization_id,
                credits,
                reason=f"stripe auto top-up {intent.id}",
                idempotency_key=f"stripe:{intent.id}",
            )
        except Exception as exc:
            log.error("credit_guard: PaymentIntent %s paid but its %s credits not granted: %s", intent.id, credits, exc)
            raise failed(
                f"PaymentIntent {intent.id} succeeded but granting the credits failed ({exc}); run it again"
                " with the same key, or grant them with idempotency_key='stripe:" + intent.id + "'",
                "grant_failed",
                payment_intent_id=intent.id,
                status=intent.status,
            ) from exc
        log.info("credit_guard: auto top-up of %s credits for %s paid by %s", credits, organization_id, intent.id)
        return intent.id


async def grant_topup_payment(guard: CreditGuard, payment_intent: Any) -> bool:
    """Grant what a succeeded PaymentIntent made by :func:`stripe_auto_topup` paid for, under
    the same idempotency key (``stripe:<id>``), so it never grants twice; for a webhook's
    ``payment_intent.succeeded`` (a top-up that was ``processing``, or that the customer
    authenticated later). True when ``payment_intent`` is such a top-up (granted now or
    before), False for any other PaymentIntent (nothing granted)."""
    metadata = _field(payment_intent, "metadata")
    if _field(payment_intent, "status") != "succeeded" or _field(metadata, "credit_guard") != TOPUP_MARK:
        return False
    organization_id, credits = str(metadata["organization_id"]), int(metadata["credits"])
    intent_id = str(payment_intent["id"])
    await guard.grant_credits(
        organization_id, credits, reason=f"stripe auto top-up {intent_id}", idempotency_key=f"stripe:{intent_id}"
    )
    return True


def _stripe_key(organization_id: str, key: str | None) -> str:
    """Stripe's idempotency key: stable for a given ``key``, random without one."""
    if key is None:
        return f"credit_guard-topup-{uuid.uuid4()}"
    stable = f"credit_guard-topup:{organization_id}:{key}"
    if len(stable) > _MAX_KEY:
        stable = "credit_guard-topup:" + hashlib.sha256(stable.encode()).hexdigest()
    return stable


def _default_payment_method(customer: Any) -> str | None:
    return _id_of(_field(_field(customer, "invoice_settings"), "default_payment_method"))


def _field(value: Any, name: str) -> Any:
    """``value[name]`` of a StripeObject (not a dict: no ``get``) or a mapping; None when
    ``value`` is None or has no such field."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get(name)
    return value[name] if name in value else None


def _id_of(value: Any) -> str | None:
    """A Stripe reference's id: the text itself, or the id of an expanded object."""
    if isinstance(value, str):
        return value or None
    found = _field(value, "id")
    return found if isinstance(found, str) and found else None


def _code(exc: stripe.StripeError) -> str:
    return exc.code or type(exc).__name__


def _said(exc: stripe.StripeError) -> str:
    parts = [exc.user_message or type(exc).__name__]
    codes = [c for c in (exc.code, _field(exc.error, "decline_code")) if c]
    if codes:
        parts.append(f"({', '.join(codes)})")
    return " ".join(parts)
