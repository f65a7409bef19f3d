"""The pricing admin page, driven in a real headless Chromium against a real server.

A uvicorn subprocess serves the admin app under a tenant prefix (``/acme``) on the same
database as the ``guard`` fixture (SQLite and PostgreSQL), so every click is checked twice:
in the DOM the operator sees and in the rows the guard reads back.

The chart tests also write the documentation's pictures (``docs/images/admin-usage.png``,
``docs/images/admin-organization.png``) when $CREDIT_GUARD_DOCS_SCREENSHOTS=1
(``scripts/docs-screenshots`` runs just those tests so).

Needs Debian's ``chromium`` and the ``playwright`` package (never ``playwright install``):
``scripts/ci-system-deps`` installs Chromium, the dev extra playwright. Without them the tests skip, unless
$CREDIT_GUARD_REQUIRE_BROWSER is set, in which case they fail.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from credit_guard import CreditGuard, _clock
from credit_guard.models import Plan

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
DOCS_IMAGES = ROOT / "docs" / "images"
DOCS_SCREENSHOTS = os.environ.get("CREDIT_GUARD_DOCS_SCREENSHOTS", "") not in ("", "0")
CHROMIUM = os.environ.get("CREDIT_GUARD_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("CREDIT_GUARD_REQUIRE_BROWSER", "") not in ("", "0")
DB_ENV = "CREDIT_GUARD_ADMIN_PAGE_DB"
#: Set: the server's guard has the app's auto top-up charge registered (``demo_charge``).
CHARGE_ENV = "CREDIT_GUARD_ADMIN_PAGE_CHARGE"
TENANT = "/acme"
PAGE = TENANT + "/admin/feature-pricing"
ORG = "acme"


def _browser_problem() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or scripts/ci-system-deps)"
    return None


_PROBLEM = _browser_problem()
if _PROBLEM:
    if REQUIRE_BROWSER:
        raise RuntimeError(f"CREDIT_GUARD_REQUIRE_BROWSER is set but {_PROBLEM}")
    pytest.skip(_PROBLEM, allow_module_level=True)

from playwright.async_api import Dialog, Page, async_playwright, expect  # noqa: E402

# -- the app the browser talks to (imported by uvicorn in the subprocess) ---------------------


class DemoSession:
    """Stands in for the host app's auth: every request is an admin of organization ``acme``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            state = scope.setdefault("state", {})
            state["user"] = {"id": "ops", "is_admin": True}
            state["user_id"] = "ops"
            state["organization_id"] = ORG
        await self.app(scope, receive, send)


def demo_app() -> Starlette:
    """uvicorn --factory target: the real admin app, mounted under a tenant prefix."""
    from credit_guard.admin import admin_app

    guard = CreditGuard(os.environ[DB_ENV])
    if os.environ.get(CHARGE_ENV):
        guard.topups.register(demo_charge(guard))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with guard:
            yield

    app = Starlette(routes=[Mount(TENANT, app=admin_app(guard))], lifespan=lifespan)
    app.add_middleware(DemoSession)
    return app


def demo_charge(guard: CreditGuard) -> Callable[..., Awaitable[str]]:
    """The app's auto top-up charge, as an app registers it: pays (here, always) and grants,
    once per crossing's key."""

    async def charge(organization_id: str, credits: int, *, key: str) -> str:
        await guard.grant_credits(organization_id, credits, reason="auto top-up", idempotency_key=key)
        return f"pi_{key}"

    return charge


# -- fixtures -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def server(db_url: str, guard: CreditGuard, tmp_path: Path) -> AsyncIterator[str]:
    """A uvicorn subprocess on the guard's database; yields its base URL."""
    async with serve(db_url, tmp_path) as base:
        yield base


@pytest.fixture
async def charging_server(db_url: str, guard: CreditGuard, tmp_path: Path) -> AsyncIterator[str]:
    """The same, with the app's auto top-up charge registered in the server's process."""
    async with serve(db_url, tmp_path, {CHARGE_ENV: "1"}) as base:
        yield base


@asynccontextmanager
async def serve(db_url: str, tmp_path: Path, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """``demo_app`` in a uvicorn subprocess on ``db_url``, with ``env`` added to its environment."""
    port = _free_port()
    log_path = tmp_path / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "--factory", "tests.test_admin_page:demo_app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = await anyio.open_process(
            command, cwd=ROOT, env={**os.environ, DB_ENV: db_url, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(30):
                while True:  # readiness, not an assertion: wait until the server answers
                    if proc.returncode is not None:
                        pytest.fail(f"uvicorn exited with {proc.returncode}:\n{log_path.read_text()}")
                    try:
                        if (await client.get(base + PAGE)).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        with anyio.move_on_after(10) as waited:
            await proc.wait()
        if waited.cancelled_caught:
            proc.kill()
            await proc.wait()


@dataclass
class Browser:
    page: Page
    base: str
    errors: list[str] = field(default_factory=list)
    answers: list[Callable[[Dialog], Awaitable[None]]] = field(default_factory=list)

    def on_next_dialog(self, answer: Callable[[Dialog], Awaitable[None]]) -> None:
        """Queues the answer to the page's next dialog.

        One listener answers every dialog in the order they come, so a dialog whose event
        arrives late can't reach two answers at once (``page.once`` twice could, and did:
        both handlers got the first dialog). A dialog nobody queued an answer for is dismissed.
        """
        self.answers.append(answer)

    async def _answer(self, dialog: Dialog) -> None:
        if self.answers:
            await self.answers.pop(0)(dialog)
        else:
            await dialog.dismiss()

    async def open(self) -> None:
        await self.page.goto(self.base + PAGE)
        await expect(self.page.locator("#feature-list")).to_have_attribute("data-loaded", "true")

    @property
    def form(self) -> Any:
        return self.page.locator("#feature-form")

    def row(self, key: str) -> Any:
        return self.page.locator(f'.feature[data-key="{key}"]')

    async def screenshot(self, name: str, guard: CreditGuard, *, of: str | None = None, **kwargs: Any) -> None:
        """An artifact for a human to look at (artifacts/screenshots/, gitignored); asserts nothing."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = str(SCREENSHOTS / f"{name}-{guard.engine.dialect.name}.png")
        if of is None:
            await self.page.screenshot(path=path, **kwargs)
        else:
            await self.page.locator(of).screenshot(path=path, **kwargs)

    async def docs_picture(self, name: str, *, of: str | None = None) -> None:
        """With $CREDIT_GUARD_DOCS_SCREENSHOTS=1, a picture for the docs: docs/images/{name}.png."""
        if not DOCS_SCREENSHOTS:
            return
        path = str(DOCS_IMAGES / f"{name}.png")
        if of is None:
            await self.page.screenshot(path=path)
            return
        # the element and a margin of page around it, in page coordinates, with the sticky
        # top bar back at the top of the page, out of the way
        await self.page.evaluate("window.scrollTo(0, 0)")
        box = await self.page.locator(of).evaluate(
            "e => { const r = e.getBoundingClientRect(); return {x: r.left + scrollX, y: r.top + scrollY,"
            " width: r.width, height: r.height}; }"
        )
        pad = 20
        clip = {"x": max(box["x"] - pad, 0), "y": max(box["y"] - pad, 0)}
        clip.update(width=box["width"] + 2 * pad, height=box["height"] + 2 * pad)
        await self.page.screenshot(path=path, clip=clip, full_page=True)


@asynccontextmanager
async def browser_at(base: str, *, width: int = 1280, height: int = 900) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            context = await chromium.new_context(viewport={"width": width, "height": height}, color_scheme="light")
            await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
            page = await context.new_page()
            session = Browser(page, base)
            page.on("dialog", session._answer)
            # Script errors and CSP refusals fail the test; a 4xx the page asked for does not.
            page.on("pageerror", lambda exc: session.errors.append(f"pageerror: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    session.errors.append(f"console: {msg.text}")
                    if msg.type == "error" and not msg.text.startswith("Failed to load resource")
                    else None
                ),
            )
            yield session
            assert session.errors == []
        finally:
            await chromium.close()


@pytest.fixture
async def browser(server: str) -> AsyncIterator[Browser]:
    async with browser_at(server) as session:
        yield session


async def by_key(guard: CreditGuard, key: str) -> dict[str, Any] | None:
    for pricing in await guard.list_pricing():
        if pricing.feature_key == key:
            return pricing.to_dict()
    return None


# -- the tests ----------------------------------------------------------------------------------


async def test_operator_adds_copies_edits_toggles_and_deletes_a_feature(guard: CreditGuard, browser: Browser) -> None:
    page, form = browser.page, browser.form
    await browser.open()
    # the seeded pricing is grouped by category, server-rendered and then live
    await expect(page.locator('.group[data-category="Video Generation"] .feature-name')).to_have_text(
        ["Kling Image to Video"]
    )
    await expect(page.locator("#summary")).to_have_text("3 features · 3 categories · 1 inactive")

    # add
    await form.get_by_label("Feature Key").fill("flux_upscale")
    await form.get_by_label("Feature Name").fill("Flux Upscale")
    await form.get_by_label("Category").fill("Image Generation")
    await form.get_by_label("Credits").fill("7")
    await form.get_by_label("Description").fill("4x upscale, <b>fast</b>")
    await page.get_by_role("button", name="Add feature").click()
    row = page.locator('.group[data-category="Image Generation"]').locator('.feature[data-key="flux_upscale"]')
    await expect(row.locator(".feature-name")).to_have_text("Flux Upscale")
    await expect(row.locator(".credits-num")).to_have_text("7")
    await expect(row.locator(".feature-desc")).to_have_text("4x upscale, <b>fast</b>")  # shown, not parsed
    await expect(row.locator("b")).to_have_count(0)
    await expect(form.get_by_label("Feature Key")).to_have_value("")  # the form is ready for the next one
    stored = await by_key(guard, "flux_upscale")
    assert stored is not None
    assert (stored["feature_name"], stored["category"], stored["credits"], stored["is_active"]) == (
        "Flux Upscale",
        "Image Generation",
        7,
        True,
    )
    assert stored["description"] == "4x upscale, <b>fast</b>"
    assert await row.get_attribute("data-id") == stored["id"]
    await browser.screenshot("admin-pricing", guard, full_page=True)

    # copy the key
    copy = row.get_by_role("button", name="Copy feature key flux_upscale")
    await copy.click()
    await expect(copy).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == "flux_upscale"

    # edit
    await row.get_by_role("button", name="Edit Flux Upscale").click()
    await expect(page.locator("#form-title")).to_have_text("Edit feature")
    await expect(form.get_by_label("Feature Name")).to_have_value("Flux Upscale")
    await form.get_by_label("Credits").fill("12")
    await browser.screenshot("admin-pricing-edit", guard)
    await page.get_by_role("button", name="Save changes").click()
    await expect(row.locator(".credits-num")).to_have_text("12")
    await expect(page.locator("#form-title")).to_have_text("Add feature")
    assert (await guard.get_pricing(stored["id"])).credits == 12  # type: ignore[union-attr]

    # toggle active off: the operator is asked first; declining changes nothing
    switch = row.get_by_role("switch")
    await expect(switch).to_have_attribute("aria-checked", "true")
    toggled: list[str] = []

    async def decline(dialog: Dialog) -> None:
        toggled.append(dialog.message)
        await dialog.dismiss()

    browser.on_next_dialog(decline)
    await switch.click()
    await expect(page.locator("#toast")).to_contain_text("stays active")
    await expect(switch).to_have_attribute("aria-checked", "true")
    assert (await guard.get_pricing(stored["id"])).is_active is True  # type: ignore[union-attr]

    async def confirm(dialog: Dialog) -> None:
        toggled.append(dialog.message)
        await dialog.accept()

    browser.on_next_dialog(confirm)
    await switch.click()
    await expect(switch).to_have_attribute("aria-checked", "false")
    assert len(toggled) == 2 and all("Deactivate" in m and "flux_upscale" in m for m in toggled)
    await expect(row).to_have_class(re.compile(r"\bis-inactive\b"))
    await expect(row.locator('[data-slot="inactive-badge"]')).to_be_visible()
    await expect(page.locator("#summary")).to_have_text("4 features · 3 categories · 2 inactive")
    assert (await guard.get_pricing(stored["id"])).is_active is False  # type: ignore[union-attr]

    # delete, confirming the browser's dialog
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    browser.on_next_dialog(accept)
    await row.get_by_role("button", name="Delete Flux Upscale").click()
    await expect(page.locator('.feature[data-key="flux_upscale"]')).to_have_count(0)
    assert len(asked) == 1 and "Flux Upscale" in asked[0] and "flux_upscale" in asked[0]
    assert await guard.get_pricing(stored["id"]) is None
    assert await by_key(guard, "flux_upscale") is None


async def test_declined_confirmation_deletes_nothing(guard: CreditGuard, browser: Browser) -> None:
    page = browser.page
    await browser.open()
    methods: list[str] = []
    page.on("request", lambda request: methods.append(request.method))

    async def dismiss(dialog: Dialog) -> None:
        await dialog.dismiss()

    browser.on_next_dialog(dismiss)
    await browser.row("seedream_text_to_image").get_by_role("button", name="Delete SeeDream Text to Image").click()
    # a later change round-trips, so a DELETE sent on dismissal would have been seen before it
    switch = browser.row("kling_image_to_video").get_by_role("switch")

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    browser.on_next_dialog(accept)
    await switch.click()
    await expect(switch).to_have_attribute("aria-checked", "false")
    assert "DELETE" not in methods and "PATCH" in methods
    await expect(browser.row("seedream_text_to_image")).to_have_count(1)
    assert await by_key(guard, "seedream_text_to_image") is not None


async def test_api_validation_errors_appear_next_to_their_fields(guard: CreditGuard, browser: Browser) -> None:
    page, form = browser.page, browser.form
    await browser.open()
    before = await guard.list_pricing()

    await form.get_by_label("Feature Key").fill("Bad Key!")
    await form.get_by_label("Category").fill("Image Generation")
    await form.get_by_label("Credits").fill("2.5")
    await page.get_by_role("button", name="Add feature").click()

    key_error = page.locator('.field[data-field="feature_key"] .error')
    await expect(key_error).to_contain_text("lowercase")
    await expect(page.locator('.field[data-field="feature_name"] .error')).to_be_visible()
    await expect(page.locator('.field[data-field="credits"] .error')).to_contain_text("integer")
    await expect(page.locator('.field[data-field="category"] .error')).to_be_hidden()
    await expect(form.get_by_label("Feature Key")).to_have_attribute("aria-invalid", "true")
    await expect(form.get_by_label("Feature Key")).to_be_focused()  # the first bad field
    await browser.screenshot("admin-pricing-errors", guard)
    assert await guard.list_pricing() == before

    # a key that is taken: 409, shown on the key field
    await form.get_by_label("Feature Key").fill("seedream_text_to_image")
    await expect(key_error).to_be_hidden()  # typing clears the field's error
    await form.get_by_label("Feature Name").fill("Duplicate")
    await form.get_by_label("Credits").fill("3")
    await page.get_by_role("button", name="Add feature").click()
    await expect(key_error).to_be_visible()
    await expect(key_error).to_contain_text(re.compile(r"exist|taken|duplicate", re.I))
    await expect(page.locator('.field[data-field="credits"] .error')).to_be_hidden()
    await expect(browser.row("seedream_text_to_image")).to_have_count(1)
    assert await guard.list_pricing() == before


async def test_operator_prices_a_feature_in_a_credit_pool_and_grants_that_pools_credits(
    guard: CreditGuard, browser: Browser
) -> None:
    page, form = browser.page, browser.form
    await browser.open()
    await form.get_by_label("Feature Key").fill("sora_clip")
    await form.get_by_label("Feature Name").fill("Sora Clip")
    await form.get_by_label("Category").fill("Video Generation")
    await form.get_by_label("Credits").fill("10")
    await form.get_by_label("Credit pool").fill("Video!")  # the API's rule, shown next to the field
    await page.get_by_role("button", name="Add feature").click()
    await expect(page.locator('.field[data-field="pool"] .error')).to_contain_text("lowercase")
    assert await by_key(guard, "sora_clip") is None
    await form.get_by_label("Credit pool").fill("video")
    await form.get_by_label("Fall back to the general pool").check()
    await page.get_by_role("button", name="Add feature").click()
    row = browser.row("sora_clip")
    await expect(row.locator('[data-slot="pool-badge"]')).to_have_text("pool video (then general)")
    stored = await by_key(guard, "sora_clip")
    assert stored is not None and (stored["pool"], stored["pool_fallback"]) == ("video", True)
    await expect(browser.row("seedream_text_to_image").locator('[data-slot="pool-badge"]')).to_be_hidden()

    await row.get_by_role("button", name="Edit Sora Clip").click()
    await expect(form.get_by_label("Credit pool")).to_have_value("video")
    await form.get_by_label("Fall back to the general pool").uncheck()
    await page.get_by_role("button", name="Save changes").click()
    await expect(row.locator('[data-slot="pool-badge"]')).to_have_text("pool video")
    stored = await by_key(guard, "sora_clip")
    assert stored is not None and (stored["pool"], stored["pool_fallback"]) == ("video", False)

    await guard.grant_credits("acme", 5)
    await page.goto(browser.base + TENANT + "/admin/organizations")
    await expect(page.locator("#results")).to_have_attribute("data-loaded", "true")
    page = await open_organization(browser, "acme")
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    browser.on_next_dialog(accept)
    await page.get_by_label("Amount").fill("30")
    await page.get_by_label("Credit pool (optional: general)").fill("video")
    await page.get_by_role("button", name="Grant", exact=True).click()
    await expect(page.locator("#org-balance")).to_have_text("35")
    await expect(page.locator("#org-pools")).to_have_text("· of which video 30")
    await expect(page.locator("#grants tbody tr").first.locator("td").last).to_have_text("video")  # spent first
    assert asked == ["Grant 30 video credits to acme?"]
    assert await guard.get_pool_balances("acme") == {None: 5, "video": 30}
    clip = await guard.deduct_credits("acme", "sora_clip")
    assert clip.success and clip.remaining_credits == 20 and clip.pool == "video"
    assert await guard.audit() == []


#: Organizations charged in the chart tests; one id is markup, to be shown as typed (no "/":
#: the organization routes take the id as one path segment).
HOSTILE_ORG = "<img src=x onerror=__pwned=1>"
CHART_ORGS = [ORG, "org_b", "org_c", HOSTILE_ORG, "org_d", "org_e", "org_f"]


async def seed_three_days(guard: CreditGuard) -> list[str]:
    """Charges on three UTC days (two days ago, yesterday, today) for two features and seven
    organizations (so the per-organization chart has its "others"); returns the three days.
    The ledger's created_at follows the library's clock, so moving it back seeds the past."""
    seedream, kling = "seedream_text_to_image", "kling_image_to_video"
    plan = [
        [(ORG, seedream), (ORG, seedream), (ORG, kling), ("org_b", kling)],
        [("org_c", seedream), ("org_c", seedream), ("org_c", seedream), (HOSTILE_ORG, kling), (ORG, seedream)],
        [("org_d", seedream), ("org_e", seedream), ("org_f", kling), (ORG, kling)],
    ]
    try:
        _clock.travel(timedelta(days=-2))
        for org in CHART_ORGS:
            await guard.grant_credits(org, 500)
        for n, charges in enumerate(plan):
            if n:
                _clock.travel(timedelta(days=1))
            results = [await guard.deduct_credits(org, key) for org, key in charges]
            assert all(r.success for r in results)
            if n == 1:  # yesterday acme's last image was refunded
                assert (await guard.refund_credits(results[-1].charge_id)).refunded  # type: ignore[arg-type]
    finally:
        _clock.reset_travel()
    today = datetime.now(UTC).date()
    return [str(today - timedelta(days=n)) for n in (2, 1, 0)]


async def chart_data(page: Page, selector: str) -> dict[str, Any]:
    """What a chart shows: its series and totals, and the numbers in its (hidden) table."""
    chart = page.locator(selector)
    await expect(chart).to_have_attribute("data-state", "drawn")
    await expect(chart.locator("canvas").first).to_be_attached()  # uPlot drew it
    table: list[list[str]] = await chart.locator("table.chart-table tbody tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells, c => c.textContent))"
    )
    return {
        "series": json.loads(await chart.get_attribute("data-series") or "null"),
        "totals": json.loads(await chart.get_attribute("data-totals") or "null"),
        "head": await chart.locator("table.chart-table thead th").all_text_contents(),
        "rows": table,
        "legend": await chart.locator(".u-legend .u-series .u-label").all_text_contents(),
    }


async def eventually(page: Page, expression: str, seconds: float = 5) -> None:
    """Until ``expression`` is true in the page. Not ``wait_for_function``: its polling evaluates
    a string, which the page's CSP (no 'unsafe-eval') refuses; ``evaluate`` is not affected."""
    with anyio.fail_after(seconds):
        while True:
            if await page.evaluate(expression):
                return
            await anyio.sleep(0.05)


def biggest_first(totals: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))


async def test_usage_charts_show_what_the_ledger_says(guard: CreditGuard, server: str) -> None:
    days = await seed_three_days(guard)
    per_feature = {r.key: r.net_credits for r in await guard.usage_report(group_by="feature")}
    per_org = {r.key: r.net_credits for r in await guard.usage_report(group_by="org")}
    assert per_feature == {"seedream_text_to_image": 35, "kling_image_to_video": 100}
    assert per_org == {ORG: 50, "org_b": 20, "org_c": 15, HOSTILE_ORG: 20, "org_d": 5, "org_e": 5, "org_f": 20}
    day_feature = {(r.key, r.split): r.net_credits for r in await guard.usage_report(split_by="feature")}
    day_org = {(r.key, r.split): r.net_credits for r in await guard.usage_report(split_by="org")}

    async with browser_at(server) as browser:
        page = browser.page
        await browser.open()

        # (a) credits per day per feature: a series per feature, biggest first, 30 days, 0 where nothing
        by_feature = await chart_data(page, "#chart-day-feature")
        features = [key for key, _ in biggest_first(per_feature)]
        assert by_feature["series"] == features == ["kling_image_to_video", "seedream_text_to_image"]
        assert by_feature["totals"] == [per_feature[key] for key in features]
        assert by_feature["head"] == ["Day", *features]
        assert by_feature["legend"] == ["Day", *features]
        await expect(page.locator("#chart-day-feature")).to_have_attribute("data-days", "30")
        assert len(by_feature["rows"]) == 30 and by_feature["rows"][-1][0] == days[-1]
        shown = {row[0]: [int(v) for v in row[1:]] for row in by_feature["rows"]}
        for day, values in shown.items():
            assert values == [day_feature.get((day, key), 0) for key in features], day
        assert shown[days[1]] == [20, 15]  # yesterday: one video; three images and a refunded one

        # (b) credits per day per organization: the top 5, then the other two summed
        by_org = await chart_data(page, "#chart-day-org")
        ranked = biggest_first(per_org)
        top = [org for org, _ in ranked[:5]]
        assert top == [ORG, HOSTILE_ORG, "org_b", "org_f", "org_c"]  # ties by id
        assert by_org["series"] == [*top, "Others (2)"]
        assert by_org["totals"] == [per_org[o] for o in top] + [per_org["org_d"] + per_org["org_e"]]
        assert by_org["legend"] == ["Day", *top, "Others (2)"]  # the markup id as text, not as markup
        await expect(page.locator('#chart-day-org img[src="x"]')).to_have_count(0)
        assert await page.evaluate("window.__pwned") is None
        for row in by_org["rows"]:
            day = row[0]
            others = day_org.get((day, "org_d"), 0) + day_org.get((day, "org_e"), 0)
            assert [int(v) for v in row[1:]] == [day_org.get((day, o), 0) for o in top] + [others], day

        # (c) top features: one bar each, biggest first
        top_features = await chart_data(page, "#chart-feature")
        assert top_features["series"] == features and top_features["totals"] == [100, 35]
        assert top_features["rows"] == [["kling_image_to_video", "100"], ["seedream_text_to_image", "35"]]

        # the cards still add it up
        await expect(page.locator('[data-stat="net_credits"]')).to_have_text("135")
        await expect(page.locator('[data-stat="credits_refunded"]')).to_have_text("5")
        await expect(page.locator('[data-stat="charges"]')).to_have_text("13")
        await page.locator("#usage").scroll_into_view_if_needed()
        await browser.screenshot("admin-usage", guard, of="#usage")
        await browser.docs_picture("admin-usage", of="#usage")

        # the range is a query: a 7-day window redraws with 7 days
        await page.get_by_label("Range").select_option("7")
        await expect(page.locator("#chart-day-feature")).to_have_attribute("data-days", "7")
        await expect(page.locator("#chart-day-feature table.chart-table tbody tr")).to_have_count(7)

        # on a phone the charts shrink to their cards and nothing scrolls sideways
        await page.set_viewport_size({"width": 390, "height": 844})
        for chart in ("#chart-day-feature", "#chart-day-org", "#chart-feature"):
            fits = f"document.querySelector('{chart} canvas').getBoundingClientRect().right <= window.innerWidth"
            await eventually(page, fits)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await browser.screenshot("admin-usage-narrow", guard, of="#usage")


async def test_usage_charts_say_so_when_nothing_was_charged(guard: CreditGuard, browser: Browser) -> None:
    page = browser.page
    await browser.open()
    for chart in ("#chart-day-feature", "#chart-day-org", "#chart-feature"):
        await expect(page.locator(chart)).to_have_attribute("data-state", "empty")
        await expect(page.locator(chart).locator(".chart-empty")).to_have_text("No charges in this range")
        await expect(page.locator(chart)).to_have_attribute("data-series", "[]")
    await expect(page.locator('[data-stat="net_credits"]')).to_have_text("0")


async def test_organization_page_charts_its_balance_history(guard: CreditGuard, server: str) -> None:
    days = await seed_three_days(guard)
    history = [(p.day.isoformat(), p.balance) for p in await guard.balance_history(ORG)]
    assert history == [(days[0], 470), (days[1], 470), (days[2], 450)]  # yesterday: charged 5, refunded 5

    async with browser_at(server) as browser:
        page = browser.page
        await page.goto(browser.base + TENANT + "/admin/organizations")
        await expect(page.locator("#results")).to_have_attribute("data-loaded", "true")
        await page.get_by_role("button", name=ORG, exact=True).click()
        await expect(page.locator("#org-name")).to_have_text(ORG)
        chart = await chart_data(page, "#chart-balance")
        assert chart["series"] == ["Balance"] and chart["totals"] == [await guard.get_balance(ORG)]
        assert [(day, int(balance)) for day, balance in chart["rows"]] == history
        await expect(page.locator("#chart-balance")).to_have_attribute("data-points", "3")
        await expect(page.locator("#chart-balance")).to_have_attribute("data-org", ORG)
        await browser.screenshot("admin-organization", guard)
        await browser.docs_picture("admin-organization")

        # another organization, markup for an id: its own history, its id shown as text
        await page.get_by_role("button", name=HOSTILE_ORG, exact=True).click()
        await expect(page.locator("#chart-balance")).to_have_attribute("data-org", HOSTILE_ORG)
        hostile = await chart_data(page, "#chart-balance")
        expected = [[p.day.isoformat(), str(p.balance)] for p in await guard.balance_history(HOSTILE_ORG)]
        assert hostile["rows"] == expected == [[days[0], "500"], [days[1], "480"]]
        caption = page.locator("#chart-balance table.chart-table caption")
        await expect(caption).to_contain_text(HOSTILE_ORG)
        await expect(page.locator('img[src="x"]')).to_have_count(0)
        assert await page.evaluate("window.__pwned") is None

        # a grant moves today's point
        browser.on_next_dialog(lambda dialog: dialog.accept())
        await page.get_by_label("Amount").fill("30")
        await page.get_by_role("button", name="Grant", exact=True).click()
        await expect(page.locator("#org-balance")).to_have_text("510")
        await expect(page.locator("#chart-balance table.chart-table tbody tr").last).to_have_text(
            re.compile(rf"^{days[2]}\s*510$")
        )
        assert [p.balance for p in await guard.balance_history(HOSTILE_ORG)] == [500, 480, 510]


async def top_bar(page: Page) -> list[str]:
    """The top bar's brand, links and tenant, after checking that each is whole on the
    screen (not cut, not under its neighbour): their texts, in order."""
    boxes = await page.evaluate(
        "Array.from(document.querySelectorAll('.topbar .brand, .nav a, .tenant'), e => {"
        " const r = e.getBoundingClientRect();"
        " return [e.textContent.trim(), r.left, r.right, e.scrollWidth <= e.clientWidth]; })"
    )
    width = await page.evaluate("window.innerWidth")
    assert all(0 <= left < right <= width and whole for _, left, right, whole in boxes), boxes
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(boxes)), boxes
    return [text for text, *_ in boxes]


async def test_user_text_is_escaped_and_the_page_fits_a_phone(guard: CreditGuard, server: str) -> None:
    hostile = await guard.create_pricing(
        feature_key="xss_probe",
        feature_name='<img src=x onerror="window.__pwned=1">',
        category="<b>Ops</b>",
        credits=1,
        description="<script>window.__pwned=2</script>",
    )
    async with httpx.AsyncClient() as client:
        response = await client.get(server + PAGE)
    assert response.status_code == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in response.text
    assert "<img src=x" not in response.text and "<script>window" not in response.text
    # the CSS and JS are linked under the tenant prefix, and served there
    assets = re.findall(r'(?:href|src)="([^"]+\.(?:css|js)\?v=\w+)"', response.text)
    assert sorted(a.split("?")[0] for a in assets) == [
        TENANT + "/admin/static/admin.css",
        TENANT + "/admin/static/admin.js",
        TENANT + "/admin/static/charts.js",
        TENANT + "/admin/static/vendor/uPlot.iife.min.js",
        TENANT + "/admin/static/vendor/uPlot.min.css",
    ]
    async with httpx.AsyncClient() as client:
        for asset in assets:
            assert (await client.get(server + asset)).status_code == 200, asset

    async with browser_at(server, width=390, height=844) as browser:
        page = browser.page
        await browser.open()
        row = browser.row("xss_probe")
        await expect(row.locator(".feature-name")).to_have_text(hostile.feature_name)
        await expect(row.locator(".feature-desc")).to_have_text("<script>window.__pwned=2</script>")
        await expect(page.locator('.group[data-category="<b>Ops</b>"] .group-name')).to_have_text("<b>Ops</b>")
        assert await page.evaluate("window.__pwned") is None
        assert await page.locator('img[src="x"]').count() == 0
        # nothing wider than the phone: no sideways scrolling
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        # the nav reaches the organizations view, its link whole on the screen ("Orgs" on a phone)
        organizations = page.get_by_role("navigation").get_by_role("link", name="Organizations")
        await expect(organizations).to_be_visible()
        await expect(organizations.locator(".nav-short")).to_have_text("Orgs")
        await expect(organizations.locator(".nav-short")).to_be_visible()
        await expect(organizations.locator(".nav-long")).to_be_hidden()
        await expect(organizations).to_have_attribute("href", TENANT + "/admin/organizations")
        box = await organizations.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        assert await top_bar(page) == [
            "credit_guardadmin",
            "Pricing",
            "Usage",
            "Plans",
            "OrganizationsOrgs",
            "Tenant acme",
        ]
        await browser.screenshot("admin-pricing-narrow", guard, full_page=True)
        await organizations.click()
        await expect(page.locator("#results")).to_have_attribute("data-loaded", "true")
        back = page.get_by_role("navigation").get_by_role("link", name="Pricing")
        await expect(back).to_have_attribute("href", TENANT + "/admin/feature-pricing")
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert await top_bar(page) == ["credit_guardadmin", "Pricing", "Usage", "Plans", "OrganizationsOrgs"]


async def test_operator_finds_an_organization_and_grants_credits_with_a_confirmation(
    guard: CreditGuard, browser: Browser
) -> None:
    from datetime import UTC, datetime, timedelta

    page = browser.page
    await guard.grant_credits("acme", 40, reason="Pro plan", expires_at=datetime.now(UTC) + timedelta(days=30))
    await guard.grant_credits("acme-labs", 7, reason="<b>promo</b>")
    assert (await guard.reserve("acme", "kling_image_to_video", job_id="vid_42", ttl=600)).success
    await page.goto(browser.base + TENANT + "/admin/organizations")
    await expect(page.locator("#results")).to_have_attribute("data-loaded", "true")
    await page.get_by_label("Find an organization (id starts with)").fill("acme-")
    await page.get_by_role("button", name="Find").click()
    await expect(page.locator("#results button")).to_have_text(["acme-labs"])
    await page.get_by_role("button", name="acme-labs").click()
    await expect(page.locator("#org-name")).to_have_text("acme-labs")
    await expect(page.locator("#grants tbody td").first).to_have_text("<b>promo</b>")  # shown, not parsed

    await page.get_by_label("Find an organization (id starts with)").fill("acme")
    await page.get_by_role("button", name="Find").click()
    await page.get_by_role("button", name="acme", exact=True).click()
    await expect(page.locator("#org-name")).to_have_text("acme")
    await expect(page.locator("#org-balance")).to_have_text("20")
    await expect(page.locator("#reservations tbody tr")).to_have_count(1)
    await expect(page.locator("#reservations tbody td").first).to_have_text("vid_42")
    await expect(page.locator("#ledger tbody tr")).to_have_count(2)

    # declining the confirmation grants nothing
    asked: list[str] = []

    async def decline(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    browser.on_next_dialog(decline)
    await page.get_by_label("Amount").fill("15")
    await page.get_by_label("Reason").fill("support ticket 4711")
    await page.get_by_role("button", name="Grant", exact=True).click()
    await expect(page.locator("#status")).to_have_text("Nothing granted.")
    assert await guard.get_balance("acme") == 20

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="Grant", exact=True).click()
    await expect(page.locator("#org-balance")).to_have_text("35")
    await expect(page.locator("#status")).to_contain_text("Granted 15 credits to acme")
    assert asked == ["Grant 15 credits to acme?"] * 2
    assert await guard.get_balance("acme") == 35
    assert [g.reason for g in await guard.list_grants("acme")] == ["Pro plan", "support ticket 4711"]
    await browser.screenshot("admin-organizations", guard, full_page=True)
    assert await guard.audit() == []


# -- plans --------------------------------------------------------------------------------------

PLANS_PAGE = TENANT + "/admin/plans"


def utc_minute(when: datetime) -> str:
    """A timestamp as the pages show it: ``2026-02-08 12:00 UTC``."""
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


async def plan_rows_fit(page: Page) -> list[bool]:
    """For each plan row: its parts (name and terms, amount, subscribers, buttons) are whole
    on the screen and none lies over another."""
    fits: list[bool] = await page.evaluate(
        "Array.from(document.querySelectorAll('.plan'), li => {"
        " const boxes = ['.feature-main', '.credits-num', '.credits-unit', '.subscribers', '[data-action=edit]',"
        "   '[data-action=delete]']"
        "   .map(s => li.querySelector(s).getBoundingClientRect());"
        " const apart = (a, b) => a.right <= b.left || b.right <= a.left || a.bottom <= b.top || b.bottom <= a.top;"
        " return boxes.every((a, i) => a.left >= 0 && a.right <= window.innerWidth"
        "   && boxes.every((b, j) => j <= i || apart(a, b))); })"
    )
    return fits


async def open_plans(browser: Browser) -> Page:
    page = browser.page
    await page.goto(browser.base + PLANS_PAGE)
    await expect(page.locator("#plan-list")).to_have_attribute("data-loaded", "true")
    return page


async def test_operator_adds_edits_and_deletes_a_plan(guard: CreditGuard, browser: Browser) -> None:
    page = await open_plans(browser)
    form = page.locator("#plan-form")
    await expect(page.locator("#list-empty")).to_be_visible()
    await expect(page.locator("#summary")).to_have_text("0 plans · 0 subscribers")

    # add: a monthly plan carrying up to 500 unused credits
    await form.get_by_label("Plan Key").fill("pro")
    await form.get_by_label("Name").fill("Pro <b>plan</b>")
    await form.get_by_label("Credits per period").fill("1000")
    await form.get_by_label("Rollover", exact=True).fill("500")
    await page.get_by_role("button", name="Add plan").click()
    row = page.locator('.plan[data-key="pro"]')
    await expect(row.locator(".feature-name")).to_have_text("Pro <b>plan</b>")  # shown, not parsed
    await expect(row.locator("b")).to_have_count(0)
    await expect(row.locator(".feature-desc")).to_have_text("1,000 credits a month, up to 500 unused credits roll over")
    await expect(row.locator(".subscribers")).to_have_text("0 subscribers")
    await expect(form.get_by_label("Plan Key")).to_have_value("")  # ready for the next one
    assert await guard.get_plan("pro") == Plan("pro", "Pro <b>plan</b>", 1000, "month", 500)

    # a daily plan named by its key, whose unused credits reset
    await form.get_by_label("Plan Key").fill("daily")
    await form.get_by_label("Credits per period").fill("5")
    await form.get_by_label("Period", exact=True).select_option("day")
    await page.get_by_role("button", name="Add plan").click()
    await expect(page.locator('.plan[data-key="daily"] .feature-desc')).to_have_text(
        "5 credits a day, unused credits reset"
    )
    assert await guard.get_plan("daily") == Plan("daily", "daily", 5, "day", 0)
    await expect(page.locator(".plan")).to_have_count(2)
    await expect(page.locator("#summary")).to_have_text("2 plans · 0 subscribers")
    assert await plan_rows_fit(page) == [True, True]

    # errors from the API appear next to their fields, and nothing is written
    await form.get_by_label("Plan Key").fill("Bad Key!")
    await form.get_by_label("Credits per period").fill("0")
    await page.get_by_role("button", name="Add plan").click()
    await expect(page.locator('.field[data-field="plan_key"] .error')).to_contain_text("lowercase")
    await expect(page.locator('.field[data-field="credits"] .error')).to_contain_text("whole number")
    await expect(form.get_by_label("Plan Key")).to_be_focused()
    await form.get_by_label("Plan Key").fill("pro")  # taken: a 409 on the key field
    await form.get_by_label("Credits per period").fill("7")
    await page.get_by_role("button", name="Add plan").click()
    await expect(page.locator('.field[data-field="plan_key"] .error')).to_have_text("already exists")
    await browser.screenshot("admin-plans-errors", guard)
    assert [p.plan_key for p in await guard.list_plans()] == ["daily", "pro"]
    assert (await guard.get_plan("pro")).credits == 1000  # type: ignore[union-attr]

    # edit: the key is fixed; all unused credits roll over from now on
    await row.get_by_role("button", name="Edit Pro <b>plan</b>").click()
    await expect(page.locator("#form-title")).to_have_text("Edit plan")
    await expect(form.get_by_label("Plan Key")).to_have_value("pro")
    await expect(form.get_by_label("Plan Key")).not_to_be_editable()
    await expect(page.locator('.field[data-field="plan_key"] .error')).to_be_hidden()
    await expect(form.get_by_label("Rollover", exact=True)).to_have_value("500")
    await form.get_by_label("Name").fill("Pro")
    await form.get_by_label("Credits per period").fill("1200")
    await form.get_by_label("All unused credits roll over").check()
    await expect(form.get_by_label("Rollover", exact=True)).to_be_disabled()
    await browser.screenshot("admin-plans-edit", guard)
    await page.get_by_role("button", name="Save changes").click()
    await expect(row.locator(".feature-desc")).to_have_text("1,200 credits a month, all unused credits roll over")
    await expect(page.locator("#form-title")).to_have_text("Add plan")
    assert await guard.get_plan("pro") == Plan("pro", "Pro", 1200, "month", None)

    # a plan with a subscriber: its period cannot change (409 on the period field), nor can it be deleted
    await guard.subscribe("acme", "pro")
    await page.reload()
    await expect(page.locator("#plan-list")).to_have_attribute("data-loaded", "true")
    await expect(row.locator(".subscribers")).to_have_text("1 subscriber")
    await row.get_by_role("button", name="Edit Pro").click()
    await form.get_by_label("Period", exact=True).select_option("week")
    await page.get_by_role("button", name="Save changes").click()
    await expect(page.locator('.field[data-field="period"] .error')).to_contain_text("cannot change while 1")
    assert (await guard.get_plan("pro")).period == "month"  # type: ignore[union-attr]
    await page.get_by_role("button", name="Cancel").click()
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    browser.on_next_dialog(accept)
    await row.get_by_role("button", name="Delete Pro").click()
    await expect(page.locator("#toast")).to_contain_text("move them to another plan first")
    await expect(row).to_have_count(1)
    assert await guard.get_plan("pro") is not None

    # delete the other one, after a confirmation; declining deletes nothing
    async def dismiss(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    daily = page.locator('.plan[data-key="daily"]')
    browser.on_next_dialog(dismiss)
    await daily.get_by_role("button", name="Delete daily").click()
    browser.on_next_dialog(accept)
    await daily.get_by_role("button", name="Delete daily").click()
    await expect(daily).to_have_count(0)
    assert [m.split("?")[0] for m in asked] == ['Delete plan "Pro" (pro)', *['Delete plan "daily" (daily)'] * 2]
    assert [p.plan_key for p in await guard.list_plans()] == ["pro"]
    await browser.screenshot("admin-plans", guard, full_page=True)
    assert await guard.audit() == []


async def test_operator_puts_an_organization_on_a_plan_and_sees_its_next_renewal(
    guard: CreditGuard, browser: Browser
) -> None:
    from .conftest import ledger_rows  # here: the uvicorn process imports this module too

    page = browser.page
    await guard.define_plan("pro", credits=1000, rollover=500, name="Pro")
    await guard.define_plan("max", credits=3000, rollover=None, name="Max")
    await guard.grant_credits("acme", 40, reason="welcome")
    await page.goto(browser.base + TENANT + "/admin/organizations")
    await expect(page.locator("#results")).to_have_attribute("data-loaded", "true")
    await page.get_by_role("button", name="acme", exact=True).click()
    box = page.locator("#org-plan")
    await expect(box).to_have_attribute("data-loaded", "true")
    await expect(page.locator("#plan-summary")).to_have_text("No plan")
    await expect(page.locator("#plan-end")).to_be_hidden()
    await expect(page.locator("#plan-on-change")).to_be_hidden()  # nothing to keep or write off yet
    await expect(page.locator("#plan-select option")).to_have_text(
        ["Max (max) · 3,000 credits a month, all unused credits roll over",
         "Pro (pro) · 1,000 credits a month, up to 500 roll over"]
    )  # fmt: skip
    asked: list[str] = []

    async def decline(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    # subscribe: declined first (nothing moves), then confirmed (the period granted at once)
    await page.locator("#plan-select").select_option("pro")
    browser.on_next_dialog(decline)
    await page.get_by_role("button", name="Subscribe").click()
    await expect(page.locator("#status")).to_have_text("Plan unchanged.")
    assert await guard.subscription("acme") is None and await guard.get_balance("acme") == 40
    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="Subscribe").click()
    await expect(page.locator("#org-balance")).to_have_text("1040")
    sub = await guard.subscription("acme")
    assert sub is not None and sub.plan_key == "pro" and sub.period_start is not None
    assert asked == ["Put acme on pro? Pro (pro) grants 1,000 credits now, then every month."] * 2
    await expect(box).to_have_attribute("data-plan", "pro")
    await expect(page.locator("#plan-summary")).to_have_text("Pro (pro): 1,000 credits a month, up to 500 roll over")
    await expect(page.locator("#plan-renews")).to_have_text(utc_minute(sub.renews_at))
    await expect(page.locator("#plan-period")).to_have_text("since " + utc_minute(sub.period_start))
    await expect(page.locator("#status")).to_have_text(
        f"acme is on Pro (pro): next renewal {utc_minute(sub.renews_at)}."
    )
    await expect(page.locator("#grants tbody tr")).to_have_count(2)
    await browser.screenshot("admin-organization-plan", guard, of="#org-plan")

    # change to max, keeping pro's credits to their end
    asked.clear()
    await expect(page.locator("#plan-select")).to_have_value("pro")
    await page.locator("#plan-select").select_option("max")
    await page.locator("#plan-on-change").select_option("keep")
    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="Change plan").click()
    await expect(page.locator("#org-balance")).to_have_text("4040")
    await expect(box).to_have_attribute("data-plan", "max")
    assert asked == [
        "Move acme from pro to max? Max (max) grants 3,000 credits now, then every month. "
        "The credits left from pro last until they expire."
    ]
    # and back to pro, writing max's credits off (the default)
    await page.locator("#plan-select").select_option("pro")
    await expect(page.locator("#plan-on-change")).to_have_value("expire")
    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="Change plan").click()
    await expect(box).to_have_attribute("data-plan", "pro")
    await expect(page.locator("#org-balance")).to_have_text("2040")
    assert await guard.get_balance("acme") == 2040
    kinds = [(r["kind"], r["amount"]) for r in await ledger_rows(guard, "acme")]
    assert kinds == [("grant", 40), ("grant", 1000), ("grant", 3000), ("expiry", -3000), ("grant", 1000)]

    # end it: no period after this, the credits last to their end
    asked.clear()
    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="End plan").click()
    await expect(page.locator("#plan-summary")).to_have_text("No plan")
    await expect(page.locator("#status")).to_have_text("acme is on no plan now.")
    assert asked == [
        "End acme's plan pro? No period is granted after this; the credits it granted last until they expire."
    ]
    assert await guard.subscription("acme") is None and await guard.get_balance("acme") == 2040

    # on a phone the plan box fits, and nothing scrolls sideways
    await page.set_viewport_size({"width": 375, "height": 812})
    # (once the balance chart has shrunk to its card: uPlot redraws on a ResizeObserver)
    await eventually(page, "document.documentElement.scrollWidth <= window.innerWidth")
    box_right = "document.getElementById('org-plan').getBoundingClientRect().right <= window.innerWidth"
    assert await page.evaluate(box_right)
    await browser.screenshot("admin-organization-plan-narrow", guard, full_page=True)
    assert await guard.audit() == []


async def test_the_plans_page_fits_a_phone_and_escapes_plan_names(guard: CreditGuard, server: str) -> None:
    await guard.define_plan("xss_probe", credits=2**53 - 1, name='<img src=x onerror="window.__pwned=1">')
    await guard.define_plan("basic", credits=100, period="week", rollover=10, name="Basic")
    await guard.subscribe("acme", "basic")
    async with browser_at(server, width=375, height=812) as browser:
        page = await open_plans(browser)
        await expect(page.locator('.plan[data-key="xss_probe"] .feature-name')).to_have_text(
            '<img src=x onerror="window.__pwned=1">'
        )
        await expect(page.locator('.plan[data-key="basic"] .subscribers')).to_have_text("1 subscriber")
        await expect(page.locator("#summary")).to_have_text("2 plans · 1 subscriber")
        assert await page.evaluate("window.__pwned") is None
        assert await page.locator('img[src="x"]').count() == 0
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert await plan_rows_fit(page) == [True, True]  # even a 16-digit allowance
        assert await top_bar(page) == [
            "credit_guardadmin",
            "Pricing",
            "Usage",
            "Plans",
            "OrganizationsOrgs",
            "Tenant acme",
        ]
        await expect(page.get_by_role("navigation").get_by_role("link", name="Plans")).to_have_attribute(
            "aria-current", "page"
        )
        await browser.screenshot("admin-plans-narrow", guard, full_page=True)
        # the New plan button (the form is below the list on a phone) reaches the form
        await page.get_by_role("link", name="New plan").click()
        await expect(page.locator("#f-plan_key")).to_be_focused()


# -- auto top-up --------------------------------------------------------------------------------

NO_CHARGE = " No charge is registered in this app process: nothing is bought here until the app registers one."


async def open_organization(browser: Browser, org: str) -> Page:
    """The organizations view with ``org`` open and its plan and auto top-up boxes loaded."""
    page = browser.page
    if not page.url.endswith("/admin/organizations"):
        await page.goto(browser.base + TENANT + "/admin/organizations")
        await expect(page.locator("#results")).to_have_attribute("data-loaded", "true")
    await page.locator("#org-topup").evaluate("box => box.setAttribute('data-loaded', 'false')")
    await page.get_by_role("button", name=org, exact=True).click()
    await expect(page.locator("#org-name")).to_have_text(org)
    await expect(page.locator("#org-topup")).to_have_attribute("data-loaded", "true")
    await expect(page.locator("#org-plan")).to_have_attribute("data-loaded", "true")
    return page


async def topup_after(guard: CreditGuard, org: str, crossings: int) -> Any:
    """The organization's auto top-up once ``crossings`` top-ups have run and finished."""
    with anyio.fail_after(10):
        while True:
            topup = await guard.auto_topup(org)
            if topup is not None and topup.crossings == crossings and topup.state != "running":
                return topup
            await anyio.sleep(0.05)


async def test_operator_sets_changes_and_removes_an_auto_topup_and_sees_a_real_crossing(
    guard: CreditGuard, browser: Browser
) -> None:
    from credit_guard.models import AutoTopup

    await guard.grant_credits(ORG, 40, reason="welcome")
    page = await open_organization(browser, ORG)
    box = page.locator("#org-topup")
    await expect(page.locator("#topup-summary")).to_have_text("No auto top-up")
    await expect(page.locator("#topup-facts")).to_be_hidden()
    await expect(page.get_by_role("button", name="Remove auto top-up")).to_be_hidden()
    # the server's process has no charge registered: the page says what that means
    await expect(box).to_have_attribute("data-charge-registered", "false")
    warning = page.locator("#topup-no-charge")
    await expect(warning).to_be_visible()
    await expect(warning).to_contain_text("nothing is bought and nothing is recorded")
    await expect(warning).to_contain_text("guard.topups.register(charge)")

    asked: list[str] = []

    async def decline(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    below, credits = (
        page.get_by_label("Buy when the balance falls below"),
        page.get_by_label("Credits to buy each time"),
    )
    set_button = page.get_by_role("button", name="Set auto top-up")
    # not a whole number: refused on the page, nothing asked or sent
    await below.fill("0")
    await credits.fill("500")
    await set_button.click()
    await expect(page.locator("#topup-error")).to_have_text("below must be a whole number of credits from 1")
    # past the largest balance: the API's 422 appears under the form
    await below.fill(str(2**53))
    browser.on_next_dialog(accept)
    await set_button.click()
    await expect(page.locator("#topup-error")).to_have_text(f"below must be a whole number from 1 to {2**53 - 1}")
    assert await guard.auto_topup(ORG) is None

    # set: declined first (nothing stored), then confirmed
    asked.clear()
    await below.fill("30")
    browser.on_next_dialog(decline)
    await set_button.click()
    await expect(page.locator("#status")).to_have_text("Auto top-up unchanged.")
    assert await guard.auto_topup(ORG) is None
    browser.on_next_dialog(accept)
    await set_button.click()
    await expect(box).to_have_attribute("data-topup", "30:500")
    assert asked == ["Buy 500 credits for acme each time its balance falls below 30?" + NO_CHARGE] * 2
    assert await guard.auto_topup(ORG) == AutoTopup(ORG, 30, 500, "armed", 0, None, None, None)
    await expect(page.locator("#status")).to_have_text(
        "acme's auto top-up: buys 500 credits when the balance falls below 30."
    )
    await expect(page.locator("#topup-summary")).to_have_text("Buys 500 credits when the balance falls below 30")
    await expect(page.locator("#topup-state")).to_have_text("Armed: buys when the balance next falls below the line")
    await expect(page.locator("#topup-crossings")).to_have_text("0")
    await expect(page.locator("#topup-last-run")).to_have_text("never")
    await expect(page.locator("#topup-last-result")).to_have_text("none")
    await expect(page.locator("#topup-last-error-row")).to_be_hidden()

    # change it: the form holds the current line
    asked.clear()
    await expect(below).to_have_value("30")
    await expect(credits).to_have_value("500")
    await credits.fill("200")
    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="Change auto top-up").click()
    await expect(box).to_have_attribute("data-topup", "30:200")
    assert asked == ["Change acme's auto top-up from 500 credits below 30 to 200 credits below 30?" + NO_CHARGE]
    assert await guard.auto_topup(ORG) == AutoTopup(ORG, 30, 200, "armed", 0, None, None, None)

    # a real crossing, bought by the app's charge in another process (this test's guard)
    calls: list[str] = []
    charge = demo_charge(guard)

    async def card(organization_id: str, amount: int, *, key: str) -> str:
        calls.append(key)
        if len(calls) > 1:
            raise RuntimeError("card_declined")
        return await charge(organization_id, amount, key=key)

    guard.topups.register(card)
    await guard.topups.refresh()  # the line the page set (a keeper round does this)
    assert (await guard.deduct_credits(ORG, "kling_image_to_video")).success  # 40 -> 20: below 30
    first = await topup_after(guard, ORG, 1)
    assert await guard.get_balance(ORG) == 220 and first.last_run_at is not None
    await open_organization(browser, ORG)
    await expect(page.locator("#org-balance")).to_have_text("220")
    await expect(page.locator("#topup-crossings")).to_have_text("1")
    await expect(page.locator("#topup-state")).to_have_text("Armed: buys when the balance next falls below the line")
    await expect(page.locator("#topup-last-run")).to_have_text(utc_minute(first.last_run_at))
    await expect(page.locator("#topup-last-result")).to_have_text(re.compile(r"^pi_auto-topup:[0-9a-f]{32}:1$"))
    await expect(page.locator("#topup-last-error-row")).to_be_hidden()
    await expect(warning).to_be_visible()  # still true of the server's own process

    # the next crossing is declined: the error shows, and it waits for the balance to recover
    assert (await guard.deduct_credits(ORG, "kling_image_to_video", units=10)).success  # 220 -> 20
    second = await topup_after(guard, ORG, 2)
    assert (second.state, second.last_error) == ("fired", "RuntimeError: card_declined")
    await open_organization(browser, ORG)
    await expect(page.locator("#topup-crossings")).to_have_text("2")
    await expect(page.locator("#topup-state")).to_have_text(
        "Fired: armed again once the balance is back at or above the line"
    )
    await expect(page.locator("#topup-last-result")).to_have_text("none")
    await expect(page.locator("#topup-last-error-row")).to_be_visible()
    await expect(page.locator("#topup-last-error")).to_have_text("RuntimeError: card_declined")
    await browser.screenshot("admin-organization-topup", guard, of="#org-topup")
    await browser.screenshot("admin-organization-boxes", guard, of=".org-boxes")

    # remove: declined (still there), then confirmed
    asked.clear()
    remove = page.get_by_role("button", name="Remove auto top-up")
    browser.on_next_dialog(decline)
    await remove.click()
    await expect(page.locator("#status")).to_have_text("Auto top-up unchanged.")
    assert await guard.auto_topup(ORG) == second
    browser.on_next_dialog(accept)
    await remove.click()
    await expect(page.locator("#topup-summary")).to_have_text("No auto top-up")
    await expect(page.locator("#status")).to_have_text("acme has no auto top-up now.")
    await expect(remove).to_be_hidden()
    assert (
        asked == ["Remove acme's auto top-up (200 credits below 30)? Nothing is bought automatically after this."] * 2
    )
    assert await guard.auto_topup(ORG) is None
    assert [re.sub(r"^auto-topup:[0-9a-f]{32}:", "", call) for call in calls] == ["1", "2"]

    # on a phone the box fits (under the plan box), and nothing scrolls sideways
    await page.set_viewport_size({"width": 375, "height": 812})
    await eventually(page, "document.documentElement.scrollWidth <= window.innerWidth")
    for selector in ("org-plan", "org-topup"):
        assert await page.evaluate(f"document.getElementById('{selector}').getBoundingClientRect().right <= innerWidth")
    await browser.screenshot("admin-organization-topup-narrow", guard, full_page=True)
    assert await guard.audit() == []


async def test_with_the_apps_charge_a_line_set_over_the_balance_buys_at_once(
    guard: CreditGuard, charging_server: str
) -> None:
    await guard.grant_credits(ORG, 40, reason="welcome")
    async with browser_at(charging_server) as browser:
        page = await open_organization(browser, ORG)
        await expect(page.locator("#org-topup")).to_have_attribute("data-charge-registered", "true")
        await expect(page.locator("#topup-no-charge")).to_be_hidden()
        await page.get_by_label("Buy when the balance falls below").fill("100")
        await page.get_by_label("Credits to buy each time").fill("500")
        asked: list[str] = []

        async def accept(dialog: Dialog) -> None:
            asked.append(dialog.message)
            await dialog.accept()

        browser.on_next_dialog(accept)
        await page.get_by_role("button", name="Set auto top-up").click()
        await expect(page.locator("#org-topup")).to_have_attribute("data-topup", "100:500")
        assert asked == [
            "Buy 500 credits for acme each time its balance falls below 100? "
            "Its balance (40) is below that already: a top-up is bought at once."
        ]
        bought = await topup_after(guard, ORG, 1)  # by the server's charge, in the server's process
        assert (
            re.fullmatch(r"pi_auto-topup:[0-9a-f]{32}:1", bought.last_result or "")
            and await guard.get_balance(ORG) == 540
        )
        await open_organization(browser, ORG)
        await expect(page.locator("#org-balance")).to_have_text("540")
        await expect(page.locator("#topup-crossings")).to_have_text("1")
        await expect(page.locator("#topup-last-result")).to_have_text(re.compile(r"^pi_auto-topup:[0-9a-f]{32}:1$"))
        await expect(page.locator("#topup-no-charge")).to_be_hidden()
    assert await guard.audit() == []
