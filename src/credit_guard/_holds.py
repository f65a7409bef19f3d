"""Holds: a charge stays a hold until its request completes, and a dead process's holds go back.

Why holds: between the charge and the end of the request the process may die (SIGKILL,
OOM, a deploy). The charge then has a row in ``credit_guard_holds``, and a sweeper, run by
every guard in the app's lifespan (and by ``credit-guard sweep``), refunds holds whose
time ran out. A live process keeps its own holds alive with a heartbeat, so a long video
job is never swept from under its request, and the timeout can stay short.

Why batched: settling a successful request writes nothing that moves money, so it must
not cost the request a round trip. ``settle_later`` only queues the charge id; a
background task settles every queued id a few milliseconds later: one DELETE of their
hold rows (a statement on PostgreSQL's pool, a few per transaction on SQLite), with the
idempotent responses that finished meanwhile written in the same transaction. If the process dies before that
flush, the sweeper refunds those holds: the error is in the customer's favour, never
a credit taken twice. ``close()`` flushes what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from ._clock import utcnow
from ._metrics import Metrics
from ._storage.base import Completion, Store
from .errors import StorageUnavailable
from .models import RefundResult

log = logging.getLogger("credit_guard")

HOLD_EXPIRED_REASON = "hold expired"


class HoldKeeper:
    """Owns one guard's open holds: heartbeat, batched settlement and the sweeper."""

    def __init__(
        self,
        store: Store,
        *,
        hold_timeout: float,
        sweep_interval: float,
        settle_delay: float,
        on_refund: Callable[[RefundResult, int, str], None] | None = None,
        sweep_limit: int = 500,
    ) -> None:
        self.store = store
        self.hold_timeout = hold_timeout
        self.sweep_interval = sweep_interval
        self.settle_delay = settle_delay
        #: Told of every hold the sweeper refunds (the ledger fires the refund hooks).
        self.on_refund = on_refund
        #: Run by every sweep after the holds (the guard's: expiring grants).
        self.also_sweep: Callable[[datetime], Awaitable[object]] | None = None
        self._sweep_limit = sweep_limit
        #: Charge ids of this process's requests still running (the heartbeat keeps them).
        self.live: set[int] = set()
        self._pending: set[int] = set()
        self._completions: list[Completion] = []
        self._writing: list[Completion] = []  # the completions of the batch in flight
        # Loop-bound: made on the loop that runs the keeper (``_bind``), dropped by close(),
        # so a guard closed and started again on a new event loop gets fresh ones.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # One batch at a time: a flush() waits for the batch the background task is writing.
        self._flushing: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self.sweeping = True
        #: Told how many holds each sweep released (``_metrics.py``); None reports nothing.
        self.metrics: Metrics | None = None

    def hold_until(self) -> datetime:
        return utcnow() + timedelta(seconds=self.hold_timeout)

    def track(self, charge_id: int) -> None:
        self.live.add(charge_id)
        self._keep_running()

    def forget(self, charge_id: int) -> None:
        """The hold was closed another way (refunded): nothing left to settle or extend."""
        self.live.discard(charge_id)
        self._pending.discard(charge_id)

    def settle_later(self, charge_id: int | None, completion: Completion | None = None) -> None:
        """Queue a hold as kept (and an idempotent response to store); returns at once."""
        if charge_id is not None:
            self.live.discard(charge_id)
            self._pending.add(charge_id)
        if completion is not None:
            self._completions.append(completion)
        self._keep_running()
        if self._wake is not None:
            self._wake.set()

    def has_completion(self, organization_id: str, idempotency_key: str) -> bool:
        """Whether this key's finished response is queued here, or in the batch being written."""
        return any(
            done.organization_id == organization_id and done.idempotency_key == idempotency_key
            for done in (*self._completions, *self._writing)
        )

    # -- the background task --------------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop | None:
        """The running loop, with this keeper's event, lock and task made for it.

        Objects left from another loop (one that ended without ``close()``, as a test
        client's does) cannot be awaited here; they are replaced, and what was queued on
        them stays queued for the new task.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._flushing = asyncio.Lock()
            self._task = None
        return loop

    def _keep_running(self) -> None:
        """The per-request check, kept cheap: a task alive on a loop that is not closed is
        this keeper's (two live loops sharing one guard is not supported)."""
        task = self._task
        if task is None or task.done() or task.get_loop().is_closed():
            self._ensure_running()

    def _ensure_running(self) -> None:
        loop = self._bind()
        if loop is None or (self._task is not None and not self._task.done()):
            return
        self._task = loop.create_task(self._run(), name="credit_guard-holds")

    async def start(self) -> None:
        self._ensure_running()

    async def _run(self) -> None:
        assert self._wake is not None
        beat_every = self.hold_timeout / 4
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + beat_every
        # A restart sweeps soon; a guard that does not sweep never wakes up for it.
        next_sweep = loop.time() + min(self.sweep_interval, 1.0) if self.sweeping else math.inf
        while True:
            timeout = max(0.0, min(next_beat, next_sweep) - loop.time())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that
            # lands in the turn the event is set, and close() would wait forever.
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._wake.is_set():
                self._wake.clear()
                await asyncio.sleep(self.settle_delay)  # let a burst gather into one statement
                await self._flush_quietly()
            now = loop.time()
            if now >= next_beat:
                next_beat = now + beat_every
                await self._heartbeat()
            if now >= next_sweep:
                next_sweep = now + self.sweep_interval
                try:
                    await self.sweep()
                except StorageUnavailable:
                    pass  # logged by the store; the next round retries
                except Exception as exc:  # the sweeper must outlive any one bad round
                    log.error("credit_guard: hold sweep failed: %s", exc, exc_info=exc)

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # the keeper must outlive any one failed batch
            if not isinstance(exc, StorageUnavailable):
                log.error("credit_guard: settling holds failed: %s", exc, exc_info=exc)
            # Kept queued (and heartbeaten) for the next round.
            if self._wake is not None:
                asyncio.get_running_loop().call_later(1.0, self._wake.set)

    async def flush(self) -> None:
        """Settle every queued hold and store every finished idempotent response, now
        (after the batch being written, if one is)."""
        if self._bind() is None or self._flushing is None:
            return
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending and not self._completions:
            return
        ids, self._pending = self._pending, set()
        completions, self._completions = self._completions, []
        self._writing = completions
        try:
            settled = await self.store.settle_holds(sorted(ids), completions)
        except BaseException:
            self._pending |= ids
            self._completions = completions + self._completions
            raise
        finally:
            self._writing = []
        lost = ids - settled
        if lost:
            log.warning(
                "credit_guard: holds %s were refunded before they could be settled "
                "(their requests outlived hold_timeout=%ss); raise hold_timeout",
                sorted(lost),
                self.hold_timeout,
            )

    async def _heartbeat(self) -> None:
        ids = sorted(self.live | self._pending)
        if not ids:
            return
        try:
            still = await self.store.extend_holds(ids, self.hold_until())
            # A hold closed elsewhere (an engine hold settled by another process) leaves
            # this process's books: the live set must not grow forever.
            self.live -= set(ids) - still
            pass
        except Exception as exc:  # logged, retried at the next beat
            log.error("credit_guard: hold heartbeat failed: %s", exc, exc_info=exc)

    async def sweep(self, now: datetime | None = None) -> int:
        """Refund every expired hold (not this process's live ones); returns how many.

        Safe to run in many processes at once: each refund is conditional on the hold
        still being open and expired, and the UNIQUE ``refund_of`` backs that up.
        """
        if now is not None and now.tzinfo is None:
            raise ValueError("now must be timezone-aware (the ledger keeps UTC)")
        now = now.astimezone(UTC) if now is not None else utcnow()
        released = 0
        mine = self.live | self._pending
        while True:
            ids = [cid for cid in await self.store.expired_holds(now, self._sweep_limit) if cid not in mine]
            if not ids:
                break
            for charge_id in ids:
                result = await self.store.refund(charge_id, HOLD_EXPIRED_REASON, expired_before=now)
                if result.refunded:
                    released += 1
                    log.warning(
                        "credit_guard: released expired hold %s (%s credits back to %s)",
                        charge_id,
                        result.credits_refunded,
                        result.organization_id,
                    )
                    if self.on_refund is not None:
                        self.on_refund(result, charge_id, HOLD_EXPIRED_REASON)
            if len(ids) < self._sweep_limit:
                break
        if released and self.metrics is not None:
            self.metrics.swept(released)
        await self.store.delete_expired_keys(now)
        if self.also_sweep is not None:
            await self.also_sweep(now)
        return released

    async def close(self) -> None:
        """Stop the task, write what is queued, and forget the loop (``start`` may follow, on any loop)."""
        task, self._task = self._task, None
        if task is not None and self._loop is asyncio.get_running_loop():
            if self._flushing is not None:
                # A batch being written is let finish: on SQLite its writer thread commits it
                # whatever happens here, and the task must know it did.
                async with self._flushing:
                    task.cancel()
            else:
                task.cancel()
            await asyncio.wait([task])  # a cancel aimed at close() itself still propagates
        try:
            await self.flush()
        except StorageUnavailable:
            log.error(
                "credit_guard: could not settle %d holds at shutdown; the sweeper will refund them",
                len(self._pending),
            )
        finally:
            self._loop = self._wake = self._flushing = None
