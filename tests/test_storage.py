"""The money engine on both databases: balances, ledger rows and the invariants under races."""

from __future__ import annotations

from datetime import UTC

import anyio
import pytest
from sqlalchemy import event, text, update

from credit_guard import CreditGuard, DuplicateFeature, InvalidPricing, PricingNotFound
from credit_guard.schema import accounts

from .conftest import ledger_rows

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"  # 5 credits


async def test_grant_creates_account_and_ledger_row(guard: CreditGuard) -> None:
    assert await guard.get_balance("org_new") == 0
    assert await guard.grant_credits("org_new", 100, reason="signup bonus") == 100
    assert await guard.grant_credits("org_new", 20) == 120
    rows = await ledger_rows(guard, "org_new")
    assert [(r["kind"], r["amount"], r["balance_after"], r["reason"]) for r in rows] == [
        ("grant", 100, 100, "signup bonus"),
        ("grant", 20, 120, None),
    ]
    assert await guard.audit() == []


@pytest.mark.parametrize("amount", [0, -5, 1.5, True])
async def test_grant_rejects_non_positive_amounts_and_writes_nothing(guard: CreditGuard, amount: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        await guard.grant_credits("org_1", amount)  # type: ignore[arg-type]
    assert await ledger_rows(guard) == []


async def test_deduct_charges_price_and_records_request(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 12)
    r = await guard.deduct_credits("org_1", IMAGE, "user_9", request_method="POST", request_path="/v1/images")
    assert (r.success, r.credits_deducted, r.remaining_credits, r.error) == (True, 5, 7, None)
    charge = (await ledger_rows(guard, "org_1"))[-1]
    assert charge["id"] == r.charge_id
    assert (charge["kind"], charge["amount"], charge["balance_after"]) == ("charge", -5, 7)
    assert (charge["feature_key"], charge["user_id"], charge["request_method"], charge["request_path"]) == (
        IMAGE,
        "user_9",
        "POST",
        "/v1/images",
    )


async def test_short_balance_is_refused_without_a_ledger_row(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 4)
    before = await ledger_rows(guard)
    r = await guard.deduct_credits("org_1", IMAGE)
    assert (r.success, r.error_code, r.required, r.remaining_credits) == (False, "insufficient_credits", 5, 4)
    assert "Required: 5, Available: 4" in (r.error or "")
    assert await ledger_rows(guard) == before
    assert await guard.get_balance("org_1") == 4


async def test_org_without_account_has_zero_available(guard: CreditGuard) -> None:
    r = await guard.deduct_credits("org_ghost", IMAGE)
    assert (r.success, r.remaining_credits) == (False, 0)
    assert await ledger_rows(guard) == []


@pytest.mark.parametrize(
    ("key", "code"), [("no_such_feature", "feature_not_found"), ("retired_feature", "feature_inactive")]
)
async def test_unknown_or_inactive_feature_charges_nothing(guard: CreditGuard, key: str, code: str) -> None:
    await guard.grant_credits("org_1", 50)
    before = await ledger_rows(guard)
    r = await guard.deduct_credits("org_1", key)
    assert (r.success, r.error_code) == (False, code)
    assert key in (r.error or "")
    assert await ledger_rows(guard) == before
    assert await guard.get_balance("org_1") == 50


async def test_concurrent_charges_never_overdraw(guard: CreditGuard) -> None:
    """200 racing deductions on an account funded for exactly 50: 50 win, balance 0."""
    await guard.grant_credits("org_race", 50 * 5)
    results = []

    async def one() -> None:
        results.append(await guard.deduct_credits("org_race", IMAGE))

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)
    assert sum(r.success for r in results) == 50
    assert all(r.error_code == "insufficient_credits" for r in results if not r.success)
    assert await guard.get_balance("org_race") == 0
    rows = await ledger_rows(guard, "org_race")
    assert sum(1 for r in rows if r["kind"] == "charge") == 50
    assert sorted(r["balance_after"] for r in rows if r["kind"] == "charge") == list(range(0, 250, 5))
    assert await guard.audit() == []


async def test_concurrent_refunds_of_one_charge_refund_once(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 10)
    charge = await guard.deduct_credits("org_1", IMAGE)
    assert charge.charge_id is not None
    results = []

    async def one() -> None:
        results.append(await guard.refund_credits(charge.charge_id))  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert sum(r.refunded for r in results) == 1
    assert {r.error for r in results if not r.refunded} == {"already refunded"}
    assert await guard.get_balance("org_1") == 10
    refunds = [r for r in await ledger_rows(guard, "org_1") if r["kind"] == "refund"]
    assert [(r["amount"], r["refund_of"], r["balance_after"]) for r in refunds] == [(5, charge.charge_id, 10)]
    assert await guard.audit() == []


async def test_refund_of_unknown_or_non_charge_entry_is_refused(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 10)
    grant_id = (await ledger_rows(guard))[0]["id"]
    assert (await guard.refund_credits(999_999)).error == "charge not found"
    assert (await guard.refund_credits(grant_id)).error == "charge not found"  # type: ignore[arg-type]
    assert await guard.get_balance("org_1") == 10


async def test_database_refuses_a_second_refund_row(guard: CreditGuard) -> None:
    """The UNIQUE refund_of constraint, not Python, is what makes a double refund impossible."""
    await guard.grant_credits("org_1", 10)
    charge = await guard.deduct_credits("org_1", IMAGE)
    await guard.refund_credits(charge.charge_id)  # type: ignore[arg-type]
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        async with guard.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO credit_guard_ledger (organization_id, kind, amount, balance_after, refund_of, created_at)"
                    " VALUES ('org_1', 'refund', 5, 15, :id, CURRENT_TIMESTAMP)"
                ),
                {"id": charge.charge_id},
            )


async def test_audit_reports_a_tampered_balance(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 10)
    assert await guard.audit() == []
    async with guard.engine.begin() as conn:
        await conn.execute(update(accounts).where(accounts.c.organization_id == "org_1").values(balance=11))
    ledger_issue, grants_issue = await guard.audit()
    assert (ledger_issue.organization_id, ledger_issue.balance, ledger_issue.ledger_sum) == ("org_1", 11, 10)
    assert (grants_issue.problem, grants_issue.balance, grants_issue.ledger_sum) == (
        "balance differs from its grants",
        11,
        10,
    )


async def test_check_credits_reports_required_and_available(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 7)
    c = await guard.check_credits("org_1", IMAGE)
    assert (c.has_enough, c.required, c.available, c.error) == (True, 5, 7, None)
    c = await guard.check_credits("org_1", "kling_image_to_video")
    assert (c.has_enough, c.required, c.available) == (False, 20, 7)
    c = await guard.check_credits("org_1", "no_such_feature")
    assert not c.has_enough and "no_such_feature" in (c.error or "")


# -- pricing ---------------------------------------------------------------------------------


async def test_pricing_crud_round_trip(guard: CreditGuard) -> None:
    created = await guard.create_pricing(
        feature_key="face_swap", feature_name="Face Swap", category="Advanced Tools", credits=8, description="swap"
    )
    assert (await guard.get_pricing(created.id)) == created
    assert [p.feature_key for p in await guard.list_pricing(category="Advanced Tools")] == [
        "face_swap",
        "retired_feature",
    ]
    assert "retired_feature" not in {p.feature_key for p in await guard.list_pricing(is_active=True)}
    updated = await guard.update_pricing(created.id, credits=9, is_active=False)
    assert (updated.credits, updated.is_active, updated.feature_name) == (9, False, "Face Swap")
    deleted = await guard.delete_pricing(created.id)
    assert deleted.id == created.id
    assert await guard.get_pricing(created.id) is None
    with pytest.raises(PricingNotFound):
        await guard.delete_pricing(created.id)
    with pytest.raises(PricingNotFound):
        await guard.update_pricing(created.id, credits=1)


async def test_invalid_pricing_names_every_bad_field_and_writes_nothing(guard: CreditGuard) -> None:
    before = await guard.list_pricing()
    with pytest.raises(InvalidPricing) as info:
        await guard.create_pricing(feature_key="Bad Key", feature_name=" ", category="x", credits=-1)
    assert set(info.value.errors) == {"feature_key", "feature_name", "credits"}
    with pytest.raises(InvalidPricing) as info:
        await guard.update_pricing(before[0].id, credits=True, colour="red")
    assert set(info.value.errors) == {"credits", "colour"}
    with pytest.raises(DuplicateFeature):
        await guard.create_pricing(feature_key=IMAGE, feature_name="Again", category="Image Generation", credits=1)
    assert await guard.list_pricing() == before


async def test_pricing_writes_invalidate_the_cache_at_once(guard: CreditGuard) -> None:
    first = await guard.get_feature_pricing(IMAGE)
    assert first is not None and first.credits == 5
    await guard.update_pricing(first.id, credits=6)
    assert (await guard.get_feature_pricing(IMAGE)).credits == 6  # type: ignore[union-attr]
    await guard.update_pricing(first.id, is_active=False)
    assert await guard.get_feature_pricing(IMAGE) is None
    # a key first seen as missing is found as soon as it is created (the negative entry goes too)
    assert await guard.get_feature_pricing("ai_voice_generation") is None
    await guard.create_pricing(feature_key="ai_voice_generation", feature_name="Voice", category="AI Voice", credits=2)
    assert (await guard.get_feature_pricing("ai_voice_generation")).credits == 2  # type: ignore[union-attr]


async def test_concurrent_cache_misses_make_one_query(guard: CreditGuard) -> None:
    guard.pricing.cache.clear()
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "credit_guard_feature_pricing" in statement:
            statements.append(statement)

    event.listen(guard.engine.sync_engine, "before_cursor_execute", count)
    try:
        results = []

        async def one() -> None:
            results.append(await guard.get_feature_pricing(IMAGE))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
        await guard.get_feature_pricing(IMAGE)
    finally:
        event.remove(guard.engine.sync_engine, "before_cursor_execute", count)
    assert len(statements) == 1
    assert {r.credits for r in results if r} == {5} and len(results) == 50


async def test_usage_report_groups_charges_and_refunds(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 100)
    await guard.grant_credits("org_2", 100)
    a = await guard.deduct_credits("org_1", IMAGE)
    await guard.deduct_credits("org_1", IMAGE)
    await guard.deduct_credits("org_1", "kling_image_to_video")
    await guard.deduct_credits("org_2", IMAGE)
    await guard.refund_credits(a.charge_id)  # type: ignore[arg-type]
    by_feature = {r.key: r for r in await guard.usage_report(group_by="feature")}
    assert (by_feature[IMAGE].charges, by_feature[IMAGE].credits_charged) == (3, 15)
    assert (by_feature[IMAGE].refunds, by_feature[IMAGE].credits_refunded, by_feature[IMAGE].net_credits) == (1, 5, 10)
    assert by_feature["kling_image_to_video"].credits_charged == 20
    by_org = {r.key: r.net_credits for r in await guard.usage_report(group_by="org", feature_key=IMAGE)}
    assert by_org == {"org_1": 5, "org_2": 5}
    [today] = await guard.usage_report(group_by="day", organization_id="org_1")
    assert (today.charges, today.credits_charged, today.credits_refunded) == (3, 30, 5)
    from datetime import datetime, timedelta

    future = datetime.now(UTC) + timedelta(days=1)
    assert await guard.usage_report(since=future) == []
    with pytest.raises(ValueError, match="group_by"):
        await guard.usage_report(group_by="week")  # type: ignore[arg-type]


async def test_usage_split_by_a_second_group_and_the_balance_history_follow_the_clock(guard: CreditGuard) -> None:
    """A chart's data: one row per day and feature, and the balance at the end of each day."""
    from datetime import timedelta

    from credit_guard._clock import reset_travel, travel, utcnow

    await guard.grant_credits("org_1", 100)
    await guard.grant_credits("org_2", 10)
    first = await guard.deduct_credits("org_1", IMAGE)
    await guard.deduct_credits("org_1", "kling_image_to_video")
    await guard.deduct_credits("org_2", IMAGE)  # another organization: not in org_1's rows
    day1 = utcnow().date()
    travel(timedelta(days=1))
    try:
        await guard.deduct_credits("org_1", IMAGE)
        await guard.refund_credits(first.charge_id)  # type: ignore[arg-type]
        day2 = utcnow().date()
        rows = await guard.usage_report(group_by="day", split_by="feature", organization_id="org_1")
        assert [(r.key, r.split, r.credits_charged, r.credits_refunded) for r in rows] == [
            (day2.isoformat(), IMAGE, 5, 5),
            (day1.isoformat(), "kling_image_to_video", 20, 0),
            (day1.isoformat(), IMAGE, 5, 0),
        ]
        assert rows[0].to_dict()["split"] == IMAGE
        assert "split" not in (await guard.usage_report(group_by="feature"))[0].to_dict()
        by_feature_org = await guard.usage_report(group_by="feature", split_by="org")
        assert {(r.key, r.split): r.net_credits for r in by_feature_org} == {
            (IMAGE, "org_1"): 5,
            (IMAGE, "org_2"): 5,
            ("kling_image_to_video", "org_1"): 20,
        }
        history = await guard.balance_history("org_1")
        assert [(p.day, p.balance) for p in history] == [(day1, 75), (day2, 75)]
        assert history[-1].balance == await guard.get_balance("org_1")
        assert [p.to_dict() for p in await guard.balance_history("org_1", since=utcnow() - timedelta(hours=1))] == [
            {"day": day2.isoformat(), "balance": 75}
        ]
        assert await guard.balance_history("nobody") == []
        with pytest.raises(ValueError, match="split_by"):
            await guard.usage_report(group_by="day", split_by="day")
    finally:
        reset_travel()
    assert await guard.audit() == []


async def test_guard_on_a_shared_engine_leaves_it_open(db_url: str) -> None:
    from credit_guard._storage.engine import build_engine

    engine = build_engine(db_url)
    try:
        async with CreditGuard(engine=engine) as g:
            await g.create_schema()
        async with engine.connect() as conn:  # still usable: the app owns it
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_free_feature_needs_no_account(guard: CreditGuard) -> None:
    await guard.create_pricing(feature_key="free_preview", feature_name="Preview", category="Tools", credits=0)
    r = await guard.deduct_credits("org_never_funded", "free_preview")
    assert (r.success, r.credits_deducted, r.remaining_credits) == (True, 0, 0)
    assert await guard.audit() == []


async def test_long_request_path_and_user_are_clipped_not_refused(guard: CreditGuard) -> None:
    await guard.grant_credits("org_1", 10)
    r = await guard.deduct_credits("org_1", IMAGE, "u" * 400, request_path="/" + "x" * 5000)
    assert r.success
    charge = (await ledger_rows(guard, "org_1"))[-1]
    assert (len(charge["request_path"]), len(charge["user_id"])) == (2048, 255)  # type: ignore[arg-type]


@pytest.mark.parametrize("org", ["", "o" * 256])
async def test_bad_organization_id_is_refused_before_any_write(guard: CreditGuard, org: str) -> None:
    with pytest.raises(ValueError, match="organization_id"):
        await guard.grant_credits(org, 5)
    with pytest.raises(ValueError, match="organization_id"):
        await guard.deduct_credits(org, IMAGE)
    assert await ledger_rows(guard) == []


async def test_absurd_grant_is_a_value_error_not_an_outage(guard: CreditGuard) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        await guard.grant_credits("org_1", 10**30)
    assert await ledger_rows(guard) == []


async def test_cancelled_loader_does_not_cancel_its_waiters(guard: CreditGuard) -> None:
    from credit_guard._pricing import PricingCache

    started = anyio.Event()
    calls = 0

    async def slow_loader(key: str) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await anyio.sleep(10)  # cancelled below
        return await guard.store.pricing_by_key(key)

    cache = PricingCache(slow_loader, ttl=60)  # type: ignore[arg-type]
    got: list[object] = []
    async with anyio.create_task_group() as tg:
        first = anyio.CancelScope()

        async def loader_request() -> None:
            with first:
                await cache.get(IMAGE)

        async def waiter_request() -> None:
            got.append(await cache.get(IMAGE))

        tg.start_soon(loader_request)
        await started.wait()
        tg.start_soon(waiter_request)
        await anyio.sleep(0.05)
        first.cancel()
    assert [p.credits for p in got] == [5]  # type: ignore[attr-defined]
    assert calls == 2


async def test_a_price_created_by_another_process_is_seen_within_seconds(guard: CreditGuard, db_url: str) -> None:
    """Issue 23: "no such feature" was cached for the whole TTL (60 s), so a price added by
    the CLI (another process; on SQLite nothing notifies) kept a server answering
    feature-not-found for a minute. A miss is believed for NEGATIVE_TTL at most; a price
    created in this process is seen at once."""
    from credit_guard._pricing import NEGATIVE_TTL

    await guard.grant_credits("org_1", 100)
    assert (await guard.deduct_credits("org_1", "brand_new")).error_code == "feature_not_found"
    async with CreditGuard(db_url, pricing_notify=False) as other:  # "the CLI": no notification
        await other.create_pricing(feature_key="brand_new", feature_name="New", category="c", credits=7)
    # Still believed for a moment: one query per key every few seconds at most.
    assert (await guard.deduct_credits("org_1", "brand_new")).error_code == "feature_not_found"
    await anyio.sleep(NEGATIVE_TTL + 0.1)
    assert (await guard.deduct_credits("org_1", "brand_new")).credits_deducted == 7
    assert (await guard.deduct_credits("org_1", "also_new")).error_code == "feature_not_found"
    await guard.create_pricing(feature_key="also_new", feature_name="Also", category="c", credits=3)
    assert (await guard.deduct_credits("org_1", "also_new")).credits_deducted == 3  # this process: at once
    assert await guard.get_balance("org_1") == 90
