"""Bad input gets a clear error, is logged, and loses nothing; it is never reported as a
database outage, and never served free (``fail_open`` included). Both databases."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anyio
import pytest
from sqlalchemy import insert
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from credit_guard import CreditGuard, CreditGuardMiddleware, InvalidPricing, current_ticket, requires_credits
from credit_guard._units import UNITS_PLACES, cost_of, units_value
from credit_guard.cli import main
from credit_guard.problems import TYPE_NO_ORGANIZATION
from credit_guard.schema import feature_pricing

from .conftest import ledger_rows
from .helpers import client

pytestmark = pytest.mark.anyio

IMAGE = "seedream_text_to_image"
#: What a careless auth layer may put on request state (an id decoded from a token, a header).
IDENTITIES = {
    "nul-org": ("org_1\x00evil", "user_9"),
    "surrogate-org": ("org_\udc80", "user_9"),
    "nul-user": ("org_1", "user\x00x"),
    "surrogate-user": ("org_1", "user_\ud800"),
}


class CarelessAuth:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            who = dict(scope["headers"]).get(b"x-who", b"").decode()
            state = scope.setdefault("state", {})
            state["organization_id"], state["user_id"] = IDENTITIES.get(who, ("org_1", "user_9"))
        await self.app(scope, receive, send)


async def ok(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def build(guard: CreditGuard, adapter: str) -> ASGIApp:
    if adapter == "decorator":
        app = Starlette(routes=[Route("/v1/images/{name}", requires_credits(IMAGE, guard=guard)(ok), methods=["POST"])])
        return CarelessAuth(app)
    inner = Starlette(routes=[Route("/v1/images/{name}", ok, methods=["POST"])])
    return CarelessAuth(CreditGuardMiddleware(inner, guard=guard, rules={"POST /v1/images/{name}": IMAGE}))


@pytest.mark.parametrize("adapter", ["decorator", "middleware"])
@pytest.mark.parametrize("who", sorted(IDENTITIES))
@pytest.mark.parametrize("fail_open", [False, True])
async def test_an_id_the_database_cannot_store_is_a_logged_401_never_a_503_or_free(
    db_url: str, guard: CreditGuard, adapter: str, who: str, fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    await guard.grant_credits("org_1", 10)
    async with CreditGuard(db_url, fail_open=fail_open) as serving, client(build(serving, adapter)) as http:
        r = await http.post("/v1/images/a", headers={"x-who": who})
        assert r.status_code == 401, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == TYPE_NO_ORGANIZATION
        assert "NUL characters or unpaired surrogates" in r.json()["detail"]
        assert "x-credits-charged" not in r.headers
        assert await serving.get_balance("org_1") == 10
    assert [row["kind"] for row in await ledger_rows(guard)] == ["grant"]
    assert any("refused" in m and "surrogates" in m for m in caplog.messages)


@pytest.mark.parametrize("adapter", ["decorator", "middleware"])
async def test_a_path_with_nul_or_a_lone_surrogate_is_charged_and_recorded_not_an_outage(
    guard: CreditGuard, adapter: str
) -> None:
    await guard.grant_credits("org_1", 10)
    async with client(build(guard, adapter)) as http:
        r = await http.post("/v1/images/a%00b%ED%B2%80")
        assert (r.status_code, r.headers.get("x-credits-remaining")) == (200, "5")
    await guard.flush()
    charge = (await ledger_rows(guard))[-1]
    assert charge["kind"] == "charge" and "\\x00" in str(charge["request_path"])
    assert await guard.audit() == []


async def test_the_engine_refuses_such_ids_with_a_value_error_before_any_statement(guard: CreditGuard) -> None:
    for bad in ("org\x00", "org_\udc80", ""):
        with pytest.raises(ValueError, match="organization_id"):
            await guard.grant_credits(bad, 5)
        with pytest.raises(ValueError, match="organization_id"):
            await guard.deduct_credits(bad, IMAGE)
        with pytest.raises(ValueError, match="organization_id"):
            await guard.get_balance(bad)
        with pytest.raises(ValueError, match="organization_id"):
            await guard.check_credits(bad, IMAGE)
    await guard.grant_credits("org_1", 10)
    with pytest.raises(ValueError, match="user_id"):
        await guard.deduct_credits("org_1", IMAGE, user_id="u\x00")
    with pytest.raises(ValueError, match="reason"):
        await guard.grant_credits("org_1", 5, reason="r\x00")
    # A feature key no pricing can have is "not found", answered without asking the database.
    assert (await guard.deduct_credits("org_1", "seedream\x00")).error_code == "feature_not_found"
    assert await guard.get_balance("org_1") == 10
    assert [row["kind"] for row in await ledger_rows(guard)] == ["grant"]


# -- units (item 10) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["1e-10000000", Decimal("1e-30000000"), "0E-1000000", 1e-300, "1.0000000000000000000000000001"]
)
def test_units_are_bounded_in_precision_before_any_arithmetic(value: Any) -> None:
    """The exact fraction pricing takes of the units has a denominator of at most 10**9:
    ``1e-10000000`` used to make it 10**10000000 (8 s of CPU per request; 1e-30000000, 47 s)."""
    units = units_value(value, allow_zero=True)
    assert units.as_integer_ratio()[1] <= 10**UNITS_PLACES
    assert cost_of(5, units) in (0, 1, 6)


@pytest.mark.parametrize(
    "value",
    ["1e+10000000", 10**100000, Decimal("1." + "0" * 100_000 + "1"), "9" * 41, "nan", "-inf", -1],
    ids=["huge-text", "huge-int", "long-decimal", "long-text", "nan", "-inf", "negative"],
)
def test_units_too_large_or_too_long_are_a_clear_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="units must be a number"):
        units_value(value)


def test_units_keep_their_meaning() -> None:
    assert cost_of(20, units_value("1.4")) == 28
    assert cost_of(20, units_value(0.1 + 0.2)) == 6  # float noise rounded to the nearest billionth
    assert cost_of(5, units_value("1.0000000000000000000000000001")) == 6  # written digits round up
    assert cost_of(20, units_value("1e-10000000")) == 1  # a fraction asked for is paid for
    assert units_value("0", allow_zero=True) == units_value(0, allow_zero=True) == 0


async def test_a_route_whose_units_are_absurdly_precise_is_charged_at_once(guard: CreditGuard) -> None:
    def tiny(request: Any) -> str:
        return "1e-10000000"

    async def video(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v", requires_credits(IMAGE, guard=guard, units=tiny)(video), methods=["POST"])])
    await guard.grant_credits("org_1", 10)
    async with client(CarelessAuth(app)) as http:
        r = await http.post("/v")
    assert (r.status_code, r.headers["x-credits-charged"]) == (200, "1")


@pytest.mark.parametrize("used", ["0", 0, Decimal(0), 0.0, "0.0"])
async def test_report_usage_of_zero_refunds_the_reserve_whatever_type_says_it(guard: CreditGuard, used: Any) -> None:
    async def video(request: Request) -> Response:
        ticket = current_ticket(request)
        assert ticket is not None
        ticket.report_usage(used)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v", requires_credits(IMAGE, guard=guard)(video), methods=["POST"])])
    await guard.grant_credits("org_1", 10)
    async with client(CarelessAuth(app)) as http:
        r = await http.post("/v")
    assert r.status_code == 200
    await guard.flush()
    assert await guard.get_balance("org_1") == 10
    assert [row["kind"] for row in await ledger_rows(guard)] == ["grant", "charge", "refund"]


# -- pricing labels and the CLI (item 12) -----------------------------------------------------


@pytest.mark.parametrize("name", ["Kling\x1b[31m", "two\nlines", "bidi\u202eevil"])
async def test_pricing_labels_with_control_characters_are_refused(guard: CreditGuard, name: str) -> None:
    with pytest.raises(InvalidPricing) as refused:
        await guard.create_pricing(feature_key="new_feature", feature_name=name, category="Images", credits=1)
    assert "control characters" in refused.value.errors["feature_name"]
    assert all(p.feature_key != "new_feature" for p in await guard.list_pricing())


def test_the_cli_shows_control_characters_escaped_never_raw(fresh_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A row written before names were checked (or by raw SQL) cannot forge table rows."""

    async def forge() -> int:
        async with CreditGuard(fresh_db) as guard:
            async with guard.engine.begin() as conn:
                row = {"id": "x1", "feature_key": "forged", "category": "C", "credits": 1}
                await conn.execute(insert(feature_pricing).values(**row, feature_name="A\x1b[2J\nforged_row  99  yes"))
            return len(await guard.list_pricing())

    rows = anyio.run(forge)
    capsys.readouterr()
    assert main(["--database-url", fresh_db, "pricing", "list"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "A\\x1b[2J\\nforged_row" in out
    assert len(out.splitlines()) == 1 + rows


def test_the_cli_refuses_an_empty_organization_for_balance_as_for_grant(
    fresh_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["balance", ""], ["grant", "", "5"]):
        capsys.readouterr()
        assert main(["--database-url", fresh_db, *command]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "organization_id must be a non-empty string" in err


@pytest.mark.parametrize(
    ("url", "write"),
    [
        ("postgresql://app@db/app", "postgresql+asyncpg://app@db/app"),
        ("postgres://app:secret@db/app", "postgresql+asyncpg://app:***@db/app"),
        ("sqlite:///app.db", "sqlite+aiosqlite:///app.db"),
    ],
)
def test_a_url_without_an_async_driver_says_which_url_to_write(
    url: str, write: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="write " + write.replace("+", r"\+").replace("*", r"\*")):
        CreditGuard(url)
    assert main(["--database-url", url, "balance", "org_1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and write in err and "secret" not in err
