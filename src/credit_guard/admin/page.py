"""The admin pages: feature pricing (server-rendered, then ``static/admin.js``), and the
organizations and plans views (shells their scripts fill from the API).

The pricing page renders the current pricing on the server (so it is useful the moment
it arrives) and ``static/admin.js`` takes over from there, talking to the JSON API next to
it. There is no build step, no CDN and no web font: the page must work on an operator's
machine with no internet, under whatever prefix the app is mounted at (``/{tenant}``).

Every piece of user-provided text is escaped here or set with ``textContent`` in the
script, and the Content-Security-Policy below forbids inline script, so a feature named
``<script>`` is shown, never run.
"""

from __future__ import annotations

import hashlib
import html
import logging
from collections.abc import Iterable
from pathlib import Path
from string import Template
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from ..errors import StorageUnavailable
from ..models import FeaturePricing

log = logging.getLogger("credit_guard.admin")

#: Where the page lives, relative to the admin app's mount point; the script strips it
#: from ``location.pathname`` to find the API, so the two must agree.
PAGE_PATH = "/admin/feature-pricing"
#: Where :func:`static_routes` serves the CSS and JS, relative to the same mount point.
STATIC_PATH = "/admin/static"
STATIC_ROUTE_NAME = "credit_guard_admin_static"

_HERE = Path(__file__).parent
STATIC_DIR = _HERE / "static"
_TEMPLATE = Template((_HERE / "templates" / "feature_pricing.html").read_text(encoding="utf-8"))

#: No inline script, no third-party origin, no framing: the page only talks to itself.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _version(name: str) -> str:
    """A content hash for the asset URL, so a new release is never served from a stale cache."""
    return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]


_CSS_VERSION = _version("admin.css")
_JS_VERSION = _version("admin.js")
_ORGS_JS_VERSION = _version("organizations.js")
#: The charts: static/charts.js on top of uPlot, vendored unchanged (static/vendor/README.md).
_CHART_VERSIONS = {
    "charts_js_version": _version("charts.js"),
    "uplot_js_version": _version("vendor/uPlot.iife.min.js"),
    "uplot_css_version": _version("vendor/uPlot.min.css"),
}
_ORGS_TEMPLATE = Template((_HERE / "templates" / "organizations.html").read_text(encoding="utf-8"))
ORGANIZATIONS_PAGE_PATH = "/admin/organizations"
_PLANS_JS_VERSION = _version("plans.js")
_PLANS_TEMPLATE = Template((_HERE / "templates" / "plans.html").read_text(encoding="utf-8"))
PLANS_PAGE_PATH = "/admin/plans"


def static_routes() -> list[BaseRoute]:
    """The page's CSS and JS, to include next to the page route (relative, so prefixes work)."""
    return [Mount(STATIC_PATH, app=StaticFiles(directory=STATIC_DIR), name=STATIC_ROUTE_NAME)]


async def feature_pricing_page(request: Request) -> Response:
    """The pricing admin page, with the current pricing rendered in.

    The guard comes from ``request.app.state.credit_guard`` (or the scope's
    ``credit_guard``); without one, or with the database down, the page still renders
    and its script loads the list from the API and shows what went wrong.
    """
    base = _base_path(request)
    features: list[FeaturePricing] | None = None
    guard = _find_guard(request)
    if guard is not None:
        try:
            features = await guard.list_pricing()
        except StorageUnavailable:
            log.warning("credit_guard admin: database unavailable; the page will load pricing from the API")
    body = render_page(features, base_path=base)
    return HTMLResponse(body, headers=_SECURITY_HEADERS)


async def organizations_page(request: Request) -> Response:
    """The organizations view: a shell the script fills from the API next to it."""
    path = request.url.path.rstrip("/")
    base = path[: -len(ORGANIZATIONS_PAGE_PATH)] if path.endswith(ORGANIZATIONS_PAGE_PATH) else ""
    body = _ORGS_TEMPLATE.substitute(
        static=_e(base + STATIC_PATH),
        css_version=_CSS_VERSION,
        js_version=_ORGS_JS_VERSION,
        base=_e(base),
        **_CHART_VERSIONS,
    )
    return HTMLResponse(body, headers=_SECURITY_HEADERS)


async def plans_page(request: Request) -> Response:
    """The plans page: a shell (list and form) that ``static/plans.js`` fills from the API."""
    path = request.url.path.rstrip("/")
    base = path[: -len(PLANS_PAGE_PATH)] if path.endswith(PLANS_PAGE_PATH) else ""
    body = _PLANS_TEMPLATE.substitute(
        static=_e(base + STATIC_PATH),
        css_version=_CSS_VERSION,
        js_version=_PLANS_JS_VERSION,
        base=_e(base),
        tenant=_tenant(base),
    )
    return HTMLResponse(body, headers=_SECURITY_HEADERS)


def _tenant(base_path: str) -> str:
    """The top bar's badge naming the prefix the admin app is mounted under, if any."""
    tenant = base_path.strip("/")
    if not tenant:
        return ""
    return (
        f'<span class="tenant" title="Mounted at {_e(base_path)}"><span class="tenant-label">Tenant</span> '
        f"{_e(tenant)}</span>"
    )


def render_page(features: list[FeaturePricing] | None, *, base_path: str = "") -> str:
    """The whole page as a string; ``features=None`` leaves the list for the script to load."""
    listed = features or []
    categories = sorted({f.category for f in listed}, key=str.casefold)
    return _TEMPLATE.substitute(
        static=_e(base_path + STATIC_PATH),
        base=_e(base_path),
        css_version=_CSS_VERSION,
        js_version=_JS_VERSION,
        tenant=_tenant(base_path),
        summary=_e(summarize(listed)) if features is not None else "Loading…",
        loaded="true" if features is not None else "false",
        groups="".join(_render_groups(listed)),
        empty_hidden="hidden" if features is None or listed else "",
        category_options="".join(f'<option value="{_e(c)}"></option>' for c in categories),
        group_template=_render_group("", []),
        feature_template=_render_feature(None),
        **_CHART_VERSIONS,
    )


def summarize(features: Iterable[FeaturePricing]) -> str:
    """The one line above the list, e.g. ``3 features · 2 categories · 1 inactive``."""
    items = list(features)
    count = len(items)
    categories = len({f.category for f in items})
    inactive = sum(1 for f in items if not f.is_active)
    parts = [_plural(count, "feature"), _plural(categories, "category", "categories")]
    if inactive:
        parts.append(f"{inactive} inactive")
    return " · ".join(parts)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _render_groups(features: list[FeaturePricing]) -> Iterable[str]:
    groups: dict[str, list[FeaturePricing]] = {}
    for feature in features:
        groups.setdefault(feature.category, []).append(feature)
    for category in sorted(groups, key=str.casefold):
        members = sorted(groups[category], key=lambda f: (f.feature_name.casefold(), f.feature_key))
        yield _render_group(category, members)


def _render_group(category: str, members: list[FeaturePricing]) -> str:
    rows = "".join(_render_feature(f) for f in members)
    return (
        f'<section class="group" data-category="{_e(category)}">'
        f'<h3 class="group-head"><span class="group-name" data-slot="category">{_e(category)}</span>'
        f'<span class="group-count" data-slot="count">{len(members) or ""}</span></h3>'
        f'<ul class="features" role="list">{rows}</ul></section>'
    )


_COPY_ICON = (
    '<svg class="icon icon-copy" viewBox="0 0 20 20" width="14" height="14" aria-hidden="true">'
    '<rect x="7" y="7" width="10" height="10" rx="2" fill="none" stroke="currentColor" stroke-width="1.7"/>'
    '<path d="M13 4.5V4a1 1 0 0 0-1-1H4a1 1 0 0 0-1 1v8a1 1 0 0 0 1 1h.5" fill="none" stroke="currentColor" '
    'stroke-width="1.7" stroke-linecap="round"/></svg>'
    '<svg class="icon icon-check" viewBox="0 0 20 20" width="14" height="14" aria-hidden="true">'
    '<path d="m4.5 10.5 3.5 3.5 7.5-8" fill="none" stroke="currentColor" stroke-width="2" '
    'stroke-linecap="round" stroke-linejoin="round"/></svg>'
)


def _render_feature(f: FeaturePricing | None) -> str:
    """One feature row; with ``None``, the empty row the script clones and fills in."""
    fields: dict[str, Any] = (
        f.to_dict()
        if f is not None
        else {"id": "", "feature_key": "", "feature_name": "", "credits": "", "description": None, "is_active": True}
    )
    key, name = _e(fields["feature_key"]), _e(fields["feature_name"])
    active = bool(fields["is_active"])
    description = fields["description"]
    pool = fields.get("pool")
    pool_label = f"pool {pool}{' (then general)' if fields.get('pool_fallback') else ''}" if pool else ""
    return (
        f'<li class="feature{"" if active else " is-inactive"}" data-id="{_e(fields["id"])}" data-key="{key}">'
        '<div class="feature-main">'
        f'<div class="feature-title"><span class="feature-name" data-slot="feature_name">{name}</span>'
        f'<span class="badge" data-slot="inactive-badge"{"" if not active else " hidden"}>Inactive</span>'
        f'<span class="badge badge-pool" data-slot="pool-badge"{"" if pool else " hidden"}>{_e(pool_label)}</span></div>'
        '<div class="feature-key">'
        f'<code data-slot="feature_key">{key}</code>'
        f'<button type="button" class="copy" data-action="copy" aria-label="Copy feature key {key}" title="Copy key">'
        f'{_COPY_ICON}<span class="copy-label">Copy</span></button></div>'
        f'<p class="feature-desc{"" if description else " is-empty"}" data-slot="description">'
        f"{_e(description) if description else 'No description'}</p>"
        "</div>"
        f'<div class="feature-credits"><span class="credits-num" data-slot="credits">{_e(fields["credits"])}</span>'
        f'<span class="credits-unit" data-slot="credits-unit">{"credit" if fields["credits"] == 1 else "credits"}</span></div>'
        '<div class="feature-status">'
        f'<button type="button" class="switch" role="switch" data-action="toggle" aria-checked="{"true" if active else "false"}"'
        f' aria-label="{name} active">'
        '<span class="switch-track" aria-hidden="true"><span class="switch-thumb"></span></span>'
        f'<span class="switch-text" data-slot="status">{"Active" if active else "Inactive"}</span></button></div>'
        '<div class="feature-actions">'
        f'<button type="button" class="btn btn-ghost btn-sm" data-action="edit" aria-label="Edit {name}">Edit</button>'
        f'<button type="button" class="btn btn-ghost-danger btn-sm" data-action="delete" aria-label="Delete {name}">Delete</button>'
        "</div></li>"
    )


def _base_path(request: Request) -> str:
    """The prefix the admin app is mounted under (``/acme``), read like the script reads it."""
    path = request.url.path.rstrip("/")
    if path.endswith(PAGE_PATH):
        return path[: -len(PAGE_PATH)]
    return str(request.scope.get("root_path", "")).rstrip("/")


def _find_guard(request: Request) -> Any:
    guard = request.scope.get("credit_guard")
    if guard is None:
        guard = getattr(request.app.state, "credit_guard", None)
    return guard


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
