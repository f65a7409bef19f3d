"""The pricing admin page, driven in a real headless Chromium against a real server.

A uvicorn subprocess serves the admin app under a tenant prefix (``/acme``) on the same
database as the ``guard`` fixture (SQLite and PostgreSQL), so every click is checked twice:
in the DOM the operator sees and in the rows the guard reads back.

Needs Debian's ``chromium`` and the ``playwright`` package (never ``playwright install``):
``scripts/ci-system-deps`` installs Chromium, the dev extra playwright. Without them the tests skip, unless
$CREDIT_GUARD_REQUIRE_BROWSER is set, in which case they fail.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from credit_guard import CreditGuard

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = os.environ.get("CREDIT_GUARD_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("CREDIT_GUARD_REQUIRE_BROWSER", "") not in ("", "0")
DB_ENV = "CREDIT_GUARD_ADMIN_PAGE_DB"
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

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with guard:
            yield

    app = Starlette(routes=[Mount(TENANT, app=admin_app(guard))], lifespan=lifespan)
    app.add_middleware(DemoSession)
    return app


# -- fixtures -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def server(db_url: str, guard: CreditGuard, tmp_path: Path) -> AsyncIterator[str]:
    """A uvicorn subprocess on the guard's database; yields its base URL."""
    port = _free_port()
    log_path = tmp_path / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "--factory", "tests.test_admin_page:demo_app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = await anyio.open_process(
            command, cwd=ROOT, env={**os.environ, DB_ENV: db_url}, stdout=log, stderr=subprocess.STDOUT
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

    page.once("dialog", decline)
    await switch.click()
    await expect(page.locator("#toast")).to_contain_text("stays active")
    await expect(switch).to_have_attribute("aria-checked", "true")
    assert (await guard.get_pricing(stored["id"])).is_active is True  # type: ignore[union-attr]

    async def confirm(dialog: Dialog) -> None:
        toggled.append(dialog.message)
        await dialog.accept()

    page.once("dialog", confirm)
    await switch.click()
    await expect(switch).to_have_attribute("aria-checked", "false")
    assert len(toggled) == 2 and all("Deactivate" in m and "flux_upscale" in m for m in toggled)
    await expect(row).to_have_class(re.compile(r"\bis-inactive\b"))
    await expect(row.locator(".badge")).to_be_visible()
    await expect(page.locator("#summary")).to_have_text("4 features · 3 categories · 2 inactive")
    assert (await guard.get_pricing(stored["id"])).is_active is False  # type: ignore[union-attr]

    # delete, confirming the browser's dialog
    asked: list[str] = []

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
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

    page.once("dialog", dismiss)
    await browser.row("seedream_text_to_image").get_by_role("button", name="Delete SeeDream Text to Image").click()
    # a later change round-trips, so a DELETE sent on dismissal would have been seen before it
    switch = browser.row("kling_image_to_video").get_by_role("switch")

    async def accept(dialog: Dialog) -> None:
        await dialog.accept()

    page.once("dialog", accept)
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


async def test_usage_view_charts_credits_per_day_and_per_feature(guard: CreditGuard, server: str) -> None:
    await guard.grant_credits(ORG, 1_000)
    for _ in range(3):
        assert (await guard.deduct_credits(ORG, "seedream_text_to_image", "u1")).success
    charges = [await guard.deduct_credits(ORG, "kling_image_to_video", "u1") for _ in range(2)]
    assert (await guard.refund_credits(charges[0].charge_id)).refunded  # type: ignore[arg-type]
    by_day = await guard.usage_report(group_by="day")
    assert len(by_day) == 1  # all seeded today; the chart must show the same number

    async with browser_at(server) as browser:
        page = browser.page
        await browser.open()
        day_chart = page.locator("#chart-day")
        await expect(day_chart).to_have_attribute("data-bars", "30")  # one bar per day of the range
        await expect(day_chart.locator("svg g.day")).to_have_count(30)
        today = day_chart.locator(f'g.day[data-key="{by_day[0].key[:10]}"]')
        await expect(today).to_have_attribute("data-value", str(by_day[0].net_credits))
        assert by_day[0].net_credits == 3 * 5 + 2 * 20 - 20

        feature_chart = page.locator("#chart-feature")
        await expect(feature_chart.locator("g.feature-bar")).to_have_count(2)
        await expect(feature_chart.locator('g.feature-bar[data-key="kling_image_to_video"]')).to_have_attribute(
            "data-value", "20"
        )
        await expect(feature_chart.locator('g.feature-bar[data-key="seedream_text_to_image"]')).to_have_attribute(
            "data-value", "15"
        )
        await expect(page.locator('[data-stat="net_credits"]')).to_have_text("35")
        await expect(page.locator('[data-stat="credits_refunded"]')).to_have_text("20")
        await expect(page.locator('[data-stat="charges"]')).to_have_text("5")
        await browser.screenshot("admin-usage", guard, of="#usage")

        # the range is a query: a 7-day window redraws with 7 bars
        await page.get_by_label("Range").select_option("7")
        await expect(day_chart.locator("svg g.day")).to_have_count(7)


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
        await browser.screenshot("admin-pricing-narrow", guard, full_page=True)


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

    page.once("dialog", decline)
    await page.get_by_label("Amount").fill("15")
    await page.get_by_label("Reason").fill("support ticket 4711")
    await page.get_by_role("button", name="Grant", exact=True).click()
    await expect(page.locator("#status")).to_have_text("Nothing granted.")
    assert await guard.get_balance("acme") == 20

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.once("dialog", accept)
    await page.get_by_role("button", name="Grant", exact=True).click()
    await expect(page.locator("#org-balance")).to_have_text("35")
    await expect(page.locator("#status")).to_contain_text("Granted 15 credits to acme")
    assert asked == ["Grant 15 credits to acme?"] * 2
    assert await guard.get_balance("acme") == 35
    assert [g.reason for g in await guard.list_grants("acme")] == ["Pro plan", "support ticket 4711"]
    await browser.screenshot("admin-organizations", guard, full_page=True)
    assert await guard.audit() == []
