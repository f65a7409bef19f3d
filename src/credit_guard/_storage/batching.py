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
it (``pg_charge.CHARGE_MANY``), exactly as charges sent one by one would be: the same
no-overdraft guarantee, each caller its own outcome (or its own exception: one charge
that fails alone fails no other). A caller cancelled while queued is left out before its
batch is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from .base import ChargeOutcome, ChargeRequest

One = Callable[[ChargeRequest], Awaitable[ChargeOutcome]]
#: Each charge's outcome, or the exception that charge alone ran into.
Many = Callable[[Sequence[ChargeRequest]], Awaitable[Sequence[ChargeOutcome | Exception]]]


class ChargeBatcher:
    """Per event loop (its futures belong to one): the store makes one per loop."""

    def __init__(self, one: One, many: Many, *, max_in_flight: int = 2, max_batch: int = 256) -> None:
        self._one, self._many = one, many
        self.max_in_flight, self.max_batch = max_in_flight, max_batch
        self._in_flight = 0
        self._queue: list[tuple[ChargeRequest, asyncio.Future[ChargeOutcome]]] = []
        #: Batches sent, and the charges in them (tests, the benchmark).
        self.batches = 0
        self.batched = 0

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        if self._in_flight < self.max_in_flight and not self._queue:
            self._in_flight += 1
            try:
                return await self._one(request)
            finally:
                self._in_flight -= 1
                self._launch()
        future: asyncio.Future[ChargeOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        return await future

    def _launch(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            batch = [(request, future) for request, future in batch if not future.cancelled()]
            if not batch:
                continue
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[ChargeRequest, asyncio.Future[ChargeOutcome]]]) -> None:
        try:
            outcomes: Sequence[ChargeOutcome | Exception]
            if len(batch) == 1:
                outcomes = [await self._one(batch[0][0])]
            else:
                self.batches += 1
                self.batched += len(batch)
                outcomes = await self._many([request for request, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._in_flight -= 1
            self._launch()
