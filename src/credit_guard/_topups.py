"""Auto top-up: buy credits when a balance falls below a line, once per crossing.

``guard.set_auto_topup(org, below=N, credits=M, charge=callable)`` stores the line and
registers the app's ``charge`` (one callable for every organization; register it in every
process, at startup). When a charge, an expiry or anything else takes a watched balance
from at or above the line to below it, this process looks at it off the request: the
store's ``claim_topup_in`` decides under the account's lock whether this is a new
crossing (so 200 racing charges, in any number of processes, run the callable once), then
``charge(org, credits)`` runs here, outside any request and any transaction, and what it
returned (a grant or payment id) or raised is recorded on the row. The callable buys and
grants the credits itself (``contrib.stripe_topup.stripe_auto_topup`` does it with the
customer's saved card); a callable that accepts ``key`` is given one per crossing, stable
if a runner that died has it run again, for the payment's idempotency.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from ._clock import utcnow
from ._storage.base import Store
from .models import AutoTopup
from .schema import MAX_BALANCE

log = logging.getLogger("credit_guard")

Charge = Callable[..., Awaitable[Any]]


class AutoTopups:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.charge: Charge | None = None
        self._takes_key = False
        #: Each watched organization's line, as this process knows it (refreshed by ``refresh``).
        self.lines: dict[str, int] = {}
        #: How long a runner may take before another process may run the crossing again.
        self.lease = timedelta(minutes=5)
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def register(self, charge: Charge) -> None:
        if not callable(charge):
            raise TypeError(f"charge must be an async callable (organization_id, credits), got {charge!r:.80}")
        self.charge = charge
        params = inspect.signature(charge).parameters
        self._takes_key = "key" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    async def set(self, organization_id: str, below: int, credits: int) -> AutoTopup:
        for name, value in (("below", below), ("credits", credits)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_BALANCE:
                raise ValueError(f"{name} must be a positive integer up to {MAX_BALANCE}, got {value!r:.40}")
        topup = await self.store.set_topup(organization_id, below, credits, utcnow())
        self.lines[organization_id] = below
        self.moved(organization_id, None, -1)  # already below: that is a crossing too
        return topup

    async def remove(self, organization_id: str) -> bool:
        self.lines.pop(organization_id, None)
        return await self.store.remove_topup(organization_id)

    async def refresh(self) -> None:
        """Learn the lines other processes set (the keeper calls it every round)."""
        self.lines = await self.store.topup_lines()

    def moved(self, organization_id: str, balance: int | None, delta: int) -> None:
        """A balance moved by ``delta`` to ``balance`` (None: unknown): look at it off the
        request if it may have crossed its line, either way (a rise arms it again)."""
        line = self.lines.get(organization_id)
        if line is None:
            return
        if balance is not None:
            low, high = sorted((balance - delta, balance))
            if not low < line <= high:
                return
        self._pending.add(organization_id)
        if self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="credit_guard auto top-up")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as exc:  # the next crossing tries again; nothing is lost
                log.error("credit_guard: auto top-up round failed: %s", exc, exc_info=exc)

    async def run_once(self) -> int:
        """Look at every balance that moved; how many top-ups ran."""
        ran = 0
        while self._pending:
            ran += await self._look(self._pending.pop())
        return ran

    async def _look(self, org: str) -> int:
        charge = self.charge
        now = utcnow()
        if charge is None:
            log.warning("credit_guard: %s crossed its auto top-up line, but no charge is registered here", org)
            return 0
        claimed = await self.store.claim_topup(org, now, now + self.lease)
        if claimed is None:
            return 0
        crossing, credits, key = claimed
        result = error = None
        try:
            if self._takes_key:
                returned = await charge(org, credits, key=key)
            else:
                returned = await charge(org, credits)
            result = None if returned is None else str(returned)[:255]
            log.info("credit_guard: auto top-up of %s credits for %s: %s", credits, org, result)
        except Exception as exc:  # recorded; the next crossing tries again
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("credit_guard: auto top-up of %s credits for %s failed: %s", credits, org, error)
        await self.store.finish_topup(org, crossing, result, error, utcnow())
        return 1


def fan_out(*watchers: Callable[[str, int | None, int], None]) -> Callable[[str, int | None, int], None]:
    """One ``watch`` for the ledger and grants that tells every watcher."""

    def watch(organization_id: str, balance: int | None, delta: int) -> None:
        for watcher in watchers:
            watcher(organization_id, balance, delta)

    return watch
