"""Charges that arrive together are decided together: one statement for the lot.

Why: on one hot account every charge waits for the row lock the charge before it holds,
so the one-statement limit is the row lock's (~1,500-2,000 charges/s here) however many
connections wait. A batch takes the lock once for all the charges queued behind it
(TigerBeetle's design), and on many accounts it spares a statement, a plan and a round
trip per charge.

How: while fewer than ``max_in_flight`` charge statements are running, a charge goes out
at once, alone (no added latency at low load). Beyond that it queues; when a statement
returns, everything queued (up to ``max_batch``) leaves as ONE batch statement. The
statement decides each charge in arrival order against the room left by the ones before
it (``pg_charge.py``), exactly as charges sent one by one would be: the same no-overdraft
guarantee, each caller its own outcome (or its own exception: one charge that fails alone
fails no other). Charges with an ``Idempotency-Key`` ride in the same batches, each key
claimed by the statement that charges for it. A caller cancelled while queued is left out
before its batch is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .base import ChargeRequest, KeyClaim

#: A charge, and the idempotency key it claims (None: a plain charge).
Item = tuple[ChargeRequest, KeyClaim | None]
#: One charge's outcome (a ChargeOutcome, or a ClaimOutcome for a keyed one).
One = Callable[[ChargeRequest, KeyClaim | None], Awaitable[Any]]
#: Each charge's outcome, or the exception that charge alone ran into.
Many = Callable[[Sequence[Item]], Awaitable[Sequence[Any]]]


class ChargeBatcher:
    """Per event loop (its futures belong to one): the store makes one per loop."""

    def __init__(self, one: One, many: Many, *, max_in_flight: int = 2, max_batch: int = 256) -> None:
        self._one, self._many = one, many
        self.max_in_flight, self.max_batch = max_in_flight, max_batch
        self._in_flight = 0
        self._queue: list[tuple[ChargeRequest, KeyClaim | None, asyncio.Future[Any]]] = []
        #: Batches sent, and the charges in them (tests, the benchmark).
        self.batches = 0
        self.batched = 0

    async def charge(self, request: ChargeRequest, claim: KeyClaim | None = None) -> Any:
        if self._in_flight < self.max_in_flight and not self._queue:
            self._in_flight += 1
            try:
                return await self._one(request, claim)
            finally:
                self._in_flight -= 1
                self._launch()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((request, claim, future))
        return await future

    def _launch(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch = self._take()
            if not batch:
                continue
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._send(batch))

    def _take(self) -> list[tuple[ChargeRequest, KeyClaim | None, asyncio.Future[Any]]]:
        """The next batch, in arrival order, without cancelled callers. A key claimed twice
        (a client retrying at once) waits for the next batch: its first request is then
        decided, and the second is answered from its row, as if sent after it."""
        Queued = tuple[ChargeRequest, KeyClaim | None, asyncio.Future[Any]]
        batch: list[Queued] = []
        later: list[Queued] = []
        keys: set[tuple[str, str]] = set()
        for index, item in enumerate(self._queue):
            request, claim, future = item
            if len(batch) == self.max_batch:
                later.extend(self._queue[index:])
                break
            if future.cancelled():
                continue
            if claim is not None:
                key = (request.organization_id, claim.key)
                if key in keys:
                    later.append(item)
                    continue
                keys.add(key)
            batch.append(item)
        self._queue = later
        return batch

    async def _send(self, batch: list[tuple[ChargeRequest, KeyClaim | None, asyncio.Future[Any]]]) -> None:
        try:
            outcomes: Sequence[Any]
            if len(batch) == 1:
                outcomes = [await self._one(batch[0][0], batch[0][1])]
            else:
                self.batches += 1
                self.batched += len(batch)
                outcomes = await self._many([(request, claim) for request, claim, _ in batch])
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, _, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._in_flight -= 1
            self._launch()
