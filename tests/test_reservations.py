"""Reservations for async jobs: reserve, capture, release, the TTL, from any process."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from credit_guard import CreditGuard
from credit_guard._clock import reset_travel, travel

from .conftest import fresh_tables, ledger_rows

pytestmark = pytest.mark.anyio

VIDEO = "kling_image_to_video"  # 20 credits a unit


@pytest.fixture(autouse=True)
def clock() -> Iterator[None]:
    yield
    reset_travel()


async def test_reserve_holds_the_credits_and_a_repeat_charges_nothing(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    first = await guard.reserve("org_1", VIDEO, job_id="job-1", units=2, ttl=600)
    assert (first.success, first.credits_deducted, first.remaining_credits, first.replayed) == (True, 40, 60, False)
    again = await guard.reserve("org_1", VIDEO, job_id="job-1", units=2, ttl=600)
    assert (again.success, again.charge_id, again.replayed) == (True, first.charge_id, True)
    assert await guard.get_balance("org_1") == 60
    assert await guard.open_holds("org_1") == [first.charge_id]
    short = await guard.reserve("org_1", VIDEO, job_id="job-2", units=4, ttl=600)
    assert (short.success, short.error_code, short.remaining_credits) == (False, "insufficient_credits", 60)
    with pytest.raises(LookupError):
        await guard.capture("job-2")  # the refused reservation left no row behind
    assert await guard.audit() == []


async def test_capture_keeps_the_units_used_at_the_reserved_price_once(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    await guard.reserve("org_1", VIDEO, job_id="job-1", units=2, ttl=600)
    await guard.update_pricing(
        next(p.id for p in await guard.list_pricing() if p.feature_key == VIDEO), credits=50
    )  # the price is fixed at reservation
    done = await guard.capture("job-1", units="1.5")
    assert (done.state, done.captured_credits, done.refunded_credits) == ("captured", 30, 10)
    assert await guard.get_balance("org_1") == 70
    twice = await guard.capture("job-1", units=2)
    assert (twice.state, twice.captured_credits, twice.refunded_credits) == ("captured", 0, 0)
    released = await guard.release("job-1")
    assert released.state == "captured" and await guard.get_balance("org_1") == 70
    assert await guard.open_holds("org_1") == []
    assert await guard.audit() == []


async def test_release_refunds_all_once_and_capture_after_it_moves_nothing(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    await guard.reserve("org_1", VIDEO, job_id="job-1", ttl=600)
    assert (await guard.release("job-1")).refunded_credits == 20
    assert (await guard.release("job-1")).refunded_credits == 0
    assert (await guard.capture("job-1")).state == "released"
    assert await guard.get_balance("org_1") == 100
    refunds = [row for row in await ledger_rows(guard, "org_1") if row["kind"] == "refund"]
    assert len(refunds) == 1
    with pytest.raises(LookupError):
        await guard.release("no-such-job")
    assert await guard.audit() == []


async def test_a_capture_may_take_overage_within_the_reserved_limit(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    await guard.reserve("org_1", VIDEO, job_id="job-1", units=1, ttl=600, max_overage=0.5)
    done = await guard.capture("job-1", units=3)  # 60 used; 20 reserved + at most 10 more
    assert (done.captured_credits, done.refunded_credits) == (30, 0)
    assert await guard.get_balance("org_1") == 70
    assert await guard.audit() == []


async def test_a_reservation_survives_a_restart_and_is_released_after_its_ttl(db_url: str) -> None:
    await fresh_tables(db_url)
    async with CreditGuard(db_url) as first:
        await first.grant_credits("org_1", 50)
        await first.reserve("org_1", VIDEO, job_id="job-1", ttl=300)
    async with CreditGuard(db_url) as restarted:  # another process, after a restart
        assert await restarted.release_expired_holds() == 0
        assert await restarted.get_balance("org_1") == 30
        travel(timedelta(seconds=301))
        assert await restarted.release_expired_holds() == 1
        assert await restarted.get_balance("org_1") == 50
        late = await restarted.capture("job-1")
        assert (late.state, late.captured_credits) == ("expired", 0)
        assert await restarted.get_balance("org_1") == 50
        assert await restarted.audit() == []


async def test_closing_from_two_guards_at_once_closes_once(db_url: str) -> None:
    import asyncio

    await fresh_tables(db_url)
    async with CreditGuard(db_url) as one, CreditGuard(db_url) as two:
        await one.grant_credits("org_1", 200)
        for i in range(10):
            assert (await one.reserve("org_1", VIDEO, job_id=f"job-{i}", ttl=600)).success
        results = await asyncio.gather(
            *(
                call
                for i in range(10)
                for call in (one.capture(f"job-{i}", units="0.5"), two.release(f"job-{i}"), two.capture(f"job-{i}"))
            )
        )
        movers = [r for r in results if r.captured_credits or r.refunded_credits]
        assert sorted(r.job_id for r in movers) == sorted(f"job-{i}" for i in range(10))  # once per job
        assert await one.get_balance("org_1") == 200 - sum(r.captured_credits for r in movers)
        assert await one.open_holds() == []
        assert await one.audit() == []


async def test_bad_arguments_are_refused_precisely(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    with pytest.raises(ValueError, match="job_id"):
        await guard.reserve("org_1", VIDEO, job_id="", ttl=60)
    with pytest.raises(ValueError, match="ttl"):
        await guard.reserve("org_1", VIDEO, job_id="j", ttl=0)
    with pytest.raises(ValueError, match="job_id"):
        await guard.capture("x" * 300)
    missing = await guard.reserve("org_1", "no_such_feature", job_id="j", ttl=60)
    assert (missing.success, missing.error_code) == (False, "feature_not_found")
    await guard.reserve("org_1", VIDEO, job_id="j", ttl=60)
    with pytest.raises(ValueError, match="another organization"):
        await guard.reserve("org_2", VIDEO, job_id="j", ttl=60)
    assert await guard.get_balance("org_1") == 80


async def test_a_route_hands_its_charge_to_a_job_and_a_failure_after_it_releases_it(guard: CreditGuard) -> None:
    """``current_ticket(request).reserve_for(job)``: the request's hold becomes the job's
    reservation (answer 202); the request's end neither settles nor refunds it. A handler
    that fails after reserving releases the job (it is taken not to have started)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from credit_guard import current_ticket, requires_credits

    from .helpers import OrgFromHeader, client

    @requires_credits(VIDEO)
    async def start(request: Request) -> JSONResponse:
        ticket = current_ticket(request)
        assert ticket is not None
        await ticket.reserve_for(request.path_params["job"], ttl=600)
        if request.query_params.get("fail"):
            raise RuntimeError("the provider refused the job after all")
        return JSONResponse({"job_id": request.path_params["job"]}, status_code=202)

    app = Starlette(routes=[Route("/jobs/{job}", start, methods=["POST"])], middleware=[Middleware(OrgFromHeader)])
    app.state.credit_guard = guard
    await guard.grant_credits("org_1", 100)
    async with client(app) as http:
        ok = await http.post("/jobs/job-1", headers={"X-Org": "org_1"})
        assert (ok.status_code, ok.headers["x-credits-charged"], ok.headers["x-credits-remaining"]) == (202, "20", "80")
        failed = await http.post("/jobs/job-2?fail=1", headers={"X-Org": "org_1"})
        assert failed.status_code == 500
    await guard.flush()
    assert await guard.get_balance("org_1") == 80
    [held] = await guard.open_holds("org_1")  # job-1's reservation; job-2's was released
    assert (await guard.release("job-2")).state == "released"  # closed by the failure
    assert (await guard.capture("job-1", units="0.5")).captured_credits == 10
    assert await guard.get_balance("org_1") == 90
    assert held not in await guard.open_holds()
    assert await guard.audit() == []
