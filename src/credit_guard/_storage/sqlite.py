"""SQLite: one writer per process, committing every write waiting at that moment together.

Why: a SQLite file has one write lock. Pooled aiosqlite connections are each a thread of
their own, and they raced for it through SQLite's busy handler, which sleeps in steps of
up to 100 ms and favours whoever asks last: 32 concurrent charges in ONE process already
logged "database is locked", and 4 workers under 400 connections had a p99 of 15 s.

So every write of a process (charges, refunds, settlements, grants, pricing, schema) is
a function handed to one thread that owns one connection. The thread takes whatever is
queued, opens ONE ``BEGIN IMMEDIATE`` transaction, runs each write in a savepoint of its
own (a failing one rolls back alone), commits once, and hands each caller its own result.
Every charge is still a conditional UPDATE decided by the database, in arrival order.

Across processes there is one lock contender per process. Waiting for it is bounded by
the guard's ``timeout`` (then the waiting writes fail with StorageUnavailable: a 503,
nothing written), polled every millisecond or so rather than SQLite's coarse steps, and
a writer that had to wait pauses briefly after its commit so the others get their turn.

Reads need no lock in WAL mode: they stay on the async engine's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from ..errors import StorageUnavailable
from .sql import SqlStore, T, Work, unavailable

log = logging.getLogger("credit_guard")
R = TypeVar("R")

#: The most writes one transaction commits (a burst larger than this takes several).
MAX_BATCH = 512
#: SQLite's own busy wait per attempt: short, so this module decides how to wait.
_ATTEMPT_BUSY_MS = 1
#: How long a writer that had to wait for the lock rests after its commit (the others' turn).
_YIELD_AFTER_CONTENTION = 0.002


def is_file_database(url: URL) -> bool:
    """Whether ``url`` names a file another connection (the writer's) can open too."""
    name = url.database or ""
    return url.get_backend_name() == "sqlite" and name not in ("", ":memory:") and "mode=memory" not in name


@dataclass(slots=True)
class _Job(Generic[R]):
    work: Callable[[Connection], R]
    future: asyncio.Future[R]
    loop: asyncio.AbstractEventLoop
    deadline: float
    result: Any = None
    error: BaseException | None = None
    done: bool = field(default=False)

    def deliver(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # its loop is closed: nobody is waiting any more
            pass

    def _resolve(self) -> None:
        if self.future.done():  # cancelled meanwhile
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)


_STOP = object()


class SqliteWriter:
    """The thread and the connection that write for this process (see the module's docstring)."""

    def __init__(self, url: URL, *, timeout: float) -> None:
        self._timeout = timeout
        #: The writer's own (sync) engine: one connection, used by the thread alone.
        self.engine = create_engine(url.set(drivername="sqlite"), poolclass=NullPool)
        _configure(self.engine)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Transactions committed and writes in them, for tests and the benchmark.
        self.batches = 0
        self.writes = 0

    async def submit(self, work: Work[T]) -> T:
        """Run ``work`` in the next batch; its result, or its exception, comes back here.

        A caller cancelled before its turn is skipped: its write never runs.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._ensure_thread()
        self._queue.put(_Job(work, future, loop, time.monotonic() + self._timeout))
        return await future

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="credit_guard-sqlite-writer", daemon=True)
                self._thread.start()

    async def close(self) -> None:
        """Write what is queued, then stop the thread (the next submit starts a new one)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._thread = None

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        conn: Connection | None = None
        try:
            while True:
                batch, stop = self._next_batch()
                if batch:
                    if conn is None or conn.closed:
                        conn = self._connect(batch)
                    if conn is not None:
                        conn = self._write_batch(conn, batch)
                if stop:
                    return
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _next_batch(self) -> tuple[list[_Job[Any]], bool]:
        """Everything queued now (waiting for the first), without cancelled callers."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        items = [first]
        stop = False
        while len(items) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            items.append(item)
        return [job for job in items if not job.future.cancelled()], stop

    def _connect(self, batch: list[_Job[Any]]) -> Connection | None:
        try:
            return self.engine.connect()
        except SQLAlchemyError as exc:
            self._fail(batch, unavailable(exc))
            return None

    def _write_batch(self, conn: Connection, batch: list[_Job[Any]]) -> Connection:
        """One transaction for the batch; returns the connection to use next (a new one
        after a failure that may have left this one in doubt)."""
        contended = False
        try:
            transaction, contended = self._begin(conn, min(job.deadline for job in batch))
        except StorageUnavailable as exc:
            self._fail(batch, exc)
            return conn
        try:
            single = len(batch) == 1
            for job in batch:
                if job.future.cancelled():  # its caller gave up before its turn: nothing runs
                    continue
                if time.monotonic() > job.deadline:
                    job.error = StorageUnavailable("the SQLite write lock was not free within the timeout")
                    continue
                try:
                    if single:
                        job.result = job.work(conn)
                    else:
                        with conn.begin_nested():
                            job.result = job.work(conn)
                except (IntegrityError, StorageUnavailable) as exc:
                    job.error = exc  # a business answer (or its own verdict): this write alone
                    if single:
                        transaction.rollback()
                        break
                except SQLAlchemyError:
                    raise  # the connection or the file failed: the whole batch is in doubt
                except Exception as exc:  # a write's own refusal (Abandon, PricingNotFound...)
                    job.error = exc
                    if single:
                        transaction.rollback()
                        break
            if transaction.is_active:
                transaction.commit()
        except SQLAlchemyError as exc:
            with contextlib.suppress(Exception):
                conn.close()
            self._fail(batch, unavailable(exc))
            return conn
        self.batches += 1
        self.writes += len(batch)
        for job in batch:
            job.deliver()
        if contended:
            time.sleep(_YIELD_AFTER_CONTENTION)
        return conn

    def _begin(self, conn: Connection, deadline: float) -> tuple[Any, bool]:
        """``BEGIN IMMEDIATE``, retried about every millisecond until ``deadline``."""
        attempts = 0
        while True:
            try:
                return conn.begin(), attempts > 0
            except OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise unavailable(exc) from exc
                attempts += 1
                if time.monotonic() > deadline:
                    raise unavailable(exc) from exc
                time.sleep(random.uniform(0.0002, 0.0012))

    def _fail(self, batch: list[_Job[Any]], exc: StorageUnavailable) -> None:
        for job in batch:
            job.error = exc
            job.deliver()


def _configure(engine: Any) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event decides
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_ATTEMPT_BUSY_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class SqliteStore(SqlStore):
    """``SqlStore`` whose writes go through this process's one ``SqliteWriter``."""

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = True, timeout: float = 5.0) -> None:
        super().__init__(engine, owns_engine=owns_engine)
        self.writer = SqliteWriter(engine.url, timeout=timeout)

    async def _write(self, work: Work[T]) -> T:
        return await self.writer.submit(work)

    async def close(self) -> None:
        await self.writer.close()
        await super().close()
