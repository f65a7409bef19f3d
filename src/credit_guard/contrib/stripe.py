"""Paid top-ups from Stripe: a webhook endpoint that grants credits once per event.

    routes.append(Route("/webhooks/stripe", stripe_webhook(guard, secret=os.environ["STRIPE_WEBHOOK_SECRET"],
                                                           credits_for=credits_for_checkout), methods=["POST"]))

The ``Stripe-Signature`` header is verified by the official ``stripe`` package
(``pip install credit_guard[stripe]``); nothing here re-implements it. For each verified
event ``credits_for(event)`` (sync or async) says what to grant: ``(organization_id,
credits)``, a mapping of ``grant_credits`` keyword arguments (``organization_id``,
``amount``, and ``expires_at``, ``priority``, ``reason`` as wanted), or None to ignore
the event. The grant's idempotency key is the event's id, so an event Stripe delivers
twice (it does: retries, replays from the dashboard) grants once.

Answers, as Stripe reads them: 200 when handled (granted or ignored); 400 for a missing
or bad signature, a timestamp outside the tolerance or a body that is not an event
(nothing granted, and Stripe should not retry it); 500 when ``credits_for`` or the grant
fails on the app's side, 503 when the database is down (nothing granted; Stripe retries).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

from .._body import BodyTooLarge, ClientDisconnected, read_body
from .._guard import CreditGuard
from ..errors import StorageUnavailable
from ..problems import Problem

try:
    import stripe
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("credit_guard.contrib.stripe needs the stripe package: pip install credit_guard[stripe]") from exc

log = logging.getLogger("credit_guard")

#: What ``credits_for`` returns: who gets how much, the grant's keyword arguments, or nothing.
Grant = tuple[str, int] | Mapping[str, Any] | None
CreditsFor = Callable[[Any], Grant | Awaitable[Grant]]
#: A Stripe event is small; a body past this is not one.
MAX_BODY = 1024 * 1024
_TYPE = "urn:credit-guard:problem:stripe-webhook"


def stripe_webhook(
    guard: CreditGuard, *, secret: str, credits_for: CreditsFor, tolerance: int = stripe.Webhook.DEFAULT_TOLERANCE
) -> StripeWebhook:
    """The ASGI app to route the webhook URL registered with Stripe to."""
    return StripeWebhook(guard, secret=secret, credits_for=credits_for, tolerance=tolerance)


class StripeWebhook:
    """An ASGI app (an object, so Starlette's ``Route`` and ``Mount`` both serve it as one)."""

    def __init__(self, guard: CreditGuard, *, secret: str, credits_for: CreditsFor, tolerance: int) -> None:
        if not secret:
            raise ValueError("secret must be the endpoint's signing secret (whsec_...)")
        self.guard, self.secret, self.credits_for, self.tolerance = guard, secret, credits_for, tolerance

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await _problem(405, "Method not allowed", "Stripe delivers events with POST.")(scope, receive, send)
            return
        try:
            body, _ = await read_body(receive, MAX_BODY)
        except ClientDisconnected:  # Stripe hung up mid-event: nothing to verify, it will retry
            return
        except BodyTooLarge:
            await _problem(413, "Too large", f"An event is under {MAX_BODY} bytes.")(scope, receive, send)
            return
        signature = dict(scope["headers"]).get(b"stripe-signature", b"").decode("latin-1") or None
        try:
            event = stripe.Webhook.construct_event(body, signature, self.secret, tolerance=self.tolerance)
            _check_event(event)
        except (stripe.SignatureVerificationError, ValueError, AttributeError, TypeError) as exc:
            # A correctly signed body that is not an event ([], null, an object without an
            # id or a type) is the sender's mistake too: 400, never a bare 500.
            log.warning("credit_guard: Stripe webhook refused (nothing granted): %s", exc)
            detail = f"The event could not be verified: {exc}"
            await _problem(400, "Bad signature or event", detail)(scope, receive, send)
            return
        answer = await _grant(self.guard, event, self.credits_for)
        await answer(scope, receive, send)


def _check_event(event: Any) -> None:
    """ValueError unless ``event`` has the two fields every Stripe event has: a text ``id``
    (the grant's idempotency key) and a text ``type``."""
    for field in ("id", "type"):
        try:
            value = event[field]
        except (KeyError, TypeError, AttributeError):
            value = None
        if not isinstance(value, str) or not value:
            raise ValueError(f"the body is not a Stripe event: no {field!r} text")


async def _grant(guard: CreditGuard, event: Any, credits_for: CreditsFor) -> Callable[[Scope, Receive, Send], Any]:
    event_id, event_type = str(event["id"]), str(event["type"])
    try:
        wanted = credits_for(event)
        if inspect.isawaitable(wanted):
            wanted = await wanted
        if wanted is None:
            return _ok({"received": True, "granted": 0})
        if isinstance(wanted, Mapping):
            arguments = dict(wanted)
        else:
            organization_id, amount = wanted
            arguments = {"organization_id": organization_id, "amount": amount}
        arguments.setdefault("reason", f"stripe {event_type} {event_id}")
        arguments["idempotency_key"] = event_id
        balance = await guard.grant_credits(**arguments)
    except StorageUnavailable as exc:
        log.error("credit_guard: Stripe event %s not granted, the database is down: %s", event_id, exc)
        return _problem(503, "Database unavailable", "Nothing was granted; Stripe will retry.")
    except Exception:
        log.exception("credit_guard: Stripe event %s (%s) not granted", event_id, event_type)
        return _problem(500, "Event not handled", "Nothing was granted; Stripe will retry.")
    log.info(
        "credit_guard: Stripe event %s granted %s to %s", event_id, arguments["amount"], arguments["organization_id"]
    )
    return _ok({"received": True, "granted": arguments["amount"], "balance": balance})


def _problem(status: int, title: str, detail: str) -> Problem:
    return Problem(status=status, type=_TYPE, title=title, detail=detail)


def _ok(body: dict[str, Any]) -> Callable[[Scope, Receive, Send], Any]:
    data = json.dumps(body).encode()

    async def send_ok(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return send_ok
