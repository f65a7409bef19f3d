"""The organizations page's Members box, driven in a real headless Chromium against a real
server (``test_admin_page.py``'s uvicorn subprocess, on both databases): a cap set, changed
and removed on the page is the one the guard stores, and real charges against it show as
used and remaining after a reload. A member id is the app's text, markup included: shown,
never parsed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from credit_guard import CreditGuard
from credit_guard.models import MemberLimit
from credit_guard.schema import MAX_BALANCE

# Playwright's names through test_admin_page: it skips this module too without a browser.
from .test_admin_page import (
    ORG,
    TENANT,
    Browser,
    Dialog,
    Page,
    browser_at,
    eventually,
    expect,
    open_organization,
    serve,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

IMAGE = "seedream_text_to_image"  # 5 credits
HOSTILE = "<img src=x onerror=alert(1)>"
EVERYONE = "every member may spend all of the organization's credits."


@pytest.fixture
async def browser(db_url: str, guard: CreditGuard, tmp_path: Path) -> AsyncIterator[Browser]:
    async with serve(db_url, tmp_path) as base, browser_at(base) as session:
        yield session


async def open_members(browser: Browser, org: str, *, reload: bool = False) -> Page:
    """The organizations view with ``org`` open and its Members box loaded (from a fresh page load with ``reload``)."""
    page = browser.page
    if reload:
        await page.goto(browser.base + TENANT + "/admin/organizations")
        await expect(page.locator("#results")).to_have_attribute("data-loaded", "true")
    elif page.url.endswith("/admin/organizations"):
        await page.locator("#org-members").evaluate("box => box.setAttribute('data-loaded', 'false')")
    page = await open_organization(browser, org)
    await expect(page.locator("#org-members")).to_have_attribute("data-loaded", "true")
    return page


async def rows(page: Page) -> list[list[str]]:
    """The Members table as the operator reads it: member, cap, per, used, remaining, resets."""
    cells: list[list[str]] = await page.locator("#members tbody tr.member-row").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells).slice(0, 6).map(c => c.textContent))"
    )
    return cells


def resets(cap: MemberLimit | None) -> str:
    """The Resets (UTC) cell of a cap: ``2026-12-07 00:00``, or never."""
    assert cap is not None
    return "never" if cap.resets_at is None else cap.resets_at.strftime("%Y-%m-%d %H:%M")


async def test_operator_caps_a_member_sees_real_charges_against_it_then_changes_and_removes_it(
    guard: CreditGuard, browser: Browser
) -> None:
    await guard.grant_credits(ORG, 100, reason="welcome")
    page = await open_members(browser, ORG)
    box = page.locator("#org-members")
    await expect(page.locator("#members-summary")).to_have_text("No member caps: " + EVERYONE)
    await expect(page.locator("#members")).to_be_hidden()

    asked: list[str] = []

    async def decline(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    async def accept(dialog: Dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    member, credits, per = (
        page.get_by_label("Member (user or API key id)"),
        page.get_by_label("Cap in credits"),
        page.get_by_label("Per", exact=True),
    )
    set_button = page.get_by_role("button", name="Set member cap")
    error = page.locator("#member-error")
    # refused on the page, nothing asked or sent
    await set_button.click()
    await expect(error).to_have_text("member must not be empty; credits must be a whole number from 0")
    await member.fill("ann")
    await credits.fill("1.5")
    await set_button.click()
    await expect(error).to_have_text("credits must be a whole number from 0")
    # past the largest amount: the API's 422 appears under the form
    await credits.fill(str(MAX_BALANCE + 1))
    browser.on_next_dialog(accept)
    await set_button.click()
    await expect(error).to_have_text(f"credits must be a whole number from 0 to {MAX_BALANCE}")
    assert await guard.list_member_limits(ORG) == []

    # set: declined first (nothing stored), then confirmed
    asked.clear()
    await credits.fill("12")
    await per.select_option("day")
    browser.on_next_dialog(decline)
    await set_button.click()
    await expect(page.locator("#status")).to_have_text("Member caps unchanged.")
    assert await guard.get_member_usage(ORG, "ann") is None
    browser.on_next_dialog(accept)
    await set_button.click()
    await expect(page.locator("#status")).to_have_text("ann may spend 12 credits a day of acme's credits.")
    assert asked == ["Let ann spend at most 12 credits a day of acme's credits? A charge over the cap is refused."] * 2
    cap = await guard.get_member_usage(ORG, "ann")
    assert cap is not None and (cap.credits, cap.per, cap.used, cap.remaining) == (12, "day", 0, 12)
    assert await rows(page) == [["ann", "12", "day", "0", "12", resets(cap)]]
    await expect(page.locator("#members-summary")).to_have_text(
        "1 member has a cap; everyone else may spend all of the organization's credits."
    )
    await expect(member).to_have_value("")  # the form is cleared for the next member

    # real charges by ann: two images (10 credits) fit, the third is refused by the cap
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    refused = await guard.deduct_credits(ORG, IMAGE, user_id="ann")
    assert (refused.success, refused.error_code) == (False, "member_limit_reached")
    page = await open_members(browser, ORG, reload=True)
    cap = await guard.get_member_usage(ORG, "ann")
    assert cap is not None and (cap.used, cap.remaining) == (10, 2)
    assert await rows(page) == [["ann", "12", "day", "10", "2", resets(cap)]]
    await expect(page.locator("#org-balance")).to_have_text("90")

    # change the cap in its row: what ann used today still counts
    asked.clear()
    await page.get_by_role("button", name="Change the cap of ann").click()
    new_cap = page.get_by_label("New cap for ann")
    await expect(new_cap).to_be_focused()
    await expect(new_cap).to_have_value("12")
    await new_cap.fill("20")
    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="Save the cap of ann").click()
    await expect(page.locator("#status")).to_have_text("ann may spend 20 credits a day of acme's credits.")
    assert asked == [
        "Change ann's cap in acme from 12 credits a day to 20 credits a day? What it used this period (10) still counts."
    ]
    cap = await guard.get_member_usage(ORG, "ann")
    assert cap is not None and (cap.credits, cap.used, cap.remaining) == (20, 10, 10)
    assert await rows(page) == [["ann", "20", "day", "10", "10", resets(cap)]]
    await expect(page.locator(".member-editor")).to_have_count(0)

    # a refused change shows in its row; cancelling closes the editor and writes nothing
    await page.get_by_role("button", name="Change the cap of ann").click()
    await page.get_by_label("New cap for ann").fill("-1")
    await page.get_by_role("button", name="Save the cap of ann").click()
    await expect(page.locator(".member-editor [role=alert]")).to_have_text("credits must be a whole number from 0")
    await page.get_by_role("button", name="Cancel changing the cap of ann").click()
    await expect(page.locator(".member-editor")).to_have_count(0)

    # a new period: its count starts again
    asked.clear()
    await page.get_by_role("button", name="Change the cap of ann").click()
    await page.get_by_label("Period for ann").select_option("month")
    browser.on_next_dialog(accept)
    await page.get_by_role("button", name="Save the cap of ann").click()
    await expect(page.locator("#status")).to_have_text("ann may spend 20 credits a month of acme's credits.")
    assert asked == [
        "Change ann's cap in acme from 20 credits a day to 20 credits a month? A new period starts its count again at 0 (it used 10)."
    ]
    cap = await guard.get_member_usage(ORG, "ann")
    assert cap is not None and (cap.per, cap.used, cap.remaining) == ("month", 0, 20)
    assert (await guard.deduct_credits(ORG, IMAGE, user_id="ann")).success
    page = await open_members(browser, ORG, reload=True)
    cap = await guard.get_member_usage(ORG, "ann")
    assert await rows(page) == [["ann", "20", "month", "5", "15", resets(cap)]]

    # a hostile member id, 0 in all: shown as text, never parsed; its charges are all refused
    asked.clear()
    await member.fill(HOSTILE)
    await credits.fill("0")
    await per.select_option("")
    browser.on_next_dialog(accept)
    await set_button.click()
    await expect(page.locator("#members tbody tr.member-row")).to_have_count(2)
    assert asked == [
        f"Let {HOSTILE} spend at most 0 credits in all of acme's credits? A charge over the cap is refused. "
        "A cap of 0 refuses all of its paid calls."
    ]
    assert await rows(page) == [
        [HOSTILE, "0", "in all", "0", "0", "never"],
        ["ann", "20", "month", "5", "15", resets(cap)],
    ]
    assert await page.locator('img[src="x"]').count() == 0
    assert await guard.get_member_usage(ORG, HOSTILE) == MemberLimit(ORG, HOSTILE, 0, None, 0, 0, None)
    assert (await guard.deduct_credits(ORG, IMAGE, user_id=HOSTILE)).error_code == "member_limit_reached"
    await expect(page.get_by_role("button", name=f"Remove the cap of {HOSTILE}")).to_be_visible()
    await browser.screenshot("admin-organization-members", guard, of="#org-members")

    # remove: declined (still there), then confirmed
    asked.clear()
    remove = page.get_by_role("button", name="Remove the cap of ann")
    browser.on_next_dialog(decline)
    await remove.click()
    await expect(page.locator("#status")).to_have_text("Member caps unchanged.")
    assert await guard.get_member_usage(ORG, "ann") == cap
    browser.on_next_dialog(accept)
    await remove.click()
    await expect(page.locator("#status")).to_have_text("ann has no cap in acme now.")
    await expect(remove).to_be_hidden()
    assert (
        asked
        == ["Remove ann's cap in acme (20 credits a month)? It may then spend all of the organization's credits."] * 2
    )
    assert await guard.get_member_usage(ORG, "ann") is None
    assert [m.member for m in await guard.list_member_limits(ORG)] == [HOSTILE]
    assert await rows(page) == [[HOSTILE, "0", "in all", "0", "0", "never"]]

    # on a phone each cap is a card: nothing scrolls sideways, every button is whole on the screen
    await page.set_viewport_size({"width": 375, "height": 812})
    await eventually(page, "document.documentElement.scrollWidth <= window.innerWidth")
    await page.get_by_role("button", name=f"Change the cap of {HOSTILE}").click()
    await eventually(page, "document.documentElement.scrollWidth <= window.innerWidth")
    inside = "e => { const r = e.getBoundingClientRect(); return r.left >= 0 && r.right <= innerWidth; }"
    for selector in ("#org-members", "#member-form", ".member-editor form"):
        assert await page.locator(selector).evaluate(inside), selector
    for button in await page.locator("#org-members button").all():
        assert await button.evaluate(inside), await button.text_content()
    await browser.screenshot("admin-organization-members-narrow", guard, of="#org-members")
    await expect(box).to_have_attribute("data-loaded", "true")
    assert await guard.audit() == []
