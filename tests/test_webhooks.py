"""Signed webhooks out of the outbox: every event delivered, signed as documented (checked
with the stripe package's verifier, the recipe docs/webhooks.md gives), once per crossing
across processes, retried with the same id, and never lost to a process killed between
the commit and the delivery. A real HTTP receiver (uvicorn), both databases."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import pytest
import stripe
import uvicorn
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from credit_guard import CreditGuard
from credit_guard._clock import reset_travel, travel, utcnow
from credit_guard.schema import outbox

from .helpers import ROOT, free_port

pytestmark = pytest.mark.anyio

SECRET = "whsec_test_0123456789abcdef"
ORG = "org_hooks"


@dataclass
class Receiver:
    url: str
    events: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    bad_signatures: int = 0

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    reset_travel()
    yield
    reset_travel()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """The app's endpoint, verifying each signature with stripe's verifier as documented."""
    port = free_port()
    got = Receiver(f"http://127.0.0.1:{port}/hooks")

    async def hook(request: Request) -> Response:
        body = (await request.body()).decode()
        try:
            stripe.WebhookSignature.verify_header(body, request.headers["credit-guard-signature"], SECRET, 300)
        except stripe.SignatureVerificationError:
            got.bad_signatures += 1
            return Response(status_code=400)
        event = json.loads(body)
        assert request.headers["credit-guard-event-id"] == event["id"]
        if got.status == 200:
            got.events.append(event)
        return Response(status_code=got.status)

    app = Starlette(routes=[Route("/hooks", hook, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.01)
    yield got
    server.should_exit = True
    await task


async def wait_for(receiver: Receiver, count: int, guard: CreditGuard) -> None:
    with anyio.fail_after(15):
        while len(receiver.events) < count:
            await guard.webhooks.run_once()
            await asyncio.sleep(0.05)


async def outbox_rows(guard: CreditGuard) -> list[dict[str, Any]]:
    async with guard.engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(outbox).order_by(outbox.c.id))]


@pytest.fixture
async def hooked(db_url: str, receiver: Receiver) -> AsyncIterator[CreditGuard]:
    from .conftest import reset_postgres, seed_prices

    guard = CreditGuard(db_url, low_balance_threshold=50)
    guard.webhooks.send_to(receiver.url, secret=SECRET)
    await guard.create_schema()
    if guard.engine.dialect.name == "postgresql":
        await reset_postgres(guard)
    await seed_prices(guard)
    await guard.create_pricing(feature_key="llm_token", feature_name="Token", category="Text", credits=1)
    async with guard:
        yield guard


async def test_every_event_arrives_signed_once_in_the_order_it_happened(
    hooked: CreditGuard, receiver: Receiver
) -> None:
    guard = hooked
    await guard.grant_credits(ORG, 100)
    assert (await guard.deduct_credits(ORG, "llm_token", units=60)).success  # 40: below 50
    await wait_for(receiver, 1, guard)  # the balance is looked at where it stands: here, low
    assert (await guard.deduct_credits(ORG, "llm_token", units=40)).success  # 0: empty
    await wait_for(receiver, 2, guard)
    await guard.grant_credits(ORG, 100)  # 100: recovered
    await wait_for(receiver, 3, guard)
    await guard.define_plan("pro", credits=500, rollover=0)
    sub = await guard.subscribe(ORG, "pro")
    await guard.grant_credits(ORG, 5, expires_at=utcnow() + timedelta(minutes=1))
    travel(timedelta(minutes=2))
    assert await guard.expire_grants() == 1
    await wait_for(receiver, 5, guard)
    receiver.events.sort(key=lambda event: event["created"])  # two senders may interleave
    assert receiver.types() == [
        "balance.low",
        "balance.empty",
        "balance.recovered",
        "allowance.issued",
        "grant.expired",
    ]
    low, empty, _, issued, expired = receiver.events
    assert (low["organization_id"], low["data"]) == (ORG, {"balance": 40, "threshold": 50})
    assert empty["data"] == {"balance": 0, "threshold": 50}
    assert issued["data"]["plan_key"] == "pro" and issued["data"]["period_start"] == sub.anchor.isoformat()
    assert (expired["data"]["credits"], expired["data"]["balance"]) == (5, 600)
    assert len({event["id"] for event in receiver.events}) == 5
    assert receiver.bad_signatures == 0
    rows = await outbox_rows(guard)
    assert all(r["delivered_at"] is not None and r["next_attempt_at"] is None for r in rows)
    await guard.webhooks.run_once()
    assert len(receiver.events) == 5  # delivered means never again
    assert await guard.audit() == []


async def test_two_hundred_racing_charges_across_two_processes_cross_the_line_once(
    hooked: CreditGuard, receiver: Receiver, db_url: str
) -> None:
    other = CreditGuard(db_url, low_balance_threshold=50, sweep=False, max_connections=4)
    other.webhooks.send_to(receiver.url, secret=SECRET)
    async with other:
        await hooked.grant_credits(ORG, 300)

        async def charge(guard: CreditGuard) -> None:
            await guard.deduct_credits(ORG, "llm_token", units=1)

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(charge, hooked if n % 2 else other)
        for _ in range(3):
            await hooked.webhooks.run_once()
            await other.webhooks.run_once()
        await asyncio.sleep(0.3)
    assert await hooked.get_balance(ORG) == 100
    await hooked.webhooks.run_once()
    assert receiver.types() == []  # 100 is not below 50
    async with other:
        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(charge, hooked if n % 2 else other)
        await other.webhooks.run_once()
    await wait_for(receiver, 1, hooked)
    await asyncio.sleep(0.3)
    await hooked.webhooks.run_once()
    # Empty is told once, whichever process charged last; low once at most (a look that
    # comes after the balance reached zero tells only that), never twice.
    assert receiver.types().count("balance.empty") == 1
    assert receiver.types() in (["balance.empty"], ["balance.low", "balance.empty"])
    assert len(await outbox_rows(hooked)) == len(receiver.events)


async def test_a_refusing_endpoint_gets_the_event_again_with_the_same_id(
    hooked: CreditGuard, receiver: Receiver
) -> None:
    guard = hooked
    receiver.status = 503
    await guard.grant_credits(ORG, 10)
    assert (await guard.deduct_credits(ORG, "llm_token", units=10)).success
    with anyio.fail_after(15):  # this call, or the guard's own sender, makes the first try
        while not (rows := await outbox_rows(guard)) or rows[0]["last_error"] is None:
            await guard.webhooks.run_once()
            await asyncio.sleep(0.05)
    [row] = rows
    assert (row["attempts"], row["delivered_at"], row["last_error"]) == (1, None, "HTTP 503")
    await guard.webhooks.run_once()  # not due yet: the backoff
    assert (await outbox_rows(guard))[0]["attempts"] == 1
    receiver.status = 200
    travel(timedelta(seconds=3))
    await wait_for(receiver, 1, guard)
    assert receiver.events[0]["id"] == row["event_id"]
    assert (await outbox_rows(guard))[0]["attempts"] == 2


async def test_an_event_committed_by_a_process_killed_before_delivery_is_delivered_after(
    db_url: str, receiver: Receiver, tmp_path: Any
) -> None:
    """The process writes the event with the renewal, then hangs on a receiver that never
    answers; kill -9. A new process delivers it once its lease ran out, with its id."""
    from .conftest import fresh_tables

    await fresh_tables(db_url)
    hang = free_port()
    script = textwrap.dedent(
        f"""
        import asyncio, socket, sys
        from credit_guard import CreditGuard

        async def main():
            listener = socket.socket()
            listener.bind(("127.0.0.1", {hang}))
            listener.listen()  # accepts, never answers
            guard = CreditGuard({db_url!r})
            guard.webhooks.send_to("http://127.0.0.1:{hang}/hooks", secret={SECRET!r}, timeout=60)
            async with guard:
                await guard.define_plan("pro", credits=100)
                await guard.subscribe("{ORG}", "pro")
                print("committed", flush=True)
                await asyncio.sleep(600)

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(  # noqa: ASYNC220 (killed below; its pipe read in a thread)
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        assert line.strip() == b"committed"
        await asyncio.sleep(1.0)  # its sender has claimed the event and is waiting on the POST
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    async with CreditGuard(db_url) as guard:
        [row] = await outbox_rows(guard)
        assert (row["type"], row["delivered_at"], row["attempts"]) == ("allowance.issued", None, 1)
        guard.webhooks.send_to(receiver.url, secret=SECRET)
        await guard.webhooks.run_once()
        assert receiver.events == []  # still leased to the dead process
        travel(timedelta(seconds=200))  # past the lease (2 x timeout + 5 s)
        await guard.webhooks.run_once()
        assert [event["id"] for event in receiver.events] == [row["event_id"]]
        assert await guard.get_balance(ORG) == 100
        assert await guard.audit() == []
