"""Benchmark credit_guard against no credit logic, the physical limit and a naive port, in one run.

    .venv/bin/python benchmarks/run.py                 # the full run (about 4 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # CI: everything runs once, a second per variant
    .venv/bin/python benchmarks/run.py --memory        # RSS after 20,000 and 200,000 guarded requests

Each variant app (``benchmarks/apps.py``) runs under uvicorn, one worker, on loopback; wrk
drives it from its own process with ``orgs.lua`` (1,000 funded accounts, org per request
in a header). Variants are measured in alternating rounds and each number is the median
of its rounds, so every ratio comes from the same run on the same (shared, noisy) machine.

Round trips are counted on the wire: the PostgreSQL-backed apps are started a second time
behind a proxy that reads the PostgreSQL protocol and counts every Sync and simple Query
(each one is a wait for the server), and which statements touched the pricing table.

THE DATABASE IS WIPED: point ``--pg-url`` (or $CREDIT_GUARD_BENCH_POSTGRES_URL) at a
database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import httpx  # noqa: E402
from sqlalchemy import func, insert, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from benchmarks.apps import FEATURE, HAND_WRITTEN_PREFIX, ORG_HEADER  # noqa: E402
from credit_guard import CreditGuard  # noqa: E402
from credit_guard.models import AuditIssue  # noqa: E402
from credit_guard.schema import accounts, grants, ledger, metadata  # noqa: E402

LUA = Path(__file__).resolve().parent / "orgs.lua"
ACCOUNTS = 1000
FUNDING = 10**12  # no 402 can happen during the run
HOT_ORG = "hot"
DRAIN_ORG = "drain"
DRAIN_BUDGET = 500  # credits (= charges at price 1) the drain test may take, and not one more
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/credit_guard_bench"


@dataclass(frozen=True)
class Variant:
    number: int
    name: str
    app: str  # which app in apps.py serves it
    path: str = "/work"
    hot: bool = False  # every request pays with the one org HOT_ORG
    guarded: bool = True
    keyed: bool = False  # every request carries a fresh Idempotency-Key


VARIANTS = [
    Variant(1, "no credit logic", "plain", guarded=False),
    Variant(2, "limit: 1 hand-written asyncpg stmt", "limit"),
    Variant(3, "naive SQLAlchemy port (seed pattern)", "naive"),
    Variant(4, "credit_guard decorator, PostgreSQL", "decorator"),
    Variant(5, "credit_guard middleware, PostgreSQL", "middleware"),
    Variant(6, "credit_guard decorator, SQLite", "sqlite"),
    # its own process (not the one that serves 5 and 8): the same middleware app, but no warm
    # pools and ledger-sized heap from the paid variants, so only the pass-through differs from 1
    Variant(7, "unguarded route under the middleware", "passthrough", path="/free", guarded=False),
    Variant(8, "hot row: one account, middleware, PG", "middleware", hot=True),
    Variant(9, "Idempotency-Key on each request, middleware, PG", "middleware", path="/work-keyed", keyed=True),
    Variant(10, "SQLite limit: 1 thread, a transaction per request", "sqlite_tx"),
    Variant(11, "SQLite limit: 1 writer thread, group commit", "sqlite_group"),
    Variant(12, "credit_guard middleware, SQLite", "sqlite_middleware"),
    Variant(13, "hot row: one account, the limit, PG", "limit", hot=True),
    Variant(
        14, "Idempotency-Key on each request, middleware, SQLite", "sqlite_middleware", path="/work-keyed", keyed=True
    ),
    Variant(15, "hot row: one account, middleware, SQLite", "sqlite_middleware", hot=True),
]

# (numerator, denominator, minimum, what it says)
TARGETS = [
    (4, 2, 1.0, "decorator vs the limit"),
    (5, 2, 1.0, "middleware vs the limit"),
    (4, 3, 3.0, "decorator vs the naive port"),
    (7, 1, 0.95, "pass-through vs no middleware"),
    (6, 11, 0.7, "SQLite decorator vs SQLite group commit"),
    (12, 11, 0.7, "SQLite middleware vs SQLite group commit"),
    (8, 13, 1.5, "hot row: middleware vs the limit on that row"),
    (4, 5, 0.9, "decorator vs middleware, PostgreSQL"),
    (9, 5, 0.8, "Idempotency-Key vs plain charge, PostgreSQL"),
    (14, 12, 0.8, "Idempotency-Key vs plain charge, SQLite"),
]


@dataclass
class Settings:
    pg_url: str
    duration: int
    warmup: int
    rounds: int
    connections: int
    hot_connections: int
    count_requests: int
    quick: bool


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int


@dataclass
class Row:
    variant: Variant
    samples: list[Sample] = field(default_factory=list)
    round_trips: str = "-"
    pricing_reads: str = "-"

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in self.samples))


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class App:
    """One uvicorn process serving one variant app (one worker, loopback)."""

    def __init__(self, name: str, env: dict[str, str], *, root: Path = ROOT) -> None:
        """``root``: the checkout whose ``benchmarks.apps`` and ``src`` it serves (``ab.py``
        serves two revisions side by side)."""
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "benchmarks.apps:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            cwd=root,
            env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'src'}", "BENCH_APP": name, **env},
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app {self.name} exited with {self.proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"app {self.name} did not start within {timeout}s")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_apps(apps: dict[str, dict[str, str]]) -> dict[str, App]:
    started: dict[str, App] = {}
    try:
        for name, env in apps.items():
            started[name] = App(name, env)
        for app in started.values():
            app.wait_ready()
    except BaseException:
        stop_apps(started)
        raise
    return started


def stop_apps(started: dict[str, App]) -> None:
    for app in started.values():
        app.stop()


@contextlib.contextmanager
def running(apps: dict[str, dict[str, str]]) -> Iterator[dict[str, App]]:
    started = start_apps(apps)
    try:
        yield started
    finally:
        stop_apps(started)


def ensure_wrk() -> str:
    """wrk's path, installing Debian's package first if it is missing (needs root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("wrk not found: installing it with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
        found = shutil.which("wrk")
    if not found:
        print("wrk is not installed and could not be installed: apt-get install -y wrk", file=sys.stderr)
        raise SystemExit(3)
    return found


def run_wrk(url: str, *, connections: int, seconds: int, org_args: Sequence[str]) -> Sample:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(LUA), url, "--", *org_args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    return Sample(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        requests=data["requests"],
        non2xx=data["non2xx"],
        socket_errors=data["socket_errors"],
    )


def org_args(variant: Variant) -> list[str]:
    """wrk script arguments; called per wrk run, so a keyed variant's keys never repeat (a
    repeated key would be a replay, not a charge)."""
    args = ["fixed", HOT_ORG] if variant.hot else ["rotate", str(ACCOUNTS)]
    return [*args, uuid.uuid4().hex[:12]] if variant.keyed else args


# -- database -------------------------------------------------------------------------------


BENCH_TABLES = tuple(table.name for table in reversed(metadata.sorted_tables))


async def prepare(url: str) -> None:
    """Empty credit_guard's tables, price the feature at 1 credit, fund the accounts."""
    async with CreditGuard(url) as guard:
        await guard.create_schema()
        async with guard.engine.begin() as conn:
            if guard.engine.dialect.name == "postgresql":
                await conn.execute(text(f"TRUNCATE {', '.join(BENCH_TABLES)}"))
            else:
                for table in BENCH_TABLES:
                    await conn.execute(text(f"DELETE FROM {table}"))
        await guard.create_pricing(feature_key=FEATURE, feature_name="Benchmark", category="Benchmark", credits=1)
        library = [f"org-{i}" for i in range(ACCOUNTS)] + [HOT_ORG]
        orgs = library + [HAND_WRITTEN_PREFIX + org for org in library]
        async with guard.engine.begin() as conn:
            await conn.execute(insert(accounts), [{"organization_id": org, "balance": FUNDING} for org in orgs])
            await conn.execute(
                insert(ledger),
                [
                    {"organization_id": org, "kind": "grant", "amount": FUNDING, "balance_after": FUNDING}
                    for org in orgs
                ],
            )
            # One never-expiring grant each. The SQLite limits draw from theirs as the library
            # does; the PostgreSQL limit and the naive port keep the seed's one balance.
            await conn.execute(
                insert(grants), [{"organization_id": org, "amount": FUNDING, "remaining": FUNDING} for org in orgs]
            )
        if guard.engine.dialect.name == "postgresql":
            async with guard.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text("VACUUM ANALYZE credit_guard_accounts"))


@dataclass
class Books:
    balance: int
    grants: int
    charges: int
    refunds: int
    audit_issues: int

    @property
    def consistent(self) -> bool:
        return (
            self.balance >= 0 and self.audit_issues == 0 and self.balance == self.grants - self.charges + self.refunds
        )


async def books(url: str, org: str) -> Books:
    async with CreditGuard(url) as guard:
        balance = await guard.get_balance(org)
        async with guard.engine.connect() as conn:
            sums = dict(
                (
                    await conn.execute(
                        select(ledger.c.kind, func.coalesce(func.sum(ledger.c.amount), 0))
                        .where(ledger.c.organization_id == org)
                        .group_by(ledger.c.kind)
                    )
                ).all()
            )
        issues = library_issues(await guard.audit(), comparators_keep_grants=url.startswith("sqlite"))
    return Books(
        balance, int(sums.get("grant", 0)), -int(sums.get("charge", 0)), int(sums.get("refund", 0)), len(issues)
    )


async def server_version(url: str) -> str:
    async with CreditGuard(url) as guard, guard.engine.connect() as conn:
        return str(await conn.scalar(text("SHOW server_version")))


# -- round trips, counted on the wire --------------------------------------------------------


class CountingProxy:
    """A PostgreSQL proxy that counts what clients send.

    A round trip is a Sync (end of an extended-protocol exchange) or a simple Query: the
    client waits for ReadyForQuery after each. Statements are told apart by their text,
    which the proxy remembers from each Parse for the Binds that reuse it by name.
    """

    SSL_REQUEST, GSS_REQUEST = 80877103, 80877104

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.round_trips = 0
        #: Round trips of the guard's background work (batched hold settlement, heartbeat,
        #: sweeper): counted apart, since no request waits for them.
        self.background_trips = 0
        self.pricing_reads = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def _statement(self, sql: str) -> None:
        if "feature_pricing" in sql:
            self.pricing_reads += 1

    @staticmethod
    def _background(sql: str) -> bool:
        if "credit_guard_idempotency_keys" in sql:
            verb = sql.lstrip().upper()
            # The sweeper's expired-key deletes, and the batch that stores finished responses
            # (alone, or inside the hold settlement's one statement).
            return verb.startswith("DELETE") or "SET state = 'done'" in sql
        return "credit_guard_holds" in sql and "INSERT" not in sql and "WITH debit" not in sql

    def _count(self, background: bool, trips: int = 1) -> None:
        if background:
            self.background_trips += trips
        else:
            self.round_trips += trips

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def downstream() -> None:
            with contextlib.suppress(Exception):
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        task = asyncio.create_task(downstream())
        prepared: dict[bytes, str] = {}
        current = ""
        # BEGIN and COMMIT belong to the statements between them: a background transaction's
        # are background trips too.
        opened = 0
        in_background = False
        try:
            while True:  # startup: untyped messages; refuse SSL/GSS so the rest is readable
                head = await reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                body = await reader.readexactly(length - 8)
                if code in (self.SSL_REQUEST, self.GSS_REQUEST):
                    writer.write(b"N")
                    await writer.drain()
                    continue
                up_writer.write(head + body)
                break
            while True:
                kind = await reader.readexactly(1)
                size = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack("!i", size)[0] - 4)
                if kind == b"P":
                    name, _, rest = body.partition(b"\0")
                    prepared[name] = rest.partition(b"\0")[0].decode()
                elif kind == b"B":
                    statement = body.partition(b"\0")[2].partition(b"\0")[0]
                    current = prepared.get(statement, "")
                elif kind == b"E":
                    self._statement(current)
                elif kind == b"S":
                    in_background = self._background(current)
                    self._count(in_background, 1 + opened)
                    opened = 0
                elif kind == b"Q":
                    sql = body.decode(errors="replace").strip().rstrip(";").upper()
                    if sql.startswith("BEGIN"):
                        opened += 1
                    elif sql in ("COMMIT", "ROLLBACK"):
                        self._count(in_background)
                    else:
                        in_background = self._background(body.decode(errors="replace"))
                        self._count(in_background, 1 + opened)
                        opened = 0
                        self._statement(body.decode(errors="replace"))
                up_writer.write(kind + size + body)
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_writer.close()
            await task


async def drive(
    base: str, path: str, n: int, *, org: str | None = None, keyed: bool = False, concurrency: int = 8
) -> dict[int, int]:
    """Send n requests (orgs rotating unless one is given); returns the count per status."""
    statuses: dict[int, int] = {}
    queue = iter(range(n))
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def worker() -> None:
            for i in queue:
                headers = {ORG_HEADER.decode(): org or f"org-{i % ACCOUNTS}"}
                if keyed:
                    headers["Idempotency-Key"] = uuid.uuid4().hex
                response = await client.post(path, headers=headers)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def count_round_trips(settings: Settings, sqlite_url: str, rows: dict[int, Row]) -> None:
    n, warm = settings.count_requests, max(20, settings.count_requests // 5)
    pg = make_url(settings.pg_url)
    rows[1].round_trips, rows[1].pricing_reads = "0", "0"
    async with CountingProxy(pg.host or "127.0.0.1", pg.port or 5432) as proxy:
        proxied = pg.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        apps = {
            name: {"BENCH_PG_URL": proxied} for name in ("limit", "naive", "decorator", "middleware", "passthrough")
        }
        for name in ("sqlite", "sqlite_middleware", "sqlite_tx", "sqlite_group"):
            apps[name] = {"BENCH_SQLITE_URL": sqlite_url, "BENCH_COUNT": "1"}
        # Started from a thread: the proxy serving their connections runs on this loop.
        started = await asyncio.to_thread(start_apps, apps)
        try:
            for variant in VARIANTS:
                if variant.app == "plain":
                    continue
                app = started[variant.app]
                org = HOT_ORG if variant.hot else None
                await drive(
                    app.base, variant.path, warm, org=org, keyed=variant.keyed
                )  # pools filled, statements prepared, cache warm
                if variant.app in ("decorator", "middleware"):
                    # ... and the guard's background work (first sweep, settlement batches)
                    # has opened its connections: they are not the measured requests' cost.
                    await asyncio.sleep(1.5)
                    await drive(app.base, variant.path, warm, org=org, keyed=variant.keyed)
                    await asyncio.sleep(0.3)
                if variant.app.startswith("sqlite"):  # no wire: statements, counted in the app
                    async with httpx.AsyncClient() as client:
                        before = (await client.get(f"{app.base}/_bench/stats")).json()["statements"]
                        await drive(app.base, variant.path, n, org=org, keyed=variant.keyed)
                        after = (await client.get(f"{app.base}/_bench/stats")).json()["statements"]
                    rows[variant.number].round_trips = f"{(after - before) / n:.2f} (stmts)"
                    rows[variant.number].pricing_reads = "-"
                    continue
                trips, reads, settles = proxy.round_trips, proxy.pricing_reads, proxy.background_trips
                await drive(app.base, variant.path, n, org=org, keyed=variant.keyed)
                await asyncio.sleep(0.3)  # let the batched settlement of these requests land
                rows[variant.number].round_trips = f"{(proxy.round_trips - trips) / n:.2f}"
                background = (proxy.background_trips - settles) / n
                if background:
                    rows[variant.number].round_trips += f" (+{background:.2f} batched)"
                rows[variant.number].pricing_reads = f"{(proxy.pricing_reads - reads) / n:.2f}"
        finally:
            await asyncio.to_thread(stop_apps, started)


# -- the run ----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor() or "?",
    )
    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    import uvicorn

    loop = "uvloop" if _has("uvloop") else "asyncio"
    http = "httptools" if _has("httptools") else "h11"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores, {int(mem) // 1024} MiB RAM",
        "os": platform.platform(),
        "python": platform.python_version()
        + f" (cyclic GC gen-0 threshold {os.environ.get('BENCH_GC_THRESHOLD') or 'default, 700'})",
        "server": f"uvicorn {uvicorn.__version__} (1 worker, loop={loop}, http={http})",
        "load generator": f"{wrk_version.strip()} (1 thread)",
    }


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# Pairs whose ratio is a target run back to back, so the shared machine's load drifts little between them.
MEASURE_ORDER = [1, 7, 2, 4, 5, 9, 3, 11, 6, 12, 14, 10, 15, 13, 8]


def measure(settings: Settings, sqlite_url: str, rows: dict[int, Row]) -> None:
    env = {"BENCH_PG_URL": settings.pg_url, "BENCH_SQLITE_URL": sqlite_url}
    names = sorted({v.app for v in VARIANTS})
    by_number = {v.number: v for v in VARIANTS}
    with running(dict.fromkeys(names, env)) as apps:
        for rnd in range(settings.rounds):
            # Reverse the order every other round so no variant always runs first or last.
            order = MEASURE_ORDER if rnd % 2 == 0 else MEASURE_ORDER[::-1]
            for number in order:
                variant = by_number[number]
                url = apps[variant.app].base + variant.path
                conns = settings.hot_connections if variant.hot else settings.connections
                if rnd == 0:  # warm-up, not measured: pools filled, statements prepared, pricing cached
                    run_wrk(url, connections=conns, seconds=settings.warmup, org_args=org_args(variant))
                sample = run_wrk(url, connections=conns, seconds=settings.duration, org_args=org_args(variant))
                rows[variant.number].samples.append(sample)
                print(
                    f"  round {rnd + 1}/{settings.rounds}  {variant.number}. {variant.name:<40} "
                    f"{sample.rps:>8.0f} req/s  p99 {sample.p99_ms:6.1f} ms",
                    flush=True,
                )


@dataclass
class Added:
    """What credit_guard adds to one request on one database: the paid route's latency
    minus the same app's unguarded route, one connection (no queueing), median of rounds."""

    database: str
    p50_us: float
    p99_us: float


def _median(samples: list[Sample], attr: str) -> float:
    return float(statistics.median(getattr(sample, attr) for sample in samples))


def latency_added(settings: Settings, sqlite_url: str) -> list[Added]:
    apps = {"middleware": {"BENCH_PG_URL": settings.pg_url}, "sqlite_middleware": {"BENCH_SQLITE_URL": sqlite_url}}
    added: list[Added] = []
    rounds = 1 if settings.quick else 3
    with running(apps) as started:
        for name, database in (("middleware", "PostgreSQL"), ("sqlite_middleware", "SQLite")):
            base, args = started[name].base, org_args(VARIANTS[0])
            samples: dict[str, list[Sample]] = {"/work": [], "/free": []}
            for path in samples:
                run_wrk(base + path, connections=1, seconds=settings.warmup, org_args=args)
            for _ in range(rounds):
                for path in samples:
                    samples[path].append(run_wrk(base + path, connections=1, seconds=settings.duration, org_args=args))

            work, free = samples["/work"], samples["/free"]
            added.append(
                Added(
                    database,
                    (_median(work, "p50_ms") - _median(free, "p50_ms")) * 1000,
                    (_median(work, "p99_ms") - _median(free, "p99_ms")) * 1000,
                )
            )
    return added


def draw_chart(rows: dict[int, Row], path: Path, info: dict[str, str]) -> None:
    from benchmarks.chart import Bar, draw

    def kind(variant: Variant) -> str:
        if variant.app in ("plain", "passthrough"):
            return "none"
        return "limit" if variant.app in ("limit", "naive", "sqlite_tx", "sqlite_group") else "credit_guard"

    bars = [
        Bar(
            row.variant.number,
            row.variant.name,
            row.median("rps"),
            min(sample.rps for sample in row.samples),
            max(sample.rps for sample in row.samples),
            kind(row.variant),
        )
        for row in rows.values()
    ]
    draw(bars, path, title="credit_guard: requests per second by variant (benchmarks/run.py)", subtitle=info["cpu"])


def library_issues(issues: list[AuditIssue], *, comparators_keep_grants: bool) -> list[AuditIssue]:
    """The audit's issues, less the one the PostgreSQL comparators cause by design: they
    keep the seed's one balance and never draw from their grants (their ledger must still
    balance). The SQLite comparators draw as the library does, so nothing is excused there."""
    return [
        issue
        for issue in issues
        if comparators_keep_grants
        or not (
            issue.organization_id.startswith(HAND_WRITTEN_PREFIX) and issue.problem == "balance differs from its grants"
        )
    ]


async def audit_everything(url: str) -> tuple[int, int]:
    """(audit issues, holds left) over every account, once every app has stopped."""
    async with CreditGuard(url, sweep=False) as guard:
        issues = library_issues(await guard.audit(), comparators_keep_grants=url.startswith("sqlite"))
        return len(issues), len(await guard.open_holds())


def drain_test(settings: Settings) -> tuple[Books, Sample]:
    """64 connections on one account funded for DRAIN_BUDGET charges: exactly that many may pass."""

    async def fund() -> None:
        async with CreditGuard(settings.pg_url) as guard:
            await guard.grant_credits(DRAIN_ORG, DRAIN_BUDGET, reason="benchmark drain test")

    asyncio.run(fund())
    with running({"middleware": {"BENCH_PG_URL": settings.pg_url}}) as apps:
        sample = run_wrk(
            apps["middleware"].base + "/work",
            connections=settings.hot_connections,
            seconds=2,
            org_args=["fixed", DRAIN_ORG],
        )
    return asyncio.run(books(settings.pg_url, DRAIN_ORG)), sample


def ratios(rows: dict[int, Row], a: int, b: int) -> list[float]:
    return [x.rps / y.rps for x, y in zip(rows[a].samples, rows[b].samples, strict=True)]


def ratio(rows: dict[int, Row], a: int, b: int) -> float:
    """The median of the per-round ratios: each round's pair ran seconds apart, under the same load."""
    return statistics.median(ratios(rows, a, b))


def spread(rows: dict[int, Row], a: int, b: int) -> str:
    values = ratios(rows, a, b)
    return f"{min(values):.2f}-{max(values):.2f}"


def report(
    settings: Settings,
    rows: dict[int, Row],
    info: dict[str, str],
    hot: Books,
    drain: Books,
    books_after: dict[str, tuple[int, int]],
    added: list[Added],
) -> bool:
    print()
    for key, fact in info.items():
        print(f"- {key}: {fact}")
    print()
    print("| # | variant | req/s | p50 ms | p99 ms | DB round trips / req | pricing reads / req | non-2xx |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows.values():
        v = row.variant
        conns = settings.hot_connections if v.hot else settings.connections
        non2xx = sum(s.non2xx + s.socket_errors for s in row.samples)
        print(
            f"| {v.number} | {v.name} ({conns} conns) | {row.median('rps'):,.0f} | {row.median('p50_ms'):.2f} | "
            f"{row.median('p99_ms'):.2f} | {row.round_trips} | {row.pricing_reads} | {non2xx} |"
        )
    print()
    print("| ratio (median of per-round ratios) | value | rounds' range | target | |")
    print("|---|---:|---:|---:|---|")
    for a, b, minimum, label in TARGETS:
        value = ratio(rows, a, b)
        verdict = "met" if value >= minimum else "MISSED"
        print(f"| {a}/{b} {label} | {value:.2f} | {spread(rows, a, b)} | >= {minimum} | {verdict} |")
    extra = (
        (8, 5, "hot row vs 1,000 accounts"),
        (6, 4, "SQLite vs PostgreSQL"),
        (10, 11, "SQLite: a transaction per request vs group commit"),
        (11, 2, "SQLite group commit vs the PostgreSQL limit"),
    )
    for a, b, label in extra:
        print(f"| {a}/{b} {label} | {ratio(rows, a, b):.2f} | {spread(rows, a, b)} | - | |")
    print()
    print("| figure | PostgreSQL | SQLite |")
    print("|---|---:|---:|")
    print(
        f"| charges/s, ONE busy organization (64 conns) | {rows[8].median('rps'):,.0f} | {rows[15].median('rps'):,.0f} |"
    )
    print(
        f"| charges/s across 1,000 organizations (32 conns) | {rows[5].median('rps'):,.0f} | {rows[12].median('rps'):,.0f} |"
    )
    by_db = {a.database: a for a in added}
    pg, lite = by_db["PostgreSQL"], by_db["SQLite"]
    print(f"| latency added per request, p50 (1 conn) | {pg.p50_us:,.0f} us | {lite.p50_us:,.0f} us |")
    print(f"| latency added per request, p99 (1 conn) | {pg.p99_us:,.0f} us | {lite.p99_us:,.0f} us |")
    print()
    ok = True
    for name, acct in (("hot row (8)", hot), ("drain: 64 conns on one account", drain)):
        books_ok = "no overdraft" if acct.consistent else "OVERDRAFT OR BOOKS DO NOT BALANCE"
        ok = ok and acct.consistent
        print(
            f"{name}: balance {acct.balance:,} = grants {acct.grants:,} - charges {acct.charges:,} "
            f"+ refunds {acct.refunds:,}; audit issues {acct.audit_issues}: {books_ok}"
        )
    if drain.charges != DRAIN_BUDGET or drain.balance != 0:
        ok = False
        print(f"drain: expected exactly {DRAIN_BUDGET} charges and balance 0: OVERDRAFT CHECK FAILED")
    for label, audit in books_after.items():
        books_ok = (
            "balances == ledger, no hold left" if audit == (0, 0) else f"{audit[0]} audit issues, {audit[1]} holds left"
        )
        ok = ok and audit == (0, 0)
        print(f"every account on {label} after the run: {books_ok}")
    print("VARIANT 8 NO OVERDRAFT: " + ("yes" if ok else "NO"))
    return ok


def memory_mode(settings: Settings, total: int) -> None:
    """RSS of the uvicorn process after 20,000 guarded requests (warm: pools, caches, the
    allocator's arenas) and after ``total``: the middleware and the decorator on PostgreSQL,
    the decorator on SQLite (the default)."""
    checkpoints = (20_000, total)
    print("| app | RSS at start | warm (requests) | at the end (requests) | growth since warm | within 10% |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite+aiosqlite:///{tmp}/memory.db"
        for name in ("middleware", "decorator", "sqlite"):
            memory_of(settings, name, {"BENCH_PG_URL": settings.pg_url, "BENCH_SQLITE_URL": sqlite_url}, checkpoints)


APP_LABELS = {
    "middleware": "middleware, PostgreSQL",
    "decorator": "decorator, PostgreSQL",
    "sqlite": "decorator, SQLite (the default)",
}


def memory_of(settings: Settings, name: str, env: dict[str, str], checkpoints: tuple[int, int]) -> None:
    asyncio.run(prepare(env["BENCH_SQLITE_URL"] if name == "sqlite" else settings.pg_url))
    with running({name: env}) as apps:
        app, done, seen = apps[name], 0, {}
        started = app.rss_kib()
        while done < checkpoints[-1]:
            sample = run_wrk(
                app.base + "/work", connections=settings.connections, seconds=5, org_args=org_args(VARIANTS[0])
            )
            if sample.non2xx or sample.socket_errors:
                raise RuntimeError(f"{name}: {sample.non2xx} non-2xx, {sample.socket_errors} socket errors")
            done += sample.requests
            for mark in checkpoints:
                if done >= mark and mark not in seen:
                    seen[mark] = (done, app.rss_kib())
        (n1, rss1), (n2, rss2) = seen[checkpoints[0]], seen[checkpoints[1]]
        growth = (rss2 - rss1) / rss1
        print(
            f"| {APP_LABELS[name]} | {started / 1024:.1f} MiB | {rss1 / 1024:.1f} MiB ({n1:,}) "
            f"| {rss2 / 1024:.1f} MiB ({n2:,}) | {growth:+.1%} | {'met' if abs(growth) <= 0.10 else 'MISSED'} |",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI: one short round, only checks that all runs")
    parser.add_argument("--memory", action="store_true", help="RSS at start, after 20,000 and after N requests")
    parser.add_argument("--memory-requests", type=int, default=1_000_000, help="N for --memory (default 1,000,000)")
    parser.add_argument("--chart", type=Path, help="where a full run draws its chart (default docs/img/benchmarks.png)")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("CREDIT_GUARD_BENCH_POSTGRES_URL", DEFAULT_PG_URL),
        help="PostgreSQL (postgresql+asyncpg://...) the run may WIPE",
    )
    parser.add_argument("--duration", type=int, help="seconds measured per variant and round (default 3)")
    parser.add_argument("--rounds", type=int, help="rounds per variant, alternating (default 5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--gc-threshold",
        type=int,
        help="gen-0 threshold of CPython's cyclic GC in every variant app (default: Python's, 700)",
    )
    args = parser.parse_args(argv)
    if args.gc_threshold:
        os.environ["BENCH_GC_THRESHOLD"] = str(args.gc_threshold)  # the apps inherit it
    ensure_wrk()
    settings = Settings(
        pg_url=args.pg_url,
        duration=args.duration or (1 if args.quick else 3),
        warmup=1 if args.quick else 2,
        rounds=args.rounds or (1 if args.quick else 5),
        connections=args.connections,
        hot_connections=64,
        count_requests=100 if args.quick else 1000,
        quick=args.quick,
    )
    started = time.monotonic()
    if args.memory:
        memory_mode(settings, args.memory_requests)
        return 0
    info = machine()
    info["database"] = f"PostgreSQL {asyncio.run(server_version(settings.pg_url))} on loopback; SQLite (WAL) file"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        print("preparing databases: 1,000 funded accounts + the hot one", flush=True)
        asyncio.run(prepare(settings.pg_url))
        asyncio.run(prepare(sqlite_url))
        rows = {v.number: Row(v) for v in VARIANTS}
        print(
            f"measuring: {settings.rounds} round(s) x {settings.duration}s per variant "
            f"(+{settings.warmup}s warm-up each, excluded)",
            flush=True,
        )
        measure(settings, sqlite_url, rows)
        hot = asyncio.run(books(settings.pg_url, HOT_ORG))
        print("latency added per request: one connection, paid route vs the same app's free one", flush=True)
        added = latency_added(settings, sqlite_url)
        print("counting round trips on the wire", flush=True)
        asyncio.run(count_round_trips(settings, sqlite_url, rows))
        books_after = {
            "PostgreSQL": asyncio.run(audit_everything(settings.pg_url)),
            "SQLite": asyncio.run(audit_everything(sqlite_url)),
        }
    print("drain test: 64 connections on one account", flush=True)
    drain, _ = drain_test(settings)
    load_after = os.getloadavg()
    info["load average (1 min) before / after"] = f"{load_before[0]:.2f} / {load_after[0]:.2f}"
    info["command"] = "benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    ok = report(settings, rows, info, hot, drain, books_after, added)
    if not settings.quick or args.chart:
        path = args.chart or ROOT / "docs" / "img" / "benchmarks.png"
        draw_chart(rows, path, info)
        print(f"chart: {path}")
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
