"""The billing-page widget, in a real headless Chromium, on the FastAPI example's /billing.

A uvicorn subprocess serves ``examples/fastapi_app`` on the ``guard`` fixture's database
(SQLite and PostgreSQL); the test writes grants and charges (yesterday's through the
clock's ``travel``) and checks that the widget shows the balance, the grants' expiry and
the usage the ledger holds, under the page's strict Content-Security-Policy, with no
script error and no CSP violation, at desktop and at phone width.

Needs Debian's ``chromium`` and the ``playwright`` package (never ``playwright install``);
without them the tests skip, unless $CREDIT_GUARD_REQUIRE_BROWSER is set. With
$CREDIT_GUARD_DOCS_SCREENSHOTS=1 the widget's picture (the SQLite run's) is also written
to docs/images/credit-widget.png.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from credit_guard import CreditGuard
from credit_guard._clock import reset_travel, travel, utcnow

from .helpers import UvicornServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
DOCS_IMAGE = ROOT / "docs" / "images" / "credit-widget.png"
CHROMIUM = os.environ.get("CREDIT_GUARD_CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("CREDIT_GUARD_REQUIRE_BROWSER", "") not in ("", "0")
DOCS_SCREENSHOTS = os.environ.get("CREDIT_GUARD_DOCS_SCREENSHOTS", "") not in ("", "0")
ORG = "org_demo"  # the example's demo organization, funded with 100 at startup
WIDGET = "[data-credit-guard]"


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

from playwright.async_api import Page, async_playwright, expect  # noqa: E402

#: Records every CSP violation the page meets (an init script runs before the page's own).
CSP_PROBE = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


@pytest.fixture
def example(db_url: str, guard: CreditGuard, tmp_path: Path) -> Iterator[UvicornServer]:
    """The FastAPI example behind a real uvicorn, on the guard's database (it seeds the
    demo prices and funds org_demo with 100 at startup)."""
    server = UvicornServer(
        "examples.fastapi_app.app:app",
        {"CREDIT_GUARD_DATABASE_URL": db_url},
        tmp_path / "uvicorn.log",
        factory=False,
    )
    with server.start(health="/billing"):
        yield server


@asynccontextmanager
async def browser_page(base: str, *, width: int = 900, height: int = 900) -> AsyncIterator[Page]:
    """A page in a fresh Chromium (en-GB, UTC); script errors and CSP violations fail the test."""
    errors: list[str] = []
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            context = await chromium.new_context(
                viewport={"width": width, "height": height}, locale="en-GB", timezone_id="UTC", color_scheme="light"
            )
            await context.add_init_script(CSP_PROBE)
            page = await context.new_page()
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    errors.append(f"console: {msg.text}")
                    # a 401 the widget asked for is an answer, not an error of the page
                    if msg.type == "error" and not msg.text.startswith("Failed to load resource")
                    else None
                ),
            )
            yield page
            assert await page.evaluate("window.__cspViolations") == []
            assert errors == []
        finally:
            await chromium.close()


async def charge(guard: CreditGuard, feature: str) -> int:
    result = await guard.deduct_credits(ORG, feature, "user_alice")
    assert result.success and result.charge_id is not None, result
    return result.charge_id


def screenshot_path(name: str, guard: CreditGuard) -> str:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return str(SCREENSHOTS / f"{name}-{guard.engine.dialect.name}.png")


async def test_billing_page_widget_shows_balance_grants_and_usage(guard: CreditGuard, example: UvicornServer) -> None:
    image, video = "seedream_text_to_image", "kling_image_to_video"
    expiry = datetime(utcnow().year + 1, 12, 31, 12, tzinfo=UTC)
    await guard.grant_credits(ORG, 120, reason="Welcome pack", expires_at=expiry)  # spent first
    await guard.grant_credits("org_poor", 50, expires_at=expiry)  # someone else's: never shown
    travel(timedelta(days=-1))
    try:
        for feature in (image, image, video):
            await charge(guard, feature)
    finally:
        reset_travel()
    await charge(guard, image)
    await guard.refund_credits(await charge(guard, image))
    assert await guard.get_balance(ORG) == 185  # 100 + 120 - 10 - 20 - 5

    async with browser_page(example.base) as page:
        # The page is strict: only same-origin scripts, styles by hash, no inline anything else.
        async with httpx.AsyncClient() as client:
            raw = await client.get(example.base + "/billing")
        csp = raw.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp

        await page.goto(example.base + "/demo/billing")  # signs this browser in, then /billing
        assert page.url == example.base + "/billing"
        widget = page.locator(WIDGET)
        await expect(widget).to_have_attribute("data-state", "ready")
        await expect(widget.locator(".cgw-balance-amount")).to_have_text("185")
        await expect(widget.locator(".cgw-grant-text")).to_have_text(
            [f"85 credits expire on 31 Dec {expiry.year}", "100 credits never expire"]
        )
        await expect(widget.locator(".cgw-grant-reason")).to_have_text(["Welcome pack", "demo funding"])
        await expect(widget.locator(".cgw-usage .cgw-heading")).to_have_text("Usage, the last 30 days")
        await expect(widget.locator(".cgw-usage-total")).to_have_text("35 credits used, 5 uses")
        await expect(widget.locator(".cgw-feature-name")).to_have_text(
            ["Kling Image to Video", "SeeDream Text to Image"]
        )
        await expect(widget.locator(".cgw-feature-credits")).to_have_text(["20 credits · 1 use", "15 credits · 4 uses"])
        bars = widget.locator("svg.cgw-chart rect")
        await expect(bars).to_have_count(30)
        per_day = await bars.evaluate_all("bars => bars.map(b => Number(b.getAttribute('data-credits')))")
        assert per_day == [0] * 28 + [30, 5]
        today = utcnow().date()
        assert await bars.nth(29).get_attribute("data-day") == today.isoformat()
        assert await bars.nth(29).locator("title").text_content() == f"{today.day} {today:%b}: 5 credits, 2 uses"
        # Styled (a constructable stylesheet passes the CSP), and in the host page's font.
        assert await widget.locator(".cgw-balance-amount").evaluate("e => getComputedStyle(e).fontWeight") == "700"
        fonts = await page.evaluate(
            "[getComputedStyle(document.body).fontFamily,"
            " getComputedStyle(document.querySelector('.cgw-balance-amount')).fontFamily]"
        )
        assert fonts[0] == fonts[1] and "system-ui" in fonts[0]
        await widget.screenshot(path=screenshot_path("credit-widget", guard))
        if DOCS_SCREENSHOTS and guard.engine.dialect.name == "sqlite":  # one picture, as scripts/docs-screenshots
            DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
            await widget.screenshot(path=str(DOCS_IMAGE))

        # Phone width: everything fits, nothing scrolls sideways.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.reload()
        await expect(widget).to_have_attribute("data-state", "ready")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        box: Any = await widget.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        await page.screenshot(path=screenshot_path("credit-widget-narrow", guard), full_page=True)

        # Usage moves with the next charge: the widget reloads on its refresh event.
        await charge(guard, video)
        await page.evaluate("document.dispatchEvent(new Event('credit-guard:refresh'))")
        await expect(widget.locator(".cgw-balance-amount")).to_have_text("165")
        await expect(widget.locator(".cgw-usage-total")).to_have_text("55 credits used, 6 uses")

        # A server string is shown as text, never parsed as markup (the CSP would block the
        # handler anyway; the probe would see it).
        hostile = '<img src=x onerror="document.title=1">'
        await guard.grant_credits(ORG, 1, reason=hostile, expires_at=expiry - timedelta(days=1))
        await page.evaluate("document.dispatchEvent(new Event('credit-guard:refresh'))")
        await expect(widget.locator(".cgw-grant-text")).to_have_text(
            [
                f"1 credit expires on 30 Dec {expiry.year}",
                f"65 credits expire on 31 Dec {expiry.year}",
                "100 credits never expire",
            ]
        )
        await expect(widget.locator(".cgw-grant-reason").first).to_have_text(hostile)
        await expect(widget.locator("img")).to_have_count(0)


async def test_billing_page_signed_out_asks_to_sign_in(guard: CreditGuard, example: UvicornServer) -> None:
    async with browser_page(example.base) as page:
        await page.goto(example.base + "/billing")  # no demo cookie: nobody is signed in
        widget = page.locator(WIDGET)
        await expect(widget).to_have_attribute("data-state", "error")
        await expect(widget).to_have_attribute("data-status", "401")
        await expect(widget.locator(".cgw-error")).to_have_text("Sign in to see your credits.")
        await expect(widget.locator(".cgw-balance-amount")).to_have_count(0)
