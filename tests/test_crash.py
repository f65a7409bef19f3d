"""A server killed with SIGKILL mid-request loses no credit: its restart gives every hold back.

The crash test of issue 4, against a REAL process on SQLite (a file) and PostgreSQL. A
uvicorn subprocess (tests/crash_app.py) takes N paid requests whose handler hangs; the
test sees the N holds open and the N charges taken, kills the server with SIGKILL (no
lifespan shutdown, no flush, no refund on the way out), checks that nothing gave the
credits back yet, and restarts the same command. The restarted guard's sweeper must then
refund every dead hold exactly once, free the idempotency keys they paid for and leave
books that add up; a client retrying with its Idempotency-Key is charged once, not twice.

The test process has its own CreditGuard on the same database, built with ``sweep=False``
and never started: every refund seen here was made by the restarted server. The only
time bounds are generous polling limits, never assertions about how fast things happen.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import Process
from sqlalchemy import select

from credit_guard import CreditGuard
from credit_guard._holds import HOLD_EXPIRED_REASON
from credit_guard._idempotency import IDEMPOTENCY_HEADER
from credit_guard.problems import HEADER_CHARGED, HEADER_REMAINING, HEADER_REPLAYED
from credit_guard.schema import idempotency_keys

from .conftest import PRICES, ledger_rows, reset_postgres, seed_prices
from .crash_app import (
    DB_ENV,
    FEATURE,
    HANG_HEADER,
    HOLD_TIMEOUT_ENV,
    ORG_HEADER,
    PAID_PATH,
    SWEEP_INTERVAL_ENV,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ORG = "org_crash"
GRANT = 100
PRICE = PRICES[FEATURE][2]
IN_FLIGHT = 8
#: The first KEYED requests carry an Idempotency-Key, the others none: both kinds must come back.
KEYED = 4
#: Polling bounds: far above what any step needs, only there so a broken build fails, not hangs.
STARTUP_BOUND = 30.0
RECOVERY_BOUND = 15.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _runs_crash_app(pid: int) -> bool:
    """Whether ``pid`` is the uvicorn interpreter serving crash_app (not a shell around it)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():  # no procfs: Popen without a shell is the process itself
        return True
    argv = cmdline.read_bytes().split(b"\0")
    return argv[0] == os.fsencode(sys.executable) and b"uvicorn" in argv and b"tests.crash_app:create_app" in argv


class Server:
    """One uvicorn process serving tests/crash_app.py; ``kill`` is a real SIGKILL of it."""

    def __init__(self, db_url: str, log_path: Path) -> None:
        self.db_url = db_url
        self.log_path = log_path
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Process | None = None

    @property
    def command(self) -> list[str]:
        # No shell in between: the child's pid is the uvicorn interpreter itself.
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.crash_app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self) -> None:
        env = {**os.environ, DB_ENV: self.db_url, HOLD_TIMEOUT_ENV: "1.0", SWEEP_INTERVAL_ENV: "0.2"}
        with self.log_path.open("ab") as log:
            self.proc = await anyio.open_process(self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        async with httpx.AsyncClient(base_url=self.base) as client:
            with anyio.fail_after(STARTUP_BOUND):
                while True:  # readiness, not an assertion: wait until the server answers
                    if self.proc.returncode is not None:
                        pytest.fail(f"uvicorn exited with {self.proc.returncode}:\n{self.log()}")
                    try:
                        if (await client.get("/health")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL the uvicorn process itself (checked through /proc), and reap it."""
        assert self.proc is not None and self.alive(), self.log()
        assert _runs_crash_app(self.proc.pid), f"pid {self.proc.pid} is not the uvicorn process"
        os.kill(self.proc.pid, signal.SIGKILL)
        with anyio.fail_after(10):
            assert await self.proc.wait() == -signal.SIGKILL

    async def stop(self) -> None:
        """Clean shutdown (SIGTERM runs the lifespan's close), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        with anyio.move_on_after(10) as waited:
            await self.proc.wait()
        if waited.cancelled_caught:
            self.proc.kill()
            await self.proc.wait()


async def poll(what: str, check: Callable[[], Awaitable[bool]], *, bound: float, server: Server) -> None:
    """Wait until ``check()`` holds; fail (with the server's log) after ``bound`` seconds."""
    with anyio.move_on_after(bound):
        while True:
            if await check():
                return
            if not server.alive():
                pytest.fail(f"the server died while waiting for {what}:\n{server.log()}")
            await anyio.sleep(0.05)
    pytest.fail(f"{what}: not reached within {bound} s\n{server.log()}")


@pytest.fixture
async def guard(db_url: str) -> AsyncIterator[CreditGuard]:
    """The test's view of the server's database. ``sweep=False`` and never started: this
    process must not release a single hold, or the test would prove nothing."""
    async with CreditGuard(db_url, sweep=False) as g:
        await g.create_schema()
        if g.engine.dialect.name == "postgresql":
            await reset_postgres(g)  # before any server runs: fresh tables
        await seed_prices(g)
        yield g


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    """Every server a test starts is stopped (or killed) at the end, whatever happened."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            with anyio.CancelScope(shield=True):
                await server.stop()


async def key_rows(guard: CreditGuard) -> list[dict[str, Any]]:
    async with guard.engine.connect() as conn:
        query = select(idempotency_keys).where(idempotency_keys.c.organization_id == ORG)
        return [dict(row._mapping) for row in await conn.execute(query)]


async def ledger(guard: CreditGuard) -> list[dict[str, Any]]:
    return await ledger_rows(guard, ORG)


def request_headers(i: int, *, hang: bool) -> dict[str, str]:
    headers = {ORG_HEADER: ORG}
    if hang:
        headers[HANG_HEADER] = "1"
    if i < KEYED:
        headers[IDEMPOTENCY_HEADER] = f"render-{i}"
    return headers


async def test_sigkill_mid_request_then_restart_refunds_every_hold_once(
    guard: CreditGuard, db_url: str, tmp_path: Path, servers: list[Server]
) -> None:
    await guard.grant_credits(ORG, GRANT, reason="crash test")
    first = Server(db_url, tmp_path / "uvicorn-1.log")
    servers.append(first)
    await first.start()

    # -- N paid requests in flight, each holding its charge ----------------------------------
    outcomes: dict[int, httpx.Response | Exception] = {}
    timeout = httpx.Timeout(60.0, connect=10.0)
    async with httpx.AsyncClient(base_url=first.base, timeout=timeout) as client:

        async def fire(i: int) -> None:
            try:
                outcomes[i] = await client.post(
                    PAID_PATH, json={"prompt": f"fox {i}"}, headers=request_headers(i, hang=True)
                )
            except httpx.TransportError as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(IN_FLIGHT):
                tg.start_soon(fire, i)

            async def all_held() -> bool:
                return (
                    len(await guard.open_holds(ORG)) == IN_FLIGHT
                    and await guard.get_balance(ORG) == GRANT - IN_FLIGHT * PRICE
                )

            await poll(f"{IN_FLIGHT} open holds", all_held, bound=RECOVERY_BOUND, server=first)
            held = await guard.open_holds(ORG)
            keys_before = await key_rows(guard)
            assert not outcomes, "a request finished although its handler hangs for a minute"

            await first.kill()
        # The task group ends when every request has met the dead connection.

    # -- right after the kill: nothing gave anything back ------------------------------------
    assert sorted(outcomes) == list(range(IN_FLIGHT))
    answered = {i: o.status_code for i, o in outcomes.items() if isinstance(o, httpx.Response)}
    assert answered == {}, f"requests in flight at the kill got answers: {answered}"
    assert all(isinstance(o, httpx.TransportError) for o in outcomes.values())
    assert await guard.open_holds(ORG) == held
    assert await guard.get_balance(ORG) == GRANT - IN_FLIGHT * PRICE
    rows = await ledger(guard)
    assert [r["kind"] for r in rows] == ["grant"] + ["charge"] * IN_FLIGHT
    assert sorted(int(r["id"]) for r in rows if r["kind"] == "charge") == sorted(held)
    assert all(r["hold_expires_at"] is not None for r in rows if r["kind"] == "charge")
    # The keyed requests' keys are claimed, still 'running', each tied to one of the holds.
    assert sorted(r["idempotency_key"] for r in keys_before) == [f"render-{i}" for i in range(KEYED)]
    assert await key_rows(guard) == keys_before
    assert all(r["state"] == "running" and r["charge_id"] in held for r in keys_before)
    assert len({r["charge_id"] for r in keys_before}) == KEYED
    assert await guard.audit() == []  # a hold is money taken, and booked as such

    # -- restart: the same command, a new process ---------------------------------------------
    second = Server(db_url, tmp_path / "uvicorn-2.log")
    servers.append(second)
    await second.start()

    async def all_released() -> bool:
        return await guard.open_holds(ORG) == []

    await poll("every dead hold released", all_released, bound=RECOVERY_BOUND, server=second)

    rows = await ledger(guard)
    charges = {int(r["id"]): r for r in rows if r["kind"] == "charge"}
    refunds = [r for r in rows if r["kind"] == "refund"]
    assert sorted(charges) == sorted(held)
    assert len(refunds) == IN_FLIGHT
    for charge_id, charge in charges.items():
        mine = [r for r in refunds if r["refund_of"] == charge_id]
        assert len(mine) == 1, f"charge {charge_id} has {len(mine)} refunds"
        assert mine[0]["amount"] == -charge["amount"] == PRICE
        assert mine[0]["reason"] == HOLD_EXPIRED_REASON
    assert await guard.get_balance(ORG) == GRANT
    assert await guard.audit() == []
    # Each refund freed the key its charge paid for: the clients may retry.
    assert await key_rows(guard) == []

    # -- a client retries its idempotent request: charged once, answered normally -------------
    async with httpx.AsyncClient(base_url=second.base, timeout=timeout) as client:
        retry = await client.post(PAID_PATH, json={"prompt": "fox 0"}, headers=request_headers(0, hang=False))
        assert retry.status_code == 200, retry.text
        assert retry.json() == {"rendered": "fox 0"}
        assert retry.headers[HEADER_CHARGED] == str(PRICE)
        assert retry.headers[HEADER_REMAINING] == str(GRANT - PRICE)
        assert HEADER_REPLAYED not in retry.headers

        # The server settles the retry's hold in its batch: kept, not swept.
        await poll("the retry's hold settled", all_released, bound=RECOVERY_BOUND, server=second)
        (key,) = await key_rows(guard)
        assert key["idempotency_key"] == "render-0" and key["state"] == "done" and key["status_code"] == 200

        # The same key once more is a replay of that answer, not a second charge.
        again = await client.post(PAID_PATH, json={"prompt": "fox 0"}, headers=request_headers(0, hang=False))
        assert again.status_code == 200
        assert again.json() == {"rendered": "fox 0"}
        assert again.headers[HEADER_REPLAYED] == "true"

    rows = await ledger(guard)
    new_charges = [r for r in rows if r["kind"] == "charge" and int(r["id"]) not in held]
    assert len(new_charges) == 1 and new_charges[0]["amount"] == -PRICE
    assert new_charges[0]["hold_expires_at"] is None
    assert key["charge_id"] == new_charges[0]["id"]
    assert not any(r["refund_of"] == new_charges[0]["id"] for r in rows)
    assert await guard.get_balance(ORG) == GRANT - PRICE
    assert await guard.audit() == []
