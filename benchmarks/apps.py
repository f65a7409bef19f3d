"""The benchmark's variant apps: the same trivial handler, with and without credit logic.

``run.py`` starts each one as ``uvicorn benchmarks.apps:create_app --factory`` with
``BENCH_APP`` naming the variant. Every app has the same two routes (``POST /work`` and
``POST /free``, the same handler), the same org-from-header middleware, and is plain
Starlette, so the only thing that differs between variants is the credit logic:

* ``plain``       no credit logic at all;
* ``limit``       one hand-written asyncpg statement on its own pool: the floor any library pays;
* ``naive``       the seed's pattern ported to SQLAlchemy: read price, read balance, update, insert;
* ``decorator``   ``@requires_credits`` on PostgreSQL;
* ``middleware``  ``CreditGuardMiddleware`` on PostgreSQL (``/free`` is its unguarded route,
  ``/work-keyed`` the same paid route honouring ``Idempotency-Key``);
* ``sqlite``      ``@requires_credits`` on SQLite; ``sqlite_middleware`` the middleware on SQLite;
* ``sqlite_tx``   the SQLite limit done simply: one connection in one thread, a transaction per request;
* ``sqlite_group`` the SQLite limit: one writer thread commits every charge waiting at that
  moment in one transaction (group commit).

The SQLite limits do the library's work per charge by hand (a grant draw, the debit, a ledger
row, a move row, a hold, the hold deleted after the answer), so their ratio is its overhead.

``BENCH_COUNT=1`` adds ``GET /_bench/stats`` with the statements SQLAlchemy ran, for the
SQLite round-trip count (PostgreSQL's are counted on the wire by ``run.py``'s proxy).
"""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import and_, event, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_guard import CreditGuard, CreditGuardMiddleware, Rule, requires_credits
from credit_guard._storage.charge import store_datetime
from credit_guard._storage.postgres import asyncpg_dsn
from credit_guard.problems import HEADER_CHARGED, HEADER_REMAINING
from credit_guard.schema import accounts, feature_pricing, grant_moves, grants, holds, ledger

FEATURE = "bench_feature"
ORG_HEADER = b"x-org"
POOL_SIZE = 10  # the same for every hand-written variant that has a pool
#: credit_guard at its default budget (12 per process: 9 asyncpg, 2 SQLAlchemy, 1 listener).
MAX_CONNECTIONS = int(os.environ.get("BENCH_MAX_CONNECTIONS", "12"))

Handler = Callable[[Request], Awaitable[Response]]


class OrgFromHeader:
    """Puts the ``X-Org`` header on request state, as an app's auth middleware would.

    Every variant has it (even ``plain``), so its cost is in every number alike.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == ORG_HEADER:
                    scope.setdefault("state", {})["organization_id"] = value.decode()
                    break
        await self.app(scope, receive, send)


async def work(request: Request) -> Response:
    return PlainTextResponse("ok")


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def _app(handler: Handler, *, lifespan: Any = None, extra: list[Route] | None = None) -> Starlette:
    routes = [
        Route("/work", handler, methods=["POST"]),
        Route("/free", work, methods=["POST"]),
        Route("/health", health),
        *(extra or []),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _org(request: Request) -> str | None:
    org = request.scope.get("state", {}).get("organization_id")
    return str(org) if org else None


#: The hand-written comparators (the limits, the naive port) keep no grants: they charge
#: accounts of their own, so the library's accounts stay exact under ``audit()``.
HAND_WRITTEN_PREFIX = "limit-"


def _hand_written_org(request: Request) -> str | None:
    org = _org(request)
    return HAND_WRITTEN_PREFIX + org if org else None


def _payment_required(available: int) -> Response:
    return JSONResponse({"detail": "insufficient credits", "available": available}, status_code=402)


# -- 2. the limit: one statement, own pool --------------------------------------------------

LIMIT_SQL = f"""
WITH debit AS (
    UPDATE {accounts.name} SET balance = balance - $2::bigint, updated_at = now()
     WHERE organization_id = $1 AND balance >= $2::bigint
 RETURNING balance
)
INSERT INTO {ledger.name}
       (organization_id, kind, amount, balance_after, feature_key, user_id, request_method, request_path)
SELECT $1, 'charge', -$2::bigint, balance, $3, $4, $5, $6 FROM debit
RETURNING id, balance_after
"""
LIMIT_PRICE = 1  # a perfect library knows the price without asking (a warm cache)


async def _no_reset(conn: Any) -> None:
    """The statement leaves no session state behind, so the pool's reset query
    (``RESET ALL; UNLISTEN *; ...``, one more round trip per release) is not needed."""


def limit_app(pg_url: str) -> ASGIApp:
    pool: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool["pg"] = await asyncpg.create_pool(asyncpg_dsn(pg_url), min_size=1, max_size=POOL_SIZE, reset=_no_reset)
        yield
        await pool["pg"].close()

    async def charged(request: Request) -> Response:
        org = _hand_written_org(request)
        if org is None:
            return PlainTextResponse("no organization", status_code=401)
        async with pool["pg"].acquire() as conn:
            row = await conn.fetchrow(LIMIT_SQL, org, LIMIT_PRICE, FEATURE, None, request.method, request.url.path)
        if row is None:
            return _payment_required(0)
        return PlainTextResponse(
            "ok", headers={HEADER_CHARGED: str(LIMIT_PRICE), HEADER_REMAINING: str(row["balance_after"])}
        )

    return OrgFromHeader(_app(charged, lifespan=lifespan))


# -- 3. the naive port: the seed's deductCredits in SQLAlchemy, no cache ---------------------


def naive_app(pg_url: str) -> ASGIApp:
    engine: AsyncEngine = create_async_engine(pg_url, pool_size=POOL_SIZE, max_overflow=0)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    async def charged(request: Request) -> Response:
        org = _hand_written_org(request)
        if org is None:
            return PlainTextResponse("no organization", status_code=401)
        async with engine.begin() as conn:
            price = await conn.scalar(
                select(feature_pricing.c.credits).where(
                    and_(feature_pricing.c.feature_key == FEATURE, feature_pricing.c.is_active.is_(True))
                )
            )
            if price is None:
                return PlainTextResponse("feature not found", status_code=404)
            balance = await conn.scalar(select(accounts.c.balance).where(accounts.c.organization_id == org))
            if balance is None or balance < price:
                return _payment_required(int(balance or 0))
            remaining = await conn.scalar(
                update(accounts)
                .where(accounts.c.organization_id == org)
                .values(balance=accounts.c.balance - price)
                .returning(accounts.c.balance)
            )
            await conn.execute(
                insert(ledger).values(
                    organization_id=org,
                    kind="charge",
                    amount=-price,
                    balance_after=remaining,
                    feature_key=FEATURE,
                    request_method=request.method,
                    request_path=request.url.path,
                )
            )
        return PlainTextResponse("ok", headers={HEADER_CHARGED: str(price), HEADER_REMAINING: str(remaining)})

    return OrgFromHeader(_app(charged, lifespan=lifespan))


# -- 10, 11. the SQLite limits: the same work per charge, hand-written on sqlite3 -------------
#
# What credit_guard writes for a charge, written the simplest correct way: draw the cost from
# the account's first live grant with room (spending order: priority, then soonest expiry),
# debit the account, write the ledger row, the grant's move row and the hold; the holds of
# answered requests are deleted later, batched (as the library settles them). The ratio
# against this measures the library's overhead, not a difference in work.

SQLITE_DRAW = (
    f"UPDATE {grants.name} SET remaining = remaining - :cost WHERE id = ("
    f"SELECT id FROM {grants.name} WHERE organization_id = :org AND remaining >= :cost"
    " AND (expires_at IS NULL OR expires_at > :now) ORDER BY priority, expires_at IS NULL, expires_at, id LIMIT 1)"
    " RETURNING id"
)
SQLITE_DEBIT = (
    f"UPDATE {accounts.name} SET balance = balance - :cost, updated_at = :now"
    " WHERE organization_id = :org RETURNING balance"
)
SQLITE_ENTRY = (
    f"INSERT INTO {ledger.name} (organization_id, kind, amount, balance_after, feature_key, request_method,"
    " request_path, created_at) VALUES (:org, 'charge', -:cost, :balance, :feature, :method, :path, :now)"
)
SQLITE_MOVE = f"INSERT INTO {grant_moves.name} (ledger_id, grant_id, amount) VALUES (:lid, :grant, -:cost)"
SQLITE_HOLD = f"INSERT INTO {holds.name} (charge_id, expires_at) VALUES (:lid, :until)"
SQLITE_SETTLE = f"DELETE FROM {holds.name} WHERE charge_id = ?"
#: Statements per charge: a refusal runs only the draw.
SQLITE_CHARGE_STATEMENTS = 5


def _sqlite_connect(url: str) -> sqlite3.Connection:
    conn = sqlite3.connect(make_url(url).database or "", isolation_level=None, check_same_thread=False, timeout=5)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _sqlite_charge(conn: sqlite3.Connection, org: str, method: str, path: str) -> tuple[int, int] | None:
    """The charge without its transaction: (ledger id, balance after), or None if refused."""
    now = datetime.now(UTC)
    draw = conn.execute(SQLITE_DRAW, {"cost": LIMIT_PRICE, "org": org, "now": store_datetime(now)}).fetchone()
    if draw is None:
        return None
    params = {"cost": LIMIT_PRICE, "org": org, "now": store_datetime(now), "method": method, "path": path}
    (balance,) = conn.execute(SQLITE_DEBIT, params).fetchone()
    lid = conn.execute(SQLITE_ENTRY, {**params, "balance": balance, "feature": FEATURE}).lastrowid
    conn.execute(SQLITE_MOVE, {"lid": lid, "grant": draw[0], "cost": LIMIT_PRICE})
    conn.execute(SQLITE_HOLD, {"lid": lid, "until": store_datetime(now + timedelta(minutes=5))})
    return int(lid or 0), int(balance)


def _charged_answer(charged: tuple[int, int] | None) -> Response:
    if charged is None:
        return _payment_required(0)
    return PlainTextResponse("ok", headers={HEADER_CHARGED: str(LIMIT_PRICE), HEADER_REMAINING: str(charged[1])})


def _stats_route(counts: dict[str, int]) -> Route:
    async def stats(request: Request) -> Response:
        return JSONResponse(counts)

    return Route("/_bench/stats", stats)


def sqlite_tx_app(url: str) -> ASGIApp:
    """One connection owned by one thread; every request is its own BEGIN IMMEDIATE ... COMMIT,
    and so is the deletion of its hold after the answer (nothing batched: done simply)."""
    executor = ThreadPoolExecutor(max_workers=1)
    conn = _sqlite_connect(url)
    counts = {"statements": 0}

    def charge(org: str, method: str, path: str) -> tuple[int, int] | None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            charged = _sqlite_charge(conn, org, method, path)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        counts["statements"] += 2 + (SQLITE_CHARGE_STATEMENTS if charged else 1)
        return charged

    def settle(lid: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(SQLITE_SETTLE, (lid,))
        conn.execute("COMMIT")
        counts["statements"] += 3

    async def charged(request: Request) -> Response:
        org = _hand_written_org(request)
        if org is None:
            return PlainTextResponse("no organization", status_code=401)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(executor, charge, org, request.method, request.url.path)
        if result is not None:
            loop.run_in_executor(executor, settle, result[0])  # after the answer; nobody waits for it
        return _charged_answer(result)

    return OrgFromHeader(_app(charged, extra=[_stats_route(counts)]))


def sqlite_group_app(url: str) -> ASGIApp:
    """One writer thread: it takes every charge waiting at that moment and commits them in
    ONE transaction, each still a conditional draw, each answer delivered to its request;
    the holds of answered requests are deleted in the same kind of batch."""
    Job = tuple[str, str, str, asyncio.Future[tuple[int, int] | None], asyncio.AbstractEventLoop] | int
    jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
    conn = _sqlite_connect(url)
    counts = {"statements": 0}

    def writer() -> None:
        while True:
            batch = [jobs.get()]
            while True:
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            conn.execute("BEGIN IMMEDIATE")
            settled = [(job,) for job in batch if isinstance(job, int)]
            if settled:
                conn.executemany(SQLITE_SETTLE, settled)
            charges = [job for job in batch if not isinstance(job, int)]
            results = [_sqlite_charge(conn, org, method, path) for org, method, path, _, _ in charges]
            conn.execute("COMMIT")
            counts["statements"] += 2 + len(settled)
            counts["statements"] += sum(SQLITE_CHARGE_STATEMENTS if result else 1 for result in results)
            for (_, _, _, future, loop), result in zip(charges, results, strict=True):
                loop.call_soon_threadsafe(future.set_result, result)

    threading.Thread(target=writer, daemon=True).start()

    async def charged(request: Request) -> Response:
        org = _hand_written_org(request)
        if org is None:
            return PlainTextResponse("no organization", status_code=401)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int] | None] = loop.create_future()
        jobs.put((org, request.method, request.url.path, future, loop))
        result = await future
        response = _charged_answer(result)
        if result is not None:
            jobs.put(result[0])  # settle the hold, batched with whatever comes next
        return response

    return OrgFromHeader(_app(charged, extra=[_stats_route(counts)]))


# -- 4, 5, 6, 12. credit_guard ------------------------------------------------------------


def _guard_lifespan(guard: CreditGuard) -> Any:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with guard:  # started here, on the serving loop; closed (queue written) at shutdown
            app.state.credit_guard = guard
            yield

    return lifespan


def _statement_counter(guard: CreditGuard) -> Route:
    """Counts what SQLAlchemy sends (statements, commits, rollbacks): SQLite has no wire."""
    counts = {"statements": 0}

    def count(*_: Any, **__: Any) -> None:
        counts["statements"] += 1

    sync_engine = guard.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", count)
    event.listen(sync_engine, "commit", count)
    event.listen(sync_engine, "rollback", count)
    writer = getattr(guard.store, "writer", None)
    if writer is not None:
        # SQLite's one writer runs raw sqlite3 calls too: count what SQLite itself executes.
        def trace(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.set_trace_callback(count)

        event.listen(writer.engine, "connect", trace)

    async def stats(request: Request) -> Response:
        return JSONResponse(counts)

    return Route("/_bench/stats", stats)


def decorator_app(database_url: str, *, count: bool = False) -> ASGIApp:
    guard = CreditGuard(database_url, max_connections=MAX_CONNECTIONS)

    @requires_credits(FEATURE, guard=guard)
    async def charged(request: Request) -> Response:
        return PlainTextResponse("ok")

    extra = [_statement_counter(guard)] if count else []
    return OrgFromHeader(_app(charged, lifespan=_guard_lifespan(guard), extra=extra))


def middleware_app(database_url: str, *, count: bool = False) -> ASGIApp:
    guard = CreditGuard(database_url, max_connections=MAX_CONNECTIONS)
    keyed = Route("/work-keyed", work, methods=["POST"])
    extra = [keyed, _statement_counter(guard)] if count else [keyed]
    inner = _app(work, lifespan=_guard_lifespan(guard), extra=extra)
    rules: dict[str, str | Rule] = {"POST /work": FEATURE, "POST /work-keyed": Rule(FEATURE, idempotency=True)}
    return OrgFromHeader(CreditGuardMiddleware(inner, guard=guard, rules=rules))


def plain_app() -> ASGIApp:
    return OrgFromHeader(_app(work))


def create_app() -> ASGIApp:
    """The uvicorn factory: ``BENCH_APP`` names the variant, ``BENCH_PG_URL`` /
    ``BENCH_SQLITE_URL`` the databases ``run.py`` prepared."""
    name = os.environ["BENCH_APP"]
    pg_url = os.environ.get("BENCH_PG_URL", "")
    if os.environ.get("BENCH_GC_THRESHOLD"):
        # ``run.py --gc-threshold N``: every variant alike (see docs/benchmarks.md, "Python's GC").
        gc.set_threshold(int(os.environ["BENCH_GC_THRESHOLD"]))
    if name == "plain":
        return plain_app()
    if name == "limit":
        return limit_app(pg_url)
    if name == "naive":
        return naive_app(pg_url)
    if name == "decorator":
        return decorator_app(pg_url)
    if name in ("middleware", "passthrough"):
        return middleware_app(pg_url)
    sqlite_url = os.environ.get("BENCH_SQLITE_URL", "")
    if name == "sqlite":
        return decorator_app(sqlite_url, count=os.environ.get("BENCH_COUNT") == "1")
    if name == "sqlite_middleware":
        return middleware_app(sqlite_url, count=os.environ.get("BENCH_COUNT") == "1")
    if name == "sqlite_tx":
        return sqlite_tx_app(sqlite_url)
    if name == "sqlite_group":
        return sqlite_group_app(sqlite_url)
    raise SystemExit(f"unknown BENCH_APP {name!r}")
