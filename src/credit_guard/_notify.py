"""Cross-process pricing invalidation over PostgreSQL LISTEN/NOTIFY.

Every process keeps its own pricing cache. A price written through one process is
forgotten there at once, but the others would keep serving the old price until their
TTL ran out. So each pricing write is followed by ``NOTIFY credit_guard_pricing`` with
the changed keys, and every guard on PostgreSQL LISTENs on a dedicated asyncpg
connection and drops those keys from its cache the moment the notification arrives.

What can go wrong, and what happens then:

* The listening connection dies (server restart, failover, idle-killer). Notifications
  sent meanwhile are lost for good, so after a reconnect the whole cache is cleared:
  one extra query per key, never a stale price. (The first load waits for the first
  LISTEN, so nothing is cached before it.) A silent network drop is
  caught by a periodic ``SELECT 1``.
* The NOTIFY after a write fails (the database went away just after the commit). The
  write stands; the failure is logged and other processes fall back to the TTL.
* PgBouncer in transaction pooling mode does not carry LISTEN. Build the guard with
  ``pricing_notify=False`` there (the TTL then bounds staleness), or point the guard at
  PostgreSQL directly.

SQLite has no notifier: one database file normally means one process, and a guard in
a second process sees a change within ``pricing_ttl``.

NOTIFY is scoped to one database, so apps on separate databases of one server never
invalidate each other's caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Protocol

import asyncpg
from sqlalchemy import func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ._storage.postgres import asyncpg_dsn

log = logging.getLogger("credit_guard")


class Forgets(Protocol):
    """What the notifier needs of a cache (the pricing cache): to forget keys, or all."""

    def invalidate(self, *feature_keys: str) -> None: ...
    def clear(self) -> None: ...


CHANNEL = "credit_guard_pricing"
#: The listener's ``application_name``, so it is easy to spot in ``pg_stat_activity``.
APPLICATION_NAME = "credit_guard_pricing_listener"


class PricingNotifier:
    """Sends a notification after each pricing write and applies everyone else's.

    One per guard, like the cache it serves; asyncio only (asyncpg is). The listening
    task starts on the first cache miss or on ``start()`` and runs until ``close()``.
    """

    def __init__(
        self,
        url: str | URL,
        cache: Forgets,
        *,
        engine: AsyncEngine,
        timeout: float = 5.0,
        ping_interval: float = 30.0,
        min_backoff: float = 0.2,
        max_backoff: float = 30.0,
    ) -> None:
        self._dsn = asyncpg_dsn(url)
        self._cache = cache
        self._engine = engine
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        # Loop-bound: made by ``_bind`` on the loop that listens, dropped by close(), so a
        # guard closed and started again, on this loop or a new one, listens as on its first start.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._listening: asyncio.Event | None = None
        self._first_attempt: asyncio.Event | None = None
        # Set once any price may have been loaded; until then a (first) connect has nothing to clear.
        self._loads_started = False
        self._closed = False
        #: How many times the listener connected (1 after the first start); for monitoring.
        self.connects = 0
        #: How many notifications arrived (including this process's own).
        self.received = 0

    @property
    def listening(self) -> bool:
        return self._listening is not None and self._listening.is_set()

    def _bind(self) -> tuple[asyncio.Event, asyncio.Event]:
        """The events of the running loop: fresh ones on a loop this notifier has not run on
        (the old task died with its loop, so nothing is listening and the cache must be
        cleared once it does)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._listening is None or self._first_attempt is None:
            self._loop = loop
            self._listening, self._first_attempt = asyncio.Event(), asyncio.Event()
            self._task = None
        return self._listening, self._first_attempt

    def ensure_started(self) -> None:
        """Start the listening task if it is not running; returns at once."""
        self._bind()
        if self._closed or (self._task is not None and not self._task.done()):
            return
        assert self._loop is not None
        self._task = self._loop.create_task(self._run(), name="credit_guard pricing listener")

    async def ready(self) -> None:
        """Start the task and wait for its first connection attempt (not for reconnects).

        The cache's first load waits here, so nothing is cached before LISTEN is in place
        (and the first connect has nothing to clear away). A slow or failed first attempt
        only delays the first load by the timeout; after that loads never wait.
        """
        self.ensure_started()
        _, first_attempt = self._bind()
        if not self._closed and not first_attempt.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_attempt.wait(), self._timeout)
        self._loads_started = True

    async def start(self) -> bool:
        """Start listening and wait (up to the timeout) until it does; True when listening.

        A database that is down does not fail the app's startup: the task keeps retrying
        and the TTL bounds staleness until it gets through.
        """
        self.ensure_started()
        listening, _ = self._bind()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listening.wait(), self._timeout)
        if not self.listening:
            log.warning("credit_guard: pricing listener not connected yet; retrying in the background")
        return self.listening

    async def notify(self, *feature_keys: str) -> None:
        """Tell every listening process to forget these keys. Never raises: the write it
        follows has committed, and failing the request now would misreport it."""
        payloads = _payloads(sorted(set(feature_keys)))
        payload = ", ".join(payloads)
        try:
            async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
                for chunk in payloads:  # one transaction: listeners get them together, or none
                    await conn.execute(select(func.pg_notify(CHANNEL, chunk)))
        except Exception as exc:  # anything: the caller's write stands either way
            log.error(
                "credit_guard: could not notify other processes of pricing change %s (%s); "
                "they will see it within their pricing_ttl",
                payload,
                exc,
            )

    async def close(self) -> None:
        """Stop listening. The notifier is then as if new: ``start()``, or the next cache
        miss, listens again, on this loop or another."""
        self._closed = True
        task, self._task = self._task, None
        mine = self._loop is asyncio.get_running_loop()
        self._loop = self._listening = self._first_attempt = None
        try:
            if task is not None and not task.done() and mine:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            self._closed = False

    # -- the listening task ----------------------------------------------------------------

    async def _run(self) -> None:
        listening, first_attempt = self._bind()
        backoff = self._min_backoff
        while not self._closed:
            conn: Any = None
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=self._timeout, server_settings={"application_name": APPLICATION_NAME}
                )
                await self._listen(conn)
                backoff = self._min_backoff
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the task must outlive any failure, or invalidation stops silently
                log.warning(
                    "credit_guard: pricing listener lost its connection (%s); reconnecting in %.1fs", exc, backoff
                )
            finally:
                first_attempt.set()
                listening.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _listen(self, conn: Any) -> None:
        listening, first_attempt = self._bind()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(CHANNEL, self._on_notification)
        self.connects += 1
        # Whatever changed while nobody was listening (an outage, or a first connect that
        # came after loads) was announced to no one: forget every cached price.
        if self._loads_started:
            self._cache.clear()
        listening.set()
        first_attempt.set()
        log.info("credit_guard: listening for pricing changes on %r", CHANNEL)
        while True:
            try:
                await asyncio.wait_for(lost.wait(), self._ping_interval)
            except TimeoutError:
                # A dropped network path closes nothing; only a query finds out.
                await conn.execute("SELECT 1", timeout=self._timeout)
                continue
            raise ConnectionError("listening connection closed")

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.received += 1
        try:
            keys = json.loads(payload)
        except ValueError:
            keys = None
        if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
            self._cache.invalidate(*keys)
        else:  # someone else's NOTIFY on our channel: be safe, not clever
            log.warning("credit_guard: unexpected pricing notification %r; clearing the pricing cache", payload)
            self._cache.clear()


__all__ = ["APPLICATION_NAME", "CHANNEL", "PricingNotifier"]


#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; stay well under it.
MAX_PAYLOAD_BYTES = 7000


def _payloads(keys: list[str]) -> list[str]:
    """The keys as JSON lists that each fit in one NOTIFY (a bulk import can change hundreds)."""
    chunks: list[str] = []
    batch: list[str] = []
    for key in keys:
        if batch and len(json.dumps([*batch, key]).encode()) > MAX_PAYLOAD_BYTES:
            chunks.append(json.dumps(batch))
            batch = []
        batch.append(key)
    chunks.append(json.dumps(batch))
    return chunks
