"""Fuzz the admin app from the OpenAPI document it serves (schemathesis), on both databases.

Why: the hand-written document in ``admin/openapi.py`` is a promise to clients, and the
example-based tests in ``test_admin_api.py`` only try the inputs someone thought of.
Here schemathesis generates requests from the served document, valid ones (which must be
accepted) and invalid ones (which must be refused with a 4xx), sends them as an
administrator so every write path runs, and checks each answer against the same document:
never a 5xx, a documented status, the documented content type, headers and body schema.

And money: apart from grants and subscriptions (fuzzed on their own, every credit they
move accounted for in the ledger) the admin API moves no credits, so after the whole run
every balance and every ledger row must be exactly as before, and ``audit()`` must still
find the books exact, however many prices, plans, auto top-ups and member caps were
created, changed or deleted meanwhile. (An auto top-up line buys nothing in a process
without the app's charge, as here; with one registered it is fuzzed on its own, every
credit it moves granted by that charge.) A member cap moves no credits either, and no write
to it may invent or forgive spending: afterwards each cap's ``used`` is what its member
really spent this period (or 0, counting again), and the next charges meet the caps as stored.

How it runs: schemathesis's own ASGI transport drives an app on an event loop of its own,
but the guard (the ``guard`` fixture) lives on this test's loop, and asyncpg connections
are bound to the loop that opened them. So Hypothesis runs in a worker thread and each
generated request is sent back to this test's loop with ``anyio.from_thread.run``, through
httpx's in-process ``ASGITransport`` (no server, no socket); the answer is judged by
``case.validate_response``. Deterministic: ``derandomize=True`` and no example database.

``credit_endpoints()`` (/balance, /check) is fuzzed the same way from the document it
serves, mounted under a prefix, as a few funded organizations, an unknown one and nobody
(the organization comes from a header through ``organization_resolver``). Those reads must
also agree with the books: every balance and price they report is checked against what
was granted and seeded, and afterwards nothing has moved.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Err
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.routing import Mount

from credit_guard import CreditGuard, credit_endpoints
from credit_guard.admin import admin_app
from credit_guard.problems import HEADER_REMAINING

from .conftest import PRICES, ledger_rows

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BASE_URL = "http://test"
ROLE_HEADER = "x-fuzz-role"
PRICING_WRITE = "POST /api/admin/feature-pricing"
#: An admin operation that moves credits: fuzzed on its own, its grants accounted for.
GRANT_WRITE = "POST /api/admin/organizations/{organization_id}/grants"
#: The others: putting an organization on a plan grants its period (and may write off the
#: old plan's); ending one may write the period off. Fuzzed on their own too.
SUBSCRIBE = "PUT /api/admin/organizations/{organization_id}/subscription"
UNSUBSCRIBE = "DELETE /api/admin/organizations/{organization_id}/subscription"
MONEY_WRITES = {GRANT_WRITE, SUBSCRIBE, UNSUBSCRIBE}
#: An organization's auto top-up: without a charge registered in the process (the guard
#: fixture has none) setting a line buys nothing, so it is fuzzed with the rest; with one, on its own.
TOPUP = "/api/admin/organizations/{organization_id}/auto-topup"
TOPUP_OPS = (f"GET {TOPUP}", f"PUT {TOPUP}", f"DELETE {TOPUP}")
#: An auto top-up set before a run, on an account well above its line.
TOPUP_ORG, TOPUP_LINE = "org_rich", (10, 100)
#: Member caps: no credits move, so fuzzed with the rest.
MEMBERS = "/api/admin/organizations/{organization_id}/members"
MEMBER_OPS = (f"GET {MEMBERS}", f"PUT {MEMBERS}/{{member}}", f"DELETE {MEMBERS}/{{member}}")
#: Caps set before a run ((organization, member): (credits, per)), each member having spent
#: one seedream_text_to_image (5 credits) of it. The fuzzing writes to ann's and bob's; dan's
#: is no request's (5 left of it, exactly the next image): a write to one cap never moves another.
CAPS = {("org_rich", "ann"): (12, "day"), ("org_spent", "bob"): (50, None), ("org_exact", "dan"): (10, "month")}
CAP_SPEND = 5
PLAN_WRITES = ("POST /api/admin/plans", "PATCH /api/admin/plans/{plan_key}")
#: Plans defined before a run, and an organization on one of them (its own books).
PLANS = {"pro": (100, "month", 50), "max": (300, "month", None), "daily": (5, "day", 0)}
PLANNED_ORG = "org_planned"
#: Examples per operation and generation mode: Hypothesis tries the boundaries first, so this
#: reaches every validation branch while the whole file stays well under 30 s.
MAX_EXAMPLES = 30
#: Accounts with money on them before the run; no request may change them. org_exact holds
#: exactly one kling_image_to_video, the edge of a credit check's ``has_enough``.
GRANTS = {"org_rich": 1_000, "org_poor": 3, "org_spent": 50, "org_exact": 20}

#: Every response is judged by all of these; the first five compare it with the document.
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,  # valid data is not refused with 400/422
    negative_data_rejection,  # invalid data is not accepted with a 2xx
]

Operation = APIOperation[Any, Any, Any, Any]
FuzzCase = Case[Operation]
Send = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
#: Inputs the database actually holds, as ``as_strategy`` keyword arguments, per operation label.
KnownInputs = Callable[[str], Coroutine[Any, Any, list[dict[str, Any]]]]


def follows_documented_rules(label: str, case: FuzzCase) -> bool:
    """What the document says in words but JSON Schema cannot say across parameters: the
    usage report's ``split_by`` must differ from ``group_by`` (default ``day``), else 422.
    A generated "valid" request that breaks it is not valid, so it is not sent as one."""
    if label == "GET /api/admin/usage":
        query = case.query or {}
        return query.get("split_by") is None or query.get("split_by") != query.get("group_by", "day")
    return True


def is_admin(request: Request) -> bool | None:
    """The host app's rule, reduced to a header; without it nobody is signed in (401)."""
    return True if request.headers.get(ROLE_HEADER) == "admin" else None


def to_httpx(case: FuzzCase, headers: dict[str, str], base_url: str = BASE_URL) -> httpx.Request:
    """The request schemathesis would send, as an httpx request: prepared by ``requests``
    exactly as schemathesis's own transports prepare it (query and body encoding, escaping)."""
    kwargs = case.as_transport_kwargs(base_url=base_url, headers=headers)
    prepared = requests.Request(
        method=kwargs["method"],
        url=kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        cookies=kwargs.get("cookies"),
        json=kwargs.get("json"),
        data=kwargs.get("data"),
        files=kwargs.get("files"),
    ).prepare()
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
    assert body is None or isinstance(body, bytes), "schemathesis sends no streamed bodies here"
    headers = {
        name: value.decode("latin-1") if isinstance(value, bytes) else value for name, value in prepared.headers.items()
    }
    return httpx.Request(prepared.method or case.method, prepared.url or "", headers=headers, content=body)


def operations(schema: schemathesis.BaseSchema, keep: Callable[[Operation], bool] | None = None) -> list[Operation]:
    ops = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation schemathesis cannot read is a broken document
            raise result.err()
        if keep is None or keep(result.ok()):
            ops.append(result.ok())
    # Deletions last, so every other operation still meets the pricing that exists.
    return sorted(ops, key=lambda op: op.method.upper() == "DELETE")


def fuzz(
    schema: schemathesis.BaseSchema,
    send: Send,
    known_inputs: KnownInputs,
    *,
    headers: dict[str, str] | SearchStrategy[dict[str, str]],
    base_url: str = BASE_URL,
    modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    max_examples: int = MAX_EXAMPLES,
    expect: Callable[[Operation, httpx.Response], None] | None = None,
    keep: Callable[[Operation], bool] | None = None,
    checks: list[CheckFunction] = CHECKS,
) -> tuple[list[str], Counter[tuple[str, int]]]:
    """Fuzz every operation in every mode. Returns one message per failing (operation, mode),
    all of them rather than the first, so one run shows every broken promise, and how often
    each (operation, status) was answered. ``headers`` are sent with every request, or drawn
    for each one when a strategy. Runs in a worker thread; the database is only ever touched
    on the test's loop."""
    header_sets = headers if isinstance(headers, SearchStrategy) else st.just(headers)
    failures: list[str] = []
    answered: Counter[tuple[str, int]] = Counter()
    for operation in operations(schema, keep):
        # Random ids and keys only ever meet a 404; real ones (seeded, or created by the
        # fuzzing of POST just before) reach the reads and writes behind the lookup.
        known_for_all_modes = anyio.from_thread.run(known_inputs, operation.label)
        for mode in modes:
            strategy = operation.as_strategy(mode)
            # A fixed body is valid data: it only makes sense for valid (positive) cases.
            known = [k for k in known_for_all_modes if mode is GenerationMode.POSITIVE or "body" not in k]
            if known:
                strategy = st.one_of(
                    strategy,
                    st.sampled_from(known).flatmap(lambda fixed: operation.as_strategy(mode, **fixed)),  # noqa: B023
                )

            @given(case=strategy, sent_headers=header_sets)
            @settings(
                max_examples=max_examples,
                derandomize=True,
                database=None,
                deadline=None,
                print_blob=False,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: FuzzCase, sent_headers: dict[str, str]) -> None:
                if mode is GenerationMode.POSITIVE and not follows_documented_rules(operation.label, case):  # noqa: B023
                    reject()
                response = anyio.from_thread.run(send, to_httpx(case, sent_headers, base_url))
                answered[operation.label, response.status_code] += 1  # noqa: B023
                case.validate_response(response, checks=checks)
                if expect is not None:
                    expect(operation, response)  # noqa: B023

            try:
                run()
            except Unsatisfiable:
                pass  # nothing invalid can be sent: no input but a path parameter, or none at all
            except (Exception, FailureGroup) as exc:
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    return failures, answered


async def setup_books(guard: CreditGuard) -> tuple[dict[str, int], list[dict[str, object]]]:
    """Accounts with grants, a charge and a refunded charge; their balances and the ledger."""
    for org, amount in GRANTS.items():
        await guard.grant_credits(org, amount)
    refunded = await guard.deduct_credits("org_spent", "kling_image_to_video")
    assert refunded.charge_id is not None
    assert (await guard.deduct_credits("org_spent", "seedream_text_to_image")).success
    await guard.refund_credits(refunded.charge_id)  # the usage report has both kinds of row
    balances = {org: await guard.get_balance(org) for org in GRANTS}
    assert balances == {"org_rich": 1_000, "org_poor": 3, "org_spent": 45, "org_exact": 20}
    return balances, await ledger_rows(guard)


async def setup_plans(guard: CreditGuard) -> None:
    """The plans of ``PLANS``, and ``PLANNED_ORG`` on pro (its first period granted)."""
    for key, (credits, period, rollover) in PLANS.items():
        await guard.define_plan(key, credits=credits, period=period, rollover=rollover)
    await guard.subscribe(PLANNED_ORG, "pro")
    assert await guard.get_balance(PLANNED_ORG) == 100


async def setup_topups(guard: CreditGuard) -> None:
    """``TOPUP_ORG``'s auto top-up (its balance stays above the line), so reads find one."""
    below, credits = TOPUP_LINE
    await guard.set_auto_topup(TOPUP_ORG, below=below, credits=credits)


async def setup_members(guard: CreditGuard) -> None:
    """The caps of ``CAPS``, each with a real charge counted against it."""
    for (org, member), (credits, per) in CAPS.items():
        await guard.set_member_limit(org, member, credits, per=per)
        assert (await guard.deduct_credits(org, "seedream_text_to_image", user_id=member)).success
        usage = await guard.get_member_usage(org, member)
        assert usage is not None and usage.used == CAP_SPEND


async def assert_caps_counted_and_enforced(guard: CreditGuard) -> list[tuple[str, str]]:
    """After any run of member cap writes: every cap counts what its member really spent
    (the seeded charge) or 0 (a change of period counts again), never another amount, and
    the next charge by each capped member goes through exactly when its cap and the
    organization both have the 5 credits. The books stay exact. Returns the caps checked.

    The charges are of a feature priced here, after the fuzzing: the fuzzed pricing writes
    may have deactivated, repriced or pooled every feature seeded before."""
    probe = await guard.create_pricing(
        feature_key=f"caps_probe_{uuid.uuid4().hex[:8]}", feature_name="Caps probe", category="Probe", credits=CAP_SPEND
    )
    checked = []
    for org in [*GRANTS, PLANNED_ORG]:
        for cap in await guard.list_member_limits(org):
            checked.append((org, cap.member))
            spent = CAP_SPEND if (org, cap.member) in CAPS else 0
            assert cap.used in (0, spent) and cap.remaining == max(cap.credits - cap.used, 0), cap
            balance = await guard.get_balance(org)
            charged = await guard.deduct_credits(org, probe.feature_key, user_id=cap.member)
            fits = cap.remaining >= CAP_SPEND and balance >= CAP_SPEND
            assert charged.success is fits, (cap, balance, charged)
            if not fits and cap.remaining < CAP_SPEND:
                assert charged.error_code == "member_limit_reached", (cap, charged)
            after = await guard.get_member_usage(org, cap.member)
            assert after is not None and after.used == cap.used + (CAP_SPEND if fits else 0), after
    assert await guard.audit() == []
    return checked


async def assert_books_unchanged(guard: CreditGuard, balances: dict[str, int], ledger: list[dict[str, object]]) -> None:
    assert {org: await guard.get_balance(org) for org in GRANTS} == balances
    assert await ledger_rows(guard) == ledger
    assert await guard.audit() == []


def known_inputs_for(guard: CreditGuard) -> KnownInputs:
    async def known_inputs(label: str) -> list[dict[str, Any]]:
        pricing = await guard.list_pricing()
        plan_keys = [plan.plan_key for plan in await guard.list_plans()]
        if "{plan_key}" in label:
            return [{"path_parameters": {"plan_key": key}} for key in plan_keys]
        if label == SUBSCRIBE:
            return [
                {"path_parameters": {"organization_id": org}, "body": {"plan_key": key, "on_change": on_change}}
                for org in [*GRANTS, PLANNED_ORG]
                for key in plan_keys
                for on_change in ("expire", "keep")
            ]
        if label == f"PUT {MEMBERS}/{{member}}":
            return [
                {
                    "path_parameters": {"organization_id": org, "member": member},
                    "body": {"credits": credits, "per": per},
                }
                for org, member in [("org_rich", "ann"), ("org_spent", "bob"), ("org_poor", "cat")]
                for credits in (0, 7, 500)
                for per in ("day", "month", None)
            ]
        if label == f"DELETE {MEMBERS}/{{member}}":
            # ann's cap at org_rich is left to the PUTs: it is there, with the credits, to charge against after
            return [
                {"path_parameters": {"organization_id": org, "member": member}}
                for org, member in [("org_spent", "bob"), ("org_poor", "cat")]
            ]
        if label == f"PUT {TOPUP}":
            return [
                {"path_parameters": {"organization_id": org}, "body": {"below": below, "credits": credits}}
                for org in [*GRANTS, PLANNED_ORG]
                for below in (10, 2_000)  # under every balance, and over every one
                for credits in (1, 500)
            ]
        if "{pricing_id}" in label:
            return [{"path_parameters": {"pricing_id": p.id}} for p in pricing]
        if label == "GET /api/features/pricing":
            return [{"query": {"key": p.feature_key}} for p in pricing]
        if "{organization_id}" in label:
            return [{"path_parameters": {"organization_id": org}} for org in [*GRANTS, PLANNED_ORG]]
        if label == "GET /api/admin/usage":
            features = ["kling_image_to_video", "seedream_text_to_image"]
            return [{"query": {"org": org}} for org in GRANTS] + [{"query": {"feature": key}} for key in features]
        return []

    return known_inputs


async def load_schema(client: httpx.AsyncClient, url: str = "/openapi.json") -> schemathesis.BaseSchema:
    """The document the app serves (not the Python function behind it), with a config of
    its own so a schemathesis.toml lying around cannot change what runs."""
    served = await client.get(url)
    assert served.status_code == 200
    return schemathesis.openapi.from_dict(served.json(), config=schemathesis.Config.from_dict({}))


async def fuzz_admin_as_admin(
    guard: CreditGuard, keep: Callable[[Operation], bool], checks: list[CheckFunction] = CHECKS
) -> tuple[set[str], Counter[tuple[str, int]]]:
    """Fuzz the admin app's operations that ``keep`` selects, as an administrator; the
    labels of those operations, and how often each (operation, status) was answered."""
    app = admin_app(guard, is_admin=is_admin)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
        schema = await load_schema(client)
        failures, answered = await anyio.to_thread.run_sync(
            lambda: fuzz(
                schema, client.send, known_inputs_for(guard), headers={ROLE_HEADER: "admin"}, keep=keep, checks=checks
            )
        )
    assert not failures, "\n\n".join(failures)
    return {op.label for op in operations(schema, keep)}, answered


async def test_admin_api_conforms_to_its_openapi_document_and_moves_no_money(guard: CreditGuard) -> None:
    await setup_books(guard)
    await setup_plans(guard)
    await setup_topups(guard)
    await setup_members(guard)
    balances = {org: await guard.get_balance(org) for org in GRANTS}
    ledger = await ledger_rows(guard)
    subscription = await guard.subscription(PLANNED_ORG)
    fuzzed, answered = await fuzz_admin_as_admin(guard, keep=lambda op: op.label not in MONEY_WRITES)
    # The run was not vacuous: every operation succeeded at least once (the checks let a 401
    # or a 404 pass), and the writes were also refused for bad input at least once.
    labels = {label for label, _ in answered}
    assert labels == fuzzed and not labels & MONEY_WRITES
    assert all(any(200 <= status < 300 for lb, status in answered if lb == label) for label in labels), answered
    writes = (PRICING_WRITE, "PATCH /api/admin/feature-pricing/{pricing_id}", *PLAN_WRITES, f"PUT {TOPUP}")
    for write in (*writes, MEMBER_OPS[1]):
        assert answered[write, 422] > 0 and answered[write, 400] > 0, answered
    assert answered["GET /api/admin/organizations/{organization_id}/subscription", 404] > 0, answered
    assert all(answered[f"{method} {TOPUP}", 404] > 0 for method in ("GET", "DELETE")), answered
    assert answered[MEMBER_OPS[2], 204] > 0 and answered[MEMBER_OPS[2], 404] > 0, answered
    # Lines were set over balances, but no charge is registered here: nothing was bought.
    assert guard.topups.charge is None
    await anyio.sleep(0.2)  # the looks each line set started
    await guard.topups.run_once()
    await assert_books_unchanged(guard, balances, ledger)
    # Its plan may have been edited (from its next period) but neither deleted nor given another period.
    assert await guard.subscription(PLANNED_ORG) == subscription
    pro = await guard.get_plan("pro")
    assert pro is not None and pro.period == "month"
    dan = await guard.get_member_usage("org_exact", "dan")
    assert dan is not None and (dan.credits, dan.used, dan.remaining) == (10, 5, 5)
    assert {("org_rich", "ann"), ("org_exact", "dan")} <= set(await assert_caps_counted_and_enforced(guard))
    dan = await guard.get_member_usage("org_exact", "dan")  # its 5 left paid for one more image, exactly
    assert dan is not None and (dan.used, dan.remaining) == (10, 0) and await guard.get_balance("org_exact") == 10


async def test_fuzzed_grants_move_exactly_the_credits_the_ledger_shows(guard: CreditGuard) -> None:
    """The grant endpoint, fuzzed on its own: whatever it accepts lands as grant rows and
    nothing else (every balance moved by exactly its new grant rows, the books exact), and
    whatever it refuses moves nothing. Not checked here: that every schema-valid body is
    accepted, since an ``expires_at`` already past is valid JSON Schema and refused (422)."""
    balances, ledger = await setup_books(guard)
    _, answered = await fuzz_admin_as_admin(
        guard,
        keep=lambda op: op.label == GRANT_WRITE,
        checks=[check for check in CHECKS if check is not positive_data_acceptance],
    )
    assert answered[GRANT_WRITE, 201] > 0 and answered[GRANT_WRITE, 422] > 0, answered
    new_grants = [row for row in await ledger_rows(guard) if row not in ledger]
    assert {row["kind"] for row in new_grants} <= {"grant"}
    for org, before in balances.items():
        granted = sum(int(str(row["amount"])) for row in new_grants if row["organization_id"] == org)
        assert await guard.get_balance(org) - before == granted
    assert await guard.audit() == []


async def test_fuzzed_subscriptions_move_exactly_the_credits_the_ledger_shows(guard: CreditGuard) -> None:
    """Putting organizations on plans and ending them, fuzzed on their own: whatever is
    accepted lands as grant and expiry rows and nothing else (every balance moved by
    exactly its new rows, the books exact), each organization ends on at most one plan
    whose period under way is granted, and whatever is refused moves nothing."""
    await setup_books(guard)
    await setup_plans(guard)
    before = {org: await guard.get_balance(org) for org in [*GRANTS, PLANNED_ORG]}
    ledger = await ledger_rows(guard)
    _, answered = await fuzz_admin_as_admin(guard, keep=lambda op: op.label in (SUBSCRIBE, UNSUBSCRIBE))
    assert answered[SUBSCRIBE, 201] > 0 and answered[SUBSCRIBE, 200] > 0, answered
    assert answered[SUBSCRIBE, 404] > 0 and answered[SUBSCRIBE, 422] > 0, answered
    assert answered[UNSUBSCRIBE, 204] > 0 and answered[UNSUBSCRIBE, 404] > 0, answered
    assert answered[UNSUBSCRIBE, 422] > 0, answered
    new_rows = [row for row in await ledger_rows(guard) if row not in ledger]
    kinds = {row["kind"] for row in new_rows}
    assert "grant" in kinds and kinds <= {"grant", "expiry"}, new_rows
    for org in {str(row["organization_id"]) for row in new_rows} | set(before):
        moved = sum(int(str(row["amount"])) for row in new_rows if row["organization_id"] == org)
        assert await guard.get_balance(org) - before.get(org, 0) == moved, org
        subscription = await guard.subscription(org)
        if subscription is not None:  # the period under way is granted, and still live
            live = {grant.id for grant in await guard.list_grants(org)}
            assert subscription.period >= 0 and subscription.grant_id in live, subscription
    assert await guard.audit() == []


async def top_ups_settled(guard: CreditGuard, calls: list[tuple[str, int, str]]) -> None:
    """Wait until no top-up runs: no line 'running' and no new charge, twice in a row."""
    quiet = 0
    with anyio.fail_after(30):
        while quiet < 2:
            seen = len(calls)
            await anyio.sleep(0.1)
            await guard.topups.run_once()
            states = [await guard.auto_topup(org) for org in await guard.store.topup_lines()]
            running = any(topup is not None and topup.state == "running" for topup in states)
            quiet = quiet + 1 if not running and len(calls) == seen else 0


async def test_fuzzed_auto_topups_buy_only_through_the_apps_charge(guard: CreditGuard) -> None:
    """Auto top-ups fuzzed on their own, with the app's charge registered: a line set over a
    balance buys at once (a change arms it again, so each set may buy once more). Whatever
    is set, every credit moved is a grant that charge made, each under its own crossing's
    key, every balance moved by exactly those grants, the books exact; whatever is refused
    sets nothing."""
    balances, ledger = await setup_books(guard)
    await setup_topups(guard)
    calls: list[tuple[str, int, str]] = []

    async def charge(organization_id: str, credits: int, *, key: str) -> str:
        calls.append((organization_id, credits, key))
        await guard.grant_credits(organization_id, credits, reason="auto top-up", idempotency_key=key)
        return f"pi_{key}"

    guard.topups.register(charge)
    _, answered = await fuzz_admin_as_admin(guard, keep=lambda op: op.label in TOPUP_OPS)
    put, delete = f"PUT {TOPUP}", f"DELETE {TOPUP}"
    assert answered[put, 200] > 0 and answered[put, 422] > 0 and answered[put, 400] > 0, answered
    assert answered[delete, 204] > 0 and answered[delete, 404] > 0, answered
    await top_ups_settled(guard, calls)
    assert calls, "no line was set over a balance: the charge never ran"
    keys = [key for _, _, key in calls]
    assert len(keys) == len(set(keys)), calls  # one charge per crossing
    new_rows = [row for row in await ledger_rows(guard) if row not in ledger]
    assert new_rows and all(row["kind"] == "grant" and row["reason"] == "auto top-up" for row in new_rows), new_rows
    assert {row["idempotency_key"] for row in new_rows} <= set(keys)
    for org, before in balances.items():
        granted = sum(int(str(row["amount"])) for row in new_rows if row["organization_id"] == org)
        assert await guard.get_balance(org) - before == granted, org
    assert await guard.audit() == []


async def test_anonymous_fuzzing_is_refused_with_401_and_changes_nothing(guard: CreditGuard) -> None:
    """The same document, nobody signed in: every admin operation is a documented 401 (before
    any validation, so it says nothing about the input), public ones still answer, and
    neither the pricing nor the books change."""
    balances, ledger = await setup_books(guard)
    pricing = [p.to_dict() for p in await guard.list_pricing()]

    def refused_unless_public(operation: Operation, response: httpx.Response) -> None:
        if "public" not in (operation.tags or []):
            assert response.status_code == 401, f"{operation.label}: {response.status_code} {response.text}"

    app = admin_app(guard, is_admin=is_admin)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
        schema = await load_schema(client)
        failures, answered = await anyio.to_thread.run_sync(
            lambda: fuzz(
                schema,
                client.send,
                known_inputs_for(guard),
                headers={},
                modes=(GenerationMode.POSITIVE,),  # invalid input would be refused anyway
                max_examples=10,
                expect=refused_unless_public,
            )
        )
    assert not failures, "\n\n".join(failures)
    assert answered[PRICING_WRITE, 401] > 0, answered
    assert [p.to_dict() for p in await guard.list_pricing()] == pricing
    await assert_books_unchanged(guard, balances, ledger)


# -- the credit endpoints (/balance, /check, /grants, /usage) -------------------------------

CREDITS_PREFIX = "/api/credits"
ORG_HEADER = "x-fuzz-org"
#: Who asks: each funded organization, one that never had credits, and nobody (401).
ASKERS = [{ORG_HEADER: org} for org in GRANTS] + [{ORG_HEADER: "org_never_funded"}, {}]


def org_from_header(conn: HTTPConnection) -> str | None:
    """The host app's resolver, reduced to a header."""
    return conn.headers.get(ORG_HEADER)


def agrees_with_books(balances: dict[str, int]) -> Callable[[Operation, httpx.Response], None]:
    """Beyond the document: what each answer says must be true of the books, for the
    organization that asked (and only that one)."""
    active = {key: credits for key, (_, _, credits, is_active) in PRICES.items() if is_active}

    def expect(operation: Operation, response: httpx.Response) -> None:
        org = response.request.headers.get(ORG_HEADER)
        status = response.status_code
        assert response.headers["cache-control"] == "no-store", operation.label
        if org is None:
            assert status == 401, f"{operation.label}: {status} for nobody"
            return
        feature = response.request.url.params.get("feature")
        if status == 404:
            assert feature not in active, f"{operation.label}: 404 for the active {feature!r}"
        if status != 200:
            return
        credits = balances.get(org, 0)
        assert response.headers[HEADER_REMAINING] == str(credits), operation.label
        if operation.method == "head":
            return
        body = response.json()
        if operation.path == "/balance":
            assert body == {"organization_id": org, "credits": credits}
        elif operation.path == "/grants":
            assert body["organization_id"] == org
            assert sum(grant["remaining"] for grant in body["grants"]) == credits, body
        elif operation.path == "/usage":
            assert body["organization_id"] == org
            assert body["net_credits"] == sum(day["net_credits"] for day in body["days"]), body
            assert body["net_credits"] == sum(feature["net_credits"] for feature in body["features"]), body
            # Every account was funded today, so the window ends on today's balance.
            assert body["balance_history"][-1:] == (
                [{"day": body["last_day"], "balance": credits}] if org in GRANTS else []
            )
        else:
            assert feature in active, f"{operation.label}: 200 for {feature!r}, which has no active price"
            price = active[feature]
            assert body == {
                "feature": feature,
                "has_enough": credits >= price,
                "required": price,
                "available": credits,
            }

    return expect


async def test_credit_endpoints_conform_to_their_openapi_document_and_move_no_money(guard: CreditGuard) -> None:
    balances, ledger = await setup_books(guard)
    guard.organization_resolver = org_from_header
    app = Starlette(routes=[Mount(CREDITS_PREFIX, credit_endpoints(guard))])

    async def feature_keys(label: str) -> list[dict[str, Any]]:
        # Random keys only ever meet a 404; the seeded ones (active and not) reach the check.
        return [{"query": {"feature": key}} for key in PRICES] if label.endswith("/check") else []

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
        schema = await load_schema(client, f"{CREDITS_PREFIX}/openapi.json")
        assert schema.raw_schema["servers"] == [{"url": CREDITS_PREFIX}]
        failures, answered = await anyio.to_thread.run_sync(
            lambda: fuzz(
                schema,
                client.send,
                feature_keys,
                headers=st.sampled_from(ASKERS),
                base_url=BASE_URL + CREDITS_PREFIX,
                expect=agrees_with_books(balances),
            )
        )
    assert not failures, "\n\n".join(failures)
    # Not vacuous: every operation answered 200 and 401, and the check also 400 and 404.
    labels = {label for label, _ in answered}
    paths = ("/balance", "/check", "/grants", "/usage")
    assert labels == {f"{method} {path}" for method in ("GET", "HEAD") for path in paths}, answered
    assert all(answered[label, 200] > 0 and answered[label, 401] > 0 for label in labels), answered
    checks = ("GET /check", "HEAD /check")
    assert all(answered[label, status] > 0 for label in checks for status in (400, 404)), answered
    assert all(answered[label, 422] > 0 for label in ("GET /usage", "HEAD /usage")), answered
    await assert_books_unchanged(guard, balances, ledger)


async def test_every_organization_reads_every_price_as_the_books_say(guard: CreditGuard) -> None:
    """The pairs a random run may never draw, each once: every asker with every seeded
    feature (active, disabled) and the balance, through GET and HEAD, judged by the same
    document and the same books; org_exact meets the price it can just afford."""
    balances, ledger = await setup_books(guard)
    guard.organization_resolver = org_from_header
    expect = agrees_with_books(balances)
    app = Starlette(routes=[Mount(CREDITS_PREFIX, credit_endpoints(guard))])
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as client:
        schema = await load_schema(client, f"{CREDITS_PREFIX}/openapi.json")
        for operation in operations(schema):
            queries = [{"feature": key} for key in PRICES] if operation.path == "/check" else [{}]
            for query in queries:
                for asker in ASKERS:
                    case = operation.Case(query=query)
                    response = await client.send(to_httpx(case, asker, BASE_URL + CREDITS_PREFIX))
                    statuses[response.status_code] += 1
                    try:  # collected, not raised: a FailureGroup escaping an anyio test hides it
                        case.validate_response(response, checks=CHECKS)
                        expect(operation, response)
                    except (Exception, FailureGroup) as exc:
                        failures.append(f"{operation.label} {query} as {asker}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert statuses == {200: 2 * (len(GRANTS) + 1) * 5, 401: 2 * 6, 404: 2 * (len(GRANTS) + 1)}, statuses
    await assert_books_unchanged(guard, balances, ledger)
