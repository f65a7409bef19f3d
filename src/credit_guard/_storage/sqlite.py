"""SQLite: one writer per process, committing every write waiting at that moment together.

Why: a SQLite file has one write lock. Pooled aiosqlite connections are each a thread of
their own, and they raced for it through SQLite's busy handler, which sleeps in steps of
up to 100 ms and favours whoever asks last: 32 concurrent charges in ONE process already
logged "database is locked", and 4 workers under 400 connections had a p99 of 15 s.

So every write of a process (charges, refunds, settlements, grants, pricing, schema) is
a function handed to one thread that owns one connection. The thread takes whatever is
queued, opens ONE ``BEGIN IMMEDIATE`` transaction, runs the writes in arrival order,
commits once, and hands each caller its own result. Every charge is still a conditional
UPDATE decided by the database, in arrival order.

Two kinds of writes share a batch:

* the hot ones (a charge, the settlement of holds) are plain ``sqlite3`` calls with fixed
  SQL (``charge.charge_sqlite``, ``settle_raw``): the thread's Python time per charge is
  what caps throughput, since it shares the interpreter with the event loop;
* everything else is a ``writes.py`` body on SQLAlchemy, each in a savepoint of its own.

A write that fails alone (a constraint: a twin refund, a duplicate key) fails only its
caller. If a hot write raises (it should not: the disk, the file), the whole batch is
rolled back, nothing of it committed or answered, and each write is run again in a
transaction of its own, so exactly the ones that fail get the error.

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
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from ..errors import IntegrityViolation, StorageUnavailable
from ..schema import holds
from .base import ChargeOutcome, ChargeRequest, ClaimOutcome, Completion, KeyClaim
from .charge import charge_sqlite, claim_and_charge_sqlite, complete_keys_sqlite
from .engine import setup_sqlite_connection
from .sql import SqlStore, T, Work, unavailable

log = logging.getLogger("credit_guard")
R = TypeVar("R")

#: The most writes one transaction commits (a burst larger than this takes several).
MAX_BATCH = 512
#: SQLite's own busy wait per attempt: short, so this module decides how to wait.
_ATTEMPT_BUSY_MS = 1
#: How long a writer that had to wait for the lock rests after its commit (the others' turn).
_YIELD_AFTER_CONTENTION = 0.002
#: How long past the guard's ``timeout`` a caller waits for an answer the writer owes it,
#: and how often the watchdog looks.
_NO_ANSWER_GRACE = 1.0
_WATCH_EVERY = 0.25

#: Holds closed per statement (well under SQLite's 32,766 bound parameters).
_SETTLE_CHUNK = 500


def is_file_database(url: URL) -> bool:
    """Whether ``url`` names a file another connection (the writer's) can open too."""
    name = url.database or ""
    return url.get_backend_name() == "sqlite" and name not in ("", ":memory:") and "mode=memory" not in name


def settle_raw(db: sqlite3.Connection, charge_ids: Sequence[int], completions: Sequence[Completion] = ()) -> set[int]:
    """Close holds as kept, a few hundred per statement, and finish the keys of idempotent
    requests (their responses stored); the ids that were still held."""
    complete_keys_sqlite(db.execute, completions)
    settled: set[int] = set()
    ids = list(charge_ids)
    for start in range(0, len(ids), _SETTLE_CHUNK):
        chunk = ids[start : start + _SETTLE_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(f"DELETE FROM {holds.name} WHERE charge_id IN ({marks}) RETURNING charge_id", chunk)
        settled |= {int(row[0]) for row in rows}
    return settled


@dataclass(slots=True, eq=False)
class _Job:
    #: A write body on SQLAlchemy (run in a savepoint), or a raw one on ``sqlite3``.
    work: Callable[[Any], Any]
    raw: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    deadline: float
    result: Any = None
    error: BaseException | None = None

    def resolve(self) -> None:
        if self.future.done():  # its caller was cancelled meanwhile
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.result)


def _deliver(jobs: Sequence[_Job]) -> None:
    """Hand every job its answer: one wake-up per event loop, not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in jobs:
        by_loop.setdefault(job.loop, []).append(job)
    for loop, mine in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_all, mine)
        except RuntimeError:  # its loop is closed: nobody is waiting any more
            pass


def _resolve_all(jobs: list[_Job]) -> None:
    for job in jobs:
        job.resolve()


class _RetryAlone(Exception):
    """A raw write failed inside a batch: run each write of it in its own transaction."""


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
        #: Jobs submitted and not answered yet, which the watchdog looks over.
        self._pending: set[_Job] = set()
        self._watchdog: threading.Thread | None = None
        self._closed = threading.Event()
        #: Transactions committed and writes in them, for tests and the benchmark.
        self.batches = 0
        self.writes = 0

    async def submit(self, work: Work[T]) -> T:
        """Run a ``writes.py`` body in the next batch (in a savepoint of its own); its
        result, or its exception, comes back here. A caller cancelled before its turn is
        skipped: its write never runs."""
        return await self._submit(work, raw=False)  # type: ignore[no-any-return]

    async def submit_raw(self, work: Callable[[sqlite3.Connection], R]) -> R:
        """Run a raw ``sqlite3`` write (the hot path) in the next batch."""
        return await self._submit(work, raw=True)  # type: ignore[no-any-return]

    async def _submit(self, work: Callable[[Any], Any], *, raw: bool) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._ensure_thread()
        job = _Job(work, raw, future, loop, time.monotonic() + self._timeout)
        self._pending.add(job)
        self._queue.put(job)
        try:
            return await future
        finally:
            self._pending.discard(job)

    def _ensure_thread(self, *, replacing: threading.Thread | None = None) -> None:
        """Start the writer thread unless one runs (``replacing``: the dying one itself),
        and its watchdog."""
        if self._thread is not None and self._thread is not replacing and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or self._thread is replacing or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="credit_guard-sqlite-writer", daemon=True)
                self._thread.start()
            if self._watchdog is None or not self._watchdog.is_alive():
                self._closed.clear()
                self._watchdog = threading.Thread(target=self._watch, name="credit_guard-sqlite-watchdog", daemon=True)
                self._watchdog.start()

    def _watch(self) -> None:
        """Every wait ends. The writer answers each job by its deadline (a write past it
        fails with StorageUnavailable), and a writer that dies fails its batch and starts
        its successor; this is for what neither foresaw, a writer stuck in a call: a job
        still unanswered ``_NO_ANSWER_GRACE`` after its deadline is answered from here
        (if its write ran after all, a charge is a hold the sweeper gives back). A thread,
        not a timer per write: nothing more on the hot path than a set's add and discard."""
        while not self._closed.wait(_WATCH_EVERY):
            now = time.monotonic()
            overdue = [job for job in list(self._pending) if now > job.deadline + _NO_ANSWER_GRACE]
            if not overdue:
                continue
            log.error("credit_guard: the SQLite writer left %d writes unanswered past the timeout", len(overdue))
            for job in overdue:
                self._pending.discard(job)
                job.error = StorageUnavailable(
                    f"the SQLite writer gave no answer within {self._timeout + _NO_ANSWER_GRACE:.1f}s"
                )
            _deliver(overdue)
            if self._thread is None or not self._thread.is_alive():
                self._ensure_thread()

    async def close(self) -> None:
        """Write what is queued, then stop the thread (the next submit starts a new one)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._thread = None
        self._closed.set()

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        """Write batches until stopped. Whatever escapes a batch (a bug, an exception no
        body catches) fails that batch's callers at once, never leaves them waiting; the
        thread goes on with a new connection, or, for what must end a thread (a
        BaseException), starts its successor first and then ends."""
        conn: Connection | None = None
        batch: list[_Job] = []
        stop = False
        try:
            while not stop:
                batch, stop = self._next_batch()
                if not batch:
                    continue
                try:
                    if conn is None or conn.closed:
                        conn = self._connect(batch)
                    if conn is not None:
                        conn = self._write_batch(conn, batch)
                except Exception as exc:
                    self._fail_unanswered(batch, exc)
                    self._drop(conn)
                    conn = None
                batch = []
        except BaseException as exc:
            self._fail_unanswered(batch, exc)
            if not stop:
                self._ensure_thread(replacing=threading.current_thread())
            raise
        finally:
            self._drop(conn)

    def _fail_unanswered(self, batch: list[_Job], exc: BaseException) -> None:
        log.critical("credit_guard: the SQLite writer failed (%s): its batch is answered as unavailable", exc)
        failure = StorageUnavailable(f"the SQLite writer failed: {type(exc).__name__}: {exc}")
        for job in batch:
            job.error = failure
        _deliver(batch)

    @staticmethod
    def _drop(conn: Connection | None) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _next_batch(self) -> tuple[list[_Job], bool]:
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
        return [job for job in items if not job.future.done()], stop

    def _connect(self, batch: list[_Job]) -> Connection | None:
        try:
            return self.engine.connect()
        except SQLAlchemyError as exc:
            self._fail(batch, unavailable(exc))
            return None

    def _write_batch(self, conn: Connection, batch: list[_Job]) -> Connection:
        """One transaction for the batch; returns the connection to use next (a new one
        after a failure that may have left this one in doubt)."""
        try:
            contended = self._transaction(conn, batch, alone=len(batch) == 1)
        except _RetryAlone:
            contended = False
            for job in batch:  # nothing of the batch was committed: each in its own transaction
                job.result = job.error = None
                try:
                    self._transaction(conn, [job], alone=True)
                except StorageUnavailable as exc:
                    job.error = exc
                except (SQLAlchemyError, sqlite3.Error) as exc:
                    job.error = unavailable(exc)
                    return self._reconnect(conn, batch, job)
        except StorageUnavailable as exc:
            self._fail(batch, exc)
            return conn
        except (SQLAlchemyError, sqlite3.Error) as exc:
            with contextlib.suppress(Exception):
                conn.close()
            self._fail(batch, unavailable(exc))
            return conn
        self.batches += 1
        self.writes += len(batch)
        _deliver(batch)
        if contended:
            time.sleep(_YIELD_AFTER_CONTENTION)
        return conn

    def _reconnect(self, conn: Connection, batch: list[_Job], failed: _Job) -> Connection:
        """The connection failed while writing alone: the rest of the batch fails closed."""
        with contextlib.suppress(Exception):
            conn.close()
        for job in batch[batch.index(failed) + 1 :]:
            job.error = failed.error
        _deliver(batch)
        return conn

    def _transaction(self, conn: Connection, jobs: list[_Job], *, alone: bool) -> bool:
        """Run ``jobs`` in ONE transaction and commit it; whether the lock was contended.

        ``alone``: a single write, which needs no savepoint (its failure rolls back all).
        """
        transaction, contended = self._begin(conn, min(job.deadline for job in jobs))
        db: sqlite3.Connection | None = None
        try:
            for job in jobs:
                if job.future.done():  # its caller gave up (or was answered by the watchdog): nothing runs
                    continue
                if time.monotonic() > job.deadline:
                    job.error = StorageUnavailable("the SQLite write lock was not free within the timeout")
                    continue
                if job.raw:
                    if db is None:
                        db = conn.connection.dbapi_connection  # type: ignore[assignment]
                    try:
                        job.result = job.work(db)
                    except Exception as exc:
                        if not alone:
                            raise _RetryAlone from exc  # find the write that fails, alone
                        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                            raise  # the connection or the file failed
                        job.error = exc  # a constraint, or the write's own bug: its caller's answer
                        transaction.rollback()
                        return contended
                    continue
                try:
                    if alone:
                        job.result = job.work(conn)
                    else:
                        with conn.begin_nested():
                            job.result = job.work(conn)
                except SQLAlchemyError as exc:
                    if not isinstance(exc, IntegrityError):
                        raise  # the connection or the file failed: the whole batch is in doubt
                    job.error = exc  # a business answer: this write alone
                    if alone:
                        transaction.rollback()
                        return contended
                except Exception as exc:  # a write's own refusal (Abandon, PricingNotFound...)
                    job.error = exc
                    if alone:
                        transaction.rollback()
                        return contended
            transaction.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                transaction.rollback()
            raise
        return contended

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

    def _fail(self, batch: list[_Job], exc: StorageUnavailable) -> None:
        for job in batch:
            job.error = exc
        _deliver(batch)


def _configure(engine: Any) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # A short busy timeout: ``_begin`` decides how to wait for the write lock.
        setup_sqlite_connection(dbapi_connection, busy_ms=_ATTEMPT_BUSY_MS)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class SqliteStore(SqlStore):
    """``SqlStore`` whose writes go through this process's one ``SqliteWriter``, the hot
    ones as raw ``sqlite3`` calls."""

    def __init__(self, engine: AsyncEngine, *, owns_engine: bool = True, timeout: float = 5.0) -> None:
        super().__init__(engine, owns_engine=owns_engine)
        self.writer = SqliteWriter(engine.url, timeout=timeout)

    async def _write(self, work: Work[T]) -> T:
        return await self.writer.submit(work)

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        try:
            return await self.writer.submit_raw(lambda db: charge_sqlite(db.execute, request))
        except sqlite3.IntegrityError as exc:
            log.error("credit_guard: SQLite refused a charge (a constraint, not an outage): %s", exc)
            raise IntegrityViolation(str(exc)) from exc
        except sqlite3.Error as exc:
            raise unavailable(exc) from exc

    async def claim_and_charge(self, request: ChargeRequest, claim: KeyClaim) -> ClaimOutcome:
        """A keyed charge on the hot path: raw ``sqlite3`` calls in the writer's batch, like
        a plain charge (``charge.claim_and_charge_sqlite``). The Python API's immediate
        answer (``finish_now``) takes the write body that also stores it."""
        if claim.finish_now:
            return await super().claim_and_charge(request, claim)
        try:
            return await self.writer.submit_raw(lambda db: claim_and_charge_sqlite(db.execute, request, claim))
        except sqlite3.IntegrityError as exc:
            log.error("credit_guard: SQLite refused a keyed charge (a constraint, not an outage): %s", exc)
            raise IntegrityViolation(str(exc)) from exc
        except sqlite3.Error as exc:
            raise unavailable(exc) from exc

    async def settle_holds(self, charge_ids: Sequence[int], completions: Sequence[Completion] = ()) -> set[int]:
        if not charge_ids and not completions:
            return set()
        try:
            return await self.writer.submit_raw(lambda db: settle_raw(db, charge_ids, completions))
        except sqlite3.Error as exc:
            raise unavailable(exc) from exc

    async def close(self) -> None:
        await self.writer.close()
        await super().close()
