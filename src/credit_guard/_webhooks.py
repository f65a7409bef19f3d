"""Signed webhooks out: balance alerts, plan allowances and expired grants, from the outbox.

``guard.webhooks.send_to(url, secret=...)`` turns it on. From then on:

* the events are written by the transactions of what they tell (``_storage/outbox.py``):
  ``allowance.issued`` by a plan's renewal, ``grant.expired`` by the expiry sweep, and
  ``balance.low`` / ``balance.empty`` / ``balance.recovered`` by a look at the balance
  (``watch_in``) that this process takes off the request whenever a charge, refund, grant,
  expiry or renewal moved the spendable balance across the low line (the guard's
  ``low_balance_threshold``) or across zero;
* a sender task in every started guard claims due events with a lease, POSTs each as
  JSON, and marks it delivered on a 2xx; anything else is tried again with a backoff
  (2 s, 4 s, ... up to an hour, ``max_attempts`` in all). A process killed mid-delivery
  leaves a lease that runs out: the event is sent again, with the same id. Receivers
  dedupe on ``id`` (the ``Credit-Guard-Event-Id`` header).

Signatures follow Stripe's scheme, so a receiver verifies them with a library it may
already have: ``Credit-Guard-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" with the secret>`` (``stripe.WebhookSignature.verify_header(body, header,
secret, tolerance=300)`` checks it, and the age).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from ._clock import utcnow
from ._storage.base import Store

log = logging.getLogger("credit_guard")

SIGNATURE_HEADER = "Credit-Guard-Signature"
EVENT_ID_HEADER = "Credit-Guard-Event-Id"
EVENT_TYPES = ("allowance.issued", "grant.expired", "balance.low", "balance.empty", "balance.recovered")


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The signature header's value for ``body`` (Stripe's scheme: ``t=...,v1=...``)."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


class Webhooks:
    def __init__(self, store: Store, *, low_balance_threshold: int | None) -> None:
        self.store = store
        #: Below it (and above zero) a balance is low; with no threshold only empty counts.
        self.low = max(1, low_balance_threshold or 1)
        self.url: str | None = None
        self.secret = ""
        self.timeout = 10.0
        self.max_attempts = 20
        #: How often a sender looks for events other processes wrote or that are due again.
        self.poll_interval = 2.0
        #: Organizations to look at, and whether their balance fell (see ``watch_in``).
        self._pending: dict[str, bool] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None

    def send_to(self, url: str, *, secret: str, timeout: float = 10.0, max_attempts: int = 20) -> None:
        """Send every event to ``url``, signed with ``secret``. Call it before ``start()``
        (at startup, in every process that runs the guard)."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// URL, got {url!r:.80}")
        if not isinstance(secret, str) or len(secret) < 16:
            raise ValueError("secret must be a string of at least 16 characters (share it with the receiver only)")
        if timeout <= 0 or max_attempts < 1:
            raise ValueError("timeout must be positive and max_attempts at least 1")
        try:
            import httpx  # noqa: F401
        except ImportError as exc:
            raise ImportError("webhooks need httpx: pip install 'credit_guard[webhooks]'") from exc
        self.url, self.secret, self.timeout, self.max_attempts = url, secret, timeout, max_attempts
        self.store.notify = True

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def moved(self, organization_id: str, balance: int | None, delta: int) -> None:
        """A balance moved by ``delta`` to ``balance`` (None: unknown, look anyway): if it
        crossed the low line or zero, look at it off the request (``watch_in`` decides)."""
        if not self.enabled:
            return
        if balance is not None:
            low, high = sorted((balance - delta, balance))
            if not any(low < line <= high for line in (self.low, 1)):
                return
        self._pending[organization_id] = self._pending.get(organization_id, False) or delta < 0
        self.wake()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        if not self.enabled or self._task is not None:
            return
        import httpx

        self._client = httpx.AsyncClient(timeout=self.timeout)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="credit_guard webhooks")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self._wake = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # the sender outlives any one bad round; the outbox keeps the events
                log.error("credit_guard: webhook round failed: %s", exc, exc_info=exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def run_once(self, now: datetime | None = None) -> int:
        """Look at the balances that moved, then send what is due; how many were delivered."""
        while self._pending:
            org, falling = self._pending.popitem()
            await self.store.watch_balance(org, self.low, now or utcnow(), falling)
        delivered = 0
        while True:
            when = now or utcnow()
            lease = when + timedelta(seconds=self.timeout * 2 + 5)
            batch = await self.store.claim_events(when, lease, 20)
            for row_id, event_id, payload, attempts in batch:
                delivered += await self._deliver(row_id, event_id, payload, attempts, when)
            if len(batch) < 20:
                return delivered

    async def _deliver(self, row_id: int, event_id: str, payload: str, attempts: int, now: datetime) -> int:
        assert self.url is not None
        body = payload.encode()
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event_id,
            SIGNATURE_HEADER: sign(body, self.secret),
        }
        error = None
        try:
            client = self._client
            if client is None:  # run_once without start(): a one-off client
                import httpx

                async with httpx.AsyncClient(timeout=self.timeout) as one_off:
                    response = await one_off.post(self.url, content=body, headers=headers)
            else:
                response = await client.post(self.url, content=body, headers=headers)
            if 200 <= response.status_code < 300:
                await self.store.event_delivered(row_id, utcnow())
                return 1
            error = f"HTTP {response.status_code}"
        except Exception as exc:  # a refused connection, a timeout: tried again later
            error = f"{type(exc).__name__}: {exc}"
        retry = None if attempts >= self.max_attempts else now + timedelta(seconds=min(3600, 2**attempts))
        log.warning("credit_guard: webhook %s not delivered (attempt %s): %s", event_id, attempts, error)
        await self.store.event_failed(row_id, retry, error)
        return 0
