"""Runs the app's hooks for events, off the request path, each call bounded in time.

Hooks feed metrics, e-mails and webhooks: slow and fallible work that must never slow or
break the paid request that triggered it. So an event is put on a bounded queue without
waiting, and a few worker tasks run the hooks, each call bounded by ``hook_timeout``. A
hook that raises or hangs is logged and forgotten; when the queue is full (hooks far
slower than traffic) the event is dropped and logged, never waited for.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

from .events import Event, H, Hook

log = logging.getLogger("credit_guard")


class HookDispatcher:
    """Runs hooks for events, off the request path, each call bounded in time."""

    def __init__(self, *, timeout: float = 5.0, queue_size: int = 10_000, workers: int = 4) -> None:
        self.timeout = timeout
        self._hooks: dict[type, list[Hook]] = {}
        self._queue_size = queue_size
        # Loop-bound, so made by start() (or the first event) on the loop that runs them and
        # dropped by close(): a guard restarted on a new event loop gets fresh ones.
        self._queue: asyncio.Queue[tuple[Hook, Event]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers_wanted = workers
        self._workers: list[asyncio.Task[None]] = []
        self.dropped = 0

    def add(self, event_type: type, hook: H) -> H:
        if not (inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(type(hook).__call__)):
            raise TypeError(f"credit_guard hooks must be async functions, got {hook!r}")
        self._hooks.setdefault(event_type, []).append(hook)
        return hook

    def wants(self, event_type: type) -> bool:
        """Whether any hook listens: lets the hot path skip building events nobody reads."""
        return event_type in self._hooks

    def emit(self, event: Event) -> None:
        """Queue the event for its hooks; never waits, never raises."""
        hooks = self._hooks.get(type(event))
        if not hooks:
            return
        queue = self.start()
        if queue is None:  # emitted outside an event loop: nothing can run the hooks
            return
        for hook in hooks:
            try:
                queue.put_nowait((hook, event))
            except asyncio.QueueFull:
                self.dropped += 1
                log.warning("credit_guard: hook queue full, dropped %s for %r", type(event).__name__, hook)

    def start(self) -> asyncio.Queue[tuple[Hook, Event]] | None:
        """The queue of the running loop, made (with its workers) on first use on that loop.

        A queue and workers left from another loop (a test client's, closed without
        ``close()``) are dropped: their loop can no longer run them.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if self._loop is not loop or self._queue is None:
            self._loop = loop
            self._queue = asyncio.Queue(maxsize=self._queue_size)
            self._workers = []
        if not self._workers and self._hooks:
            queue = self._queue
            self._workers = [loop.create_task(self._work(queue)) for _ in range(self._workers_wanted)]
        return self._queue

    async def _work(self, queue: asyncio.Queue[tuple[Hook, Event]]) -> None:
        while True:
            hook, event = await queue.get()
            try:
                async with asyncio.timeout(self.timeout):
                    await hook(event)
            except TimeoutError:
                log.error("credit_guard: hook %r took over %ss on %r; abandoned", hook, self.timeout, event)
            except Exception as exc:
                log.error("credit_guard: hook %r failed on %r: %s", hook, event, exc, exc_info=exc)
            finally:
                queue.task_done()

    def _mine(self) -> bool:
        """Whether the queue and workers belong to the running loop (else they are not ours to await)."""
        try:
            return self._loop is asyncio.get_running_loop()
        except RuntimeError:
            return False

    async def drain(self) -> None:
        """Wait until every queued hook call has run (tests, graceful shutdown); bounded
        by twice ``hook_timeout``, after which what is left is logged, not waited for."""
        queue = self._queue
        if not self._workers or queue is None or not self._mine():
            return
        try:
            async with asyncio.timeout(self.timeout * 2):
                await queue.join()
        except TimeoutError:
            log.warning("credit_guard: %d hook calls still queued after waiting", queue.qsize())

    async def close(self) -> None:
        """Run what is queued (bounded), stop the workers, and forget the loop: the next
        start, on this loop or another, begins afresh."""
        await self.drain()
        workers, self._workers = self._workers, []
        mine = self._mine()
        self._queue = self._loop = None
        if not mine:
            return
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.wait(workers)
