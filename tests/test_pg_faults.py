"""PostgreSQL faults under load: killed backends and a server restart lose no credit.

test_outage.py pulls the plug on one request at a time through a TCP proxy. These tests
hit PostgreSQL itself while many paid requests are in flight:

* ``pg_terminate_backend`` on every connection the guard holds, over and over, so
  deductions and refunds die mid-statement (the shared test server; only connections
  carrying this module's ``application_name`` are killed, never another test's);
* ``pg_ctl stop`` and ``start`` of a throwaway cluster (tests/pg_cluster.py), because
  stopping the shared server would break every other test.

Afterwards each response is checked against the ledger, request by request (every
request has its own path, and the ledger records the path of each charge and refund):
a 200 was charged and kept, a 500 was refunded exactly once, a 402 charged nothing, a
503 refunded nothing, and no answer is anything else (an error escaping the guard shows
up as a plain 500 with nothing charged, and fails the test). Two outcomes are allowed and
counted, because the library documents them:

* a connection that dies after the deduction committed but before its answer arrived
  gives a 503 while the charge stands (the ledger balances; the client was told
  "unavailable", never "free");
* a refund that still fails after the guard's retries leaves a 500 that says
  ``X-Credits-Charged``; the guard logs ``REFUND FAILED for charge N``, and the test then
  does what that line asks (``refund_credits(N)``), which must still refund it.

Finally ``audit()`` is clean and each balance is its grant minus what the responses kept.

PostgreSQL only, by design: when PostgreSQL is required (CI) and missing, this fails.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from credit_guard import CreditGuard, CreditGuardMiddleware
from credit_guard._storage.engine import build_engine
from credit_guard._storage.postgres import asyncpg_dsn
from credit_guard.problems import HEADER_CHARGED, HEADER_REFUNDED, HEADER_REMAINING, PROBLEM_CONTENT_TYPE

from .conftest import PG_URL, PRICES, REQUIRE_PG, ledger_rows, pg_problem, reset_postgres, seed_prices
from .helpers import client
from .pg_cluster import Cluster, ClusterUnavailable

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.slow]

IMAGE = "seedream_text_to_image"
PRICE = PRICES[IMAGE][2]
#: Short, so a dead database answers 503 within a second instead of hanging a request.
TIMEOUT = 1.0
RETRY_AFTER = 1
#: Set on every connection of the guard under test: the killer's WHERE clause.
APP_NAME = "credit_guard_fault_test"
#: Any hang in the library becomes a failure after this long, not a stuck test run.
HANG_LIMIT = 60.0

KILL_SQL = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
  FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = $1
"""


# -- the app: one route that succeeds, two that fail after being charged -------------------


async def ok(request: Request) -> JSONResponse:
    return JSONResponse({"n": request.path_params["n"]})


async def fails(request: Request) -> JSONResponse:
    return JSONResponse({"error": "model failed"}, status_code=500)


async def crashes(request: Request) -> JSONResponse:
    raise RuntimeError("model crashed")


RULES = {"POST /v1/ok/{n}": IMAGE, "POST /v1/fail/{n}": IMAGE, "POST /v1/crash/{n}": IMAGE}


def org_header(request: Request) -> str | None:
    return request.headers.get("x-org")


def build_app(guard: CreditGuard) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/ok/{n}", ok, methods=["POST"]),
            Route("/v1/fail/{n}", fails, methods=["POST"]),
            Route("/v1/crash/{n}", crashes, methods=["POST"]),
        ]
    )
    app.add_middleware(CreditGuardMiddleware, guard=guard, rules=RULES)
    return app


# -- what each request got, and the ledger's account of it ---------------------------------


@dataclass
class Outcome:
    """One request: its unique path (the key into the ledger), who paid, what came back."""

    path: str
    org: str
    status: int
    headers: httpx.Headers
    body: bytes
    #: The fault phase when the request was sent and when its answer arrived (test 2).
    phase_sent: int = 0
    phase_answered: int = 0


class Load:
    """Workers sending paid requests, each to a path of its own, until told to stop."""

    def __init__(self, http: httpx.AsyncClient, pick: Callable[[int], tuple[str, str]]) -> None:
        self.http = http
        self.pick = pick  # request number -> (route, organization)
        self.outcomes: list[Outcome] = []
        self.phase = 0
        self.stop = anyio.Event()
        self._next = 0

    def count(self, status: int, *, sent_in: int | None = None) -> int:
        return sum(1 for o in self.outcomes if o.status == status and sent_in in (None, o.phase_sent))

    async def worker(self, pause: float = 0.0) -> None:
        while not self.stop.is_set():
            n, self._next = self._next, self._next + 1
            route, org = self.pick(n)
            path = f"/v1/{route}/{n}"
            phase_sent = self.phase
            r = await self.http.post(path, headers={"x-org": org})
            self.outcomes.append(Outcome(path, org, r.status_code, r.headers, r.content, phase_sent, self.phase))
            await anyio.sleep(pause)  # 0 still yields, so the other tasks get their turn


async def until(check: Callable[[], bool], *, within: float, what: str) -> None:
    """Poll ``check``; fail (not hang) if it does not hold ``within`` seconds."""
    with anyio.move_on_after(within):
        while True:
            if check():
                return
            await anyio.sleep(0.01)
    pytest.fail(f"gave up after {within}s waiting for {what}")


def is_unavailable_problem(o: Outcome) -> bool:
    return (
        o.headers.get("content-type") == PROBLEM_CONTENT_TYPE
        and o.headers.get("retry-after") == str(RETRY_AFTER)
        and b"credits-unavailable" in o.body
    )


@dataclass
class Books:
    """What reconciling the responses with the ledger found."""

    statuses: Counter[int] = field(default_factory=Counter)
    #: 503s whose deduction committed although its answer was lost (the known gap).
    charged_503: list[Outcome] = field(default_factory=list)
    #: 500s whose refund could not be written: the response says charged, the guard logs
    #: the charge id for a manual refund. (charge id, outcome)
    unrefunded_500: list[tuple[int, Outcome]] = field(default_factory=list)
    #: 500s refunded by the guard itself.
    refunded_500: int = 0
    #: Per organization, how many charges stand for good: 200s and the charged 503s.
    kept: Counter[str] = field(default_factory=Counter)
    #: Every response the ledger contradicts, or that no rule allows; must end up empty.
    wrong: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{sum(self.statuses.values())} requests {dict(sorted(self.statuses.items()))};"
            f" 503 with the charge standing: {len(self.charged_503)};"
            f" 500 refunded: {self.refunded_500}, refund not written: {len(self.unrefunded_500)}"
        )


def reconcile(outcomes: list[Outcome], rows: list[dict[str, Any]]) -> Books:
    """Check every response against the ledger rows of its path.

    Collects every contradiction (rather than stopping at the first) so a failure shows
    how often and in which ways the guard went wrong.
    """
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] != "grant":
            by_path.setdefault(str(row["request_path"]), []).append(row)
    paths = {o.path for o in outcomes}
    assert len(paths) == len(outcomes)
    books = Books()
    books.wrong += [f"ledger rows for a request nobody sent: {by_path[p]}" for p in set(by_path) - paths]
    refunds_per_charge = Counter(row["refund_of"] for row in rows if row["kind"] == "refund")
    books.wrong += [f"charge {charge} refunded {n} times" for charge, n in refunds_per_charge.items() if n > 1]

    for o in outcomes:
        books.statuses[o.status] += 1
        entries = by_path.get(o.path, [])
        charges = [row for row in entries if row["kind"] == "charge"]
        refunds = [row for row in entries if row["kind"] == "refund"]
        where = f"{o.path} answered {o.status} {dict(o.headers)} {o.body[:160]!r}; ledger {entries}"
        if len(charges) > 1:
            books.wrong.append(f"charged twice: {where}")
        elif o.status == 200:
            # Never free: the response says what it cost, and the ledger kept exactly that.
            charge = charges[0] if charges else None
            if (
                charge is None
                or refunds
                # Settled, not left as an open hold the sweeper would refund (if the
                # schema has holds): a delivered request must stay paid for.
                or charge.get("hold_expires_at") is not None
                or o.headers.get(HEADER_CHARGED) != str(PRICE)
                or o.headers.get(HEADER_REMAINING) != str(charge["balance_after"])
            ):
                books.wrong.append(f"200 not charged as it says: {where}")
            else:
                books.kept[o.org] += 1
        elif o.status == 402:
            if entries or b"insufficient-credits" not in o.body:
                books.wrong.append(f"402 that charged or is not insufficient-credits: {where}")
        elif o.status == 500 and not charges:
            books.wrong.append(f"500 with nothing charged (an error escaped the guard instead of a 503): {where}")
        elif o.status == 500 and refunds:
            [charge], [refund] = charges, refunds
            if (refund["refund_of"], refund["amount"]) != (charge["id"], PRICE):
                books.wrong.append(f"refund does not mirror its charge: {where}")
            # A returned 500 (not a raised one) carries the refund in its headers.
            elif o.path.startswith("/v1/fail/") and o.headers.get(HEADER_REFUNDED) != str(PRICE):
                books.wrong.append(f"500 refunded but its headers do not say so: {where}")
            else:
                books.refunded_500 += 1
        elif o.status == 500:
            # The refund failed even after the guard's retries; a returned 500 must then
            # say it was charged, never claim a refund.
            if o.path.startswith("/v1/fail/") and (
                o.headers.get(HEADER_CHARGED) != str(PRICE) or HEADER_REFUNDED in o.headers
            ):
                books.wrong.append(f"500 unrefunded but its headers say otherwise: {where}")
            books.unrefunded_500.append((int(charges[0]["id"]), o))
        elif o.status == 503:
            if refunds or not is_unavailable_problem(o):
                books.wrong.append(f"503 that refunded, or not a credits-unavailable problem: {where}")
            elif charges:
                books.charged_503.append(o)
                books.kept[o.org] += 1
        else:
            books.wrong.append(f"unexpected status: {where}")
    return books


def assert_right(books: Books) -> None:
    kinds = Counter(w.split(":", 1)[0] for w in books.wrong)
    assert not books.wrong, f"{len(books.wrong)} wrong answers {dict(kinds)}; {books.summary()}; first:\n" + "\n".join(
        books.wrong[:5]
    )


async def refund_what_the_log_says(guard: CreditGuard, books: Books, caplog: pytest.LogCaptureFixture) -> None:
    """A 500 whose refund could not be written must be in the log with its charge id, and
    the manual refund the log asks for must still refund it (so nobody refunded it yet)."""
    failed = " ".join(r.getMessage() for r in caplog.records if "REFUND FAILED" in r.getMessage())
    for charge_id, o in books.unrefunded_500:
        assert f"REFUND FAILED for charge {charge_id} " in failed, o
        assert (await guard.refund_credits(charge_id)).refunded, o


async def assert_books_balance(guard: CreditGuard, grants: Mapping[str, int], books: Books) -> None:
    """audit() finds nothing, and each balance is its grant minus what the responses kept."""
    assert await guard.audit() == []
    for org, amount in grants.items():
        assert await guard.get_balance(org) == amount - PRICE * books.kept[org], org


# -- 1. pg_terminate_backend on the guard's connections, over and over ---------------------


@pytest.fixture
def pg_url() -> str:
    """The shared PostgreSQL, or a skip with the reason (a failure when it is required)."""
    problem = pg_problem()
    if problem:
        pytest.skip(problem)
    return PG_URL


@pytest.fixture
async def bookkeeper(pg_url: str) -> AsyncIterator[CreditGuard]:
    """A guard on fresh tables that nobody kills: it grants, reads the ledger, audits."""
    async with CreditGuard(pg_url) as g:
        await g.create_schema()
        await reset_postgres(g)
        await seed_prices(g)
        yield g


@asynccontextmanager
async def guard_named(url: str, application_name: str) -> AsyncIterator[CreditGuard]:
    """A guard whose every connection (SQLAlchemy's and the asyncpg deduction pool's)
    carries ``application_name``, so a killer can target exactly these."""
    settings = {"server_settings": {"application_name": application_name}}
    engine = build_engine(url, connect_timeout=TIMEOUT, connect_args=settings)
    try:
        async with CreditGuard(
            engine=engine,
            timeout=TIMEOUT,
            retry_after=RETRY_AFTER,
            organization_resolver=org_header,
            asyncpg_pool_kwargs=settings,
        ) as guard:
            yield guard
    finally:
        await engine.dispose()


RICH, POOR = "org_rich", "org_poor"
#: POOR runs dry during the run, so 402s are decided while connections die too.
GRANTS = {RICH: 1_000_000, POOR: 30 * PRICE}
WORKERS = 16
MIN_REQUESTS, MIN_503S, MAX_REQUESTS = 400, 10, 4000


def mixed_requests(n: int) -> tuple[str, str]:
    """Half succeed, a quarter answer 500, a quarter raise; every third pays from POOR."""
    return ("ok", "fail", "ok", "crash")[n % 4], POOR if n % 3 == 0 else RICH


async def test_terminated_backends_lose_no_credit(
    bookkeeper: CreditGuard, caplog: pytest.LogCaptureFixture, record_property: Callable[[str, object], None]
) -> None:
    for org, amount in GRANTS.items():
        await bookkeeper.grant_credits(org, amount)
    rng = random.Random(5432)  # the kill rhythm; the interleaving is up to the scheduler anyway
    terminated: list[int] = []

    async with guard_named(PG_URL, APP_NAME) as guard, client(build_app(guard)) as http:
        load = Load(http, mixed_requests)

        async def kill_the_guards_backends() -> None:
            killer = await asyncpg.connect(asyncpg_dsn(PG_URL))
            try:
                while not load.stop.is_set():
                    terminated.append(await killer.fetchval(KILL_SQL, APP_NAME))
                    await anyio.sleep(rng.uniform(0.05, 0.2))
            finally:
                await killer.close()

        def enough() -> bool:
            done = len(load.outcomes)
            return done >= MAX_REQUESTS or (done >= MIN_REQUESTS and load.count(503) >= MIN_503S)

        with anyio.fail_after(HANG_LIMIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_the_guards_backends)
                for _ in range(WORKERS):
                    tg.start_soon(load.worker)
                await until(enough, within=HANG_LIMIT / 2, what="the load to finish")
                load.stop.set()

    books = reconcile(load.outcomes, await ledger_rows(bookkeeper))
    report = f"{books.summary()}; {sum(terminated)} backends terminated in {len(terminated)} rounds"
    print(report)
    record_property("faults", report)
    assert sum(terminated) > 0, "no backend was ever terminated: the fault was not injected"
    assert books.statuses[503] > 0, "no request met a dead connection: the fault was not hit"
    assert books.statuses[200] > 0 and books.refunded_500 > 0
    assert_right(books)
    await refund_what_the_log_says(bookkeeper, books, caplog)
    await assert_books_balance(bookkeeper, GRANTS, books)


# -- 2. the server stops and starts again under load ----------------------------------------


@pytest.fixture(scope="module")
def throwaway_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of this module's own (initdb + pg_ctl), removed even on failure.

    Where none can be made: a failure in CI (CREDIT_GUARD_REQUIRE_POSTGRES), a skip elsewhere.
    """
    started = time.perf_counter()
    try:
        cluster = Cluster.create()
    except (ClusterUnavailable, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        reason = f"cannot run a throwaway PostgreSQL cluster: {exc}"
        if REQUIRE_PG:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    cluster.timings["ready"] = time.perf_counter() - started
    try:
        yield cluster
    finally:
        cluster.destroy()


#: The phases of test 2; each request records the one it was sent in and answered in.
BEFORE, STOPPING, DOWN, STARTING, UP = range(5)
OUTAGE = 1.5  # seconds the server stays down (the fault's length, not an assertion)


def mostly_ok(n: int) -> tuple[str, str]:
    """Three requests in four succeed, the fourth answers 500 (so refunds meet the outage too)."""
    return ("ok", "ok", "ok", "fail")[n % 4], RICH


async def test_server_restart_during_load(
    throwaway_cluster: Cluster, caplog: pytest.LogCaptureFixture, record_property: Callable[[str, object], None]
) -> None:
    cluster = throwaway_cluster
    grants = {RICH: GRANTS[RICH]}
    marks: dict[str, float] = {}
    async with CreditGuard(
        cluster.url, timeout=TIMEOUT, retry_after=RETRY_AFTER, organization_resolver=org_header
    ) as guard:
        await guard.create_schema()
        await seed_prices(guard)
        await guard.grant_credits(RICH, grants[RICH])
        async with client(build_app(guard)) as http:
            load = Load(http, mostly_ok)

            def answered_while_down() -> list[Outcome]:
                return [o for o in load.outcomes if o.phase_sent == o.phase_answered == DOWN]

            with anyio.fail_after(HANG_LIMIT):
                async with anyio.create_task_group() as tg:
                    for _ in range(8):
                        tg.start_soon(load.worker, 0.005)
                    await until(lambda: load.count(200) >= 20, within=10, what="the first 200s")
                    load.phase, marks["stop"] = STOPPING, time.perf_counter()
                    await anyio.to_thread.run_sync(cluster.stop, "fast")
                    load.phase, marks["down"] = DOWN, time.perf_counter()
                    await anyio.sleep(OUTAGE)
                    await until(lambda: len(answered_while_down()) >= 10, within=10, what="requests during the outage")
                    load.phase, marks["start"] = STARTING, time.perf_counter()
                    await anyio.to_thread.run_sync(cluster.start)
                    load.phase, marks["up"] = UP, time.perf_counter()
                    # Recovery: the same guard, its pools and caches, serve again on their own.
                    await until(lambda: load.count(200, sent_in=UP) >= 20, within=20, what="200s after the restart")
                    marks["recovered"] = time.perf_counter()
                    load.stop.set()

    during = answered_while_down()
    # Read after close(): whatever the guard queued (settlements) is written by then.
    async with CreditGuard(cluster.url) as bookkeeper:
        books = reconcile(load.outcomes, await ledger_rows(bookkeeper))
        report = (
            f"{books.summary()}; {len(during)} sent and answered while down, statuses"
            f" {dict(Counter(o.status for o in during))}; cluster initdb {cluster.timings['initdb']:.2f}s,"
            f" start {cluster.timings['start']:.2f}s, fixture {cluster.timings.get('ready', 0):.2f}s;"
            f" stop took {marks['down'] - marks['stop']:.2f}s, restart {marks['up'] - marks['start']:.2f}s,"
            f" 20 200s {marks['recovered'] - marks['up']:.2f}s after it"
        )
        print(report)
        record_property("restart", report)
        # Down means down: every request sent and answered during the outage was refused
        # with the problem+json 503 and its Retry-After, and none ran free.
        assert during and all(o.status == 503 and is_unavailable_problem(o) for o in during), report
        assert load.count(200, sent_in=BEFORE) > 0 and load.count(200, sent_in=UP) > 0
        assert_right(books)
        await refund_what_the_log_says(bookkeeper, books, caplog)
        await assert_books_balance(bookkeeper, grants, books)
