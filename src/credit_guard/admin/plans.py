"""Plans over HTTP: define, edit and delete them, and put an organization on one.

    GET    /api/admin/plans                                        admin: every plan, with its subscribers
    POST   /api/admin/plans                                        admin: create one (409 if the key exists)
    GET    /api/admin/plans/{plan_key}                             admin: one plan
    PATCH  /api/admin/plans/{plan_key}                             admin: change some fields
    DELETE /api/admin/plans/{plan_key}                             admin: delete one nobody subscribes to
    GET    /api/admin/organizations/{organization_id}/subscription admin: its plan and next renewal
    PUT    /api/admin/organizations/{organization_id}/subscription admin: put it on a plan (moves credits)
    DELETE /api/admin/organizations/{organization_id}/subscription admin: end its plan (may move credits)
    GET    /admin/plans                                            admin (the HTML page, ``page.py``)

Every write goes through the guard's plan methods (``_plans_api.py``), so a subscription
granted here is granted exactly as by ``guard.subscribe``: the period under way at once,
under the account lock, once per period whoever renews it.

``guard.define_plan`` creates or replaces, so creating checks the key first (409 when it
exists, as for pricing); two creates of one key at the same instant may both succeed,
the later one winning. An edit changes the plan from each subscriber's next period on,
never the period under way; changing the ``period`` of a plan that has subscribers is
refused (409): their period numbers count the old unit, so the next renewal would grant
every period of the new unit since the anchor (a month to a day) or none for years (a day
to a month). Move the subscribers to a new plan instead.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import problems
from .._guard import CreditGuard
from .._periods import PERIOD_UNITS
from ..errors import PlanInUse, PlanNotFound
from ..models import (
    FEATURE_KEY_MAX,
    FEATURE_KEY_RE,
    FEATURE_NAME_MAX,
    LABEL_PATTERN,
    Plan,
    Subscription,
    is_storable_text,
)
from ._http import Refusal, json_object, refuse_if, whole_number
from .organizations import path_organization

log = logging.getLogger("credit_guard.admin")

PLANS_PATH = "/api/admin/plans"
ON_CHANGE = ("expire", "keep")
_PRIVATE = {"Cache-Control": "no-store"}
_TYPE = "urn:credit-guard:problem:"
TYPE_PLAN_NOT_FOUND = _TYPE + "plan-not-found"
TYPE_DUPLICATE_PLAN = _TYPE + "duplicate-plan"
TYPE_PLAN_IN_USE = _TYPE + "plan-in-use"
TYPE_NO_SUBSCRIPTION = _TYPE + "no-subscription"
_FIELDS = ("plan_key", "name", "credits", "period", "rollover")
_LABEL = re.compile(LABEL_PATTERN)
_KEY_RULE = "must be lowercase letters and digits joined by single underscores, starting with a letter (e.g. pro)"


# -- plans --------------------------------------------------------------------------------


async def list_plans(request: Request, guard: CreditGuard) -> Response:
    """Every plan by key, each with ``subscribers``: how many organizations are on it."""
    body = [plan_view(plan, count) for plan, count in await guard.store.list_plans()]
    return JSONResponse(body, headers=_PRIVATE)


async def create_plan(request: Request, guard: CreditGuard) -> Response:
    fields = validate_plan_fields(await json_object(request))
    key = fields.pop("plan_key")
    if await guard.get_plan(key) is not None:
        raise Refusal(duplicate_plan(key))
    plan = await guard.define_plan(key, **fields)
    log.info("credit_guard admin: created plan %s (%s credits a %s)", plan.plan_key, plan.credits, plan.period)
    location = request.url.path.rstrip("/") + "/" + plan.plan_key
    return JSONResponse(plan_view(plan, 0), status_code=201, headers={**_PRIVATE, "Location": location})


async def get_plan(request: Request, guard: CreditGuard) -> Response:
    plan, count = await _existing(request, guard)
    return JSONResponse(plan_view(plan, count), headers=_PRIVATE)


async def update_plan(request: Request, guard: CreditGuard) -> Response:
    """Only the fields sent change. The key names the plan (and its subscriptions): it
    cannot be changed."""
    data = await json_object(request)
    fields = validate_plan_fields(data, partial=True)
    plan, count = await _existing(request, guard)
    if fields.get("period", plan.period) != plan.period and count:
        raise Refusal(
            problems.Problem(
                409,
                TYPE_PLAN_IN_USE,
                "Plan in use",
                f"Plan {plan.plan_key!r} has {count} subscriber(s): its period cannot change under them; "
                "nothing was changed.",
                extra={
                    "errors": {
                        "period": f"cannot change while {count} organization(s) subscribe: "
                        "create a new plan and move them to it"
                    },
                    "plan_key": plan.plan_key,
                },
            )
        )
    merged = {"name": plan.name, "credits": plan.credits, "period": plan.period, "rollover": plan.rollover, **fields}
    try:
        saved = await guard.define_plan(plan.plan_key, **merged)
    except PlanInUse as exc:  # a subscriber came between the count above and the change: the store refuses
        period = "cannot change while organizations subscribe: create a new plan and move them to it"
        extra = {"errors": {"period": period}, "plan_key": plan.plan_key}
        raise Refusal(problems.Problem(409, TYPE_PLAN_IN_USE, "Plan in use", str(exc), extra=extra)) from exc
    changed = sorted(name for name in fields if getattr(plan, name) != getattr(saved, name))
    log.info("credit_guard admin: updated plan %s (%s)", saved.plan_key, ", ".join(changed) or "no change")
    return JSONResponse(plan_view(saved, count), headers=_PRIVATE)


async def delete_plan(request: Request, guard: CreditGuard) -> Response:
    key = _path_plan_key(request)
    if not _possible(key):
        raise Refusal(plan_not_found(key))
    try:
        await guard.delete_plan(key)
    except PlanNotFound as exc:
        raise Refusal(plan_not_found(key)) from exc
    except PlanInUse as exc:
        raise Refusal(
            problems.Problem(
                409,
                TYPE_PLAN_IN_USE,
                "Plan in use",
                f"Organizations subscribe to plan {key!r}: move them to another plan first; nothing was changed.",
                extra={"plan_key": key},
            )
        ) from exc
    log.info("credit_guard admin: deleted plan %s", key)
    return Response(status_code=204, headers=_PRIVATE)


# -- an organization's subscription ---------------------------------------------------------


async def get_subscription(request: Request, guard: CreditGuard) -> Response:
    """The organization's plan, its current period and when the next one starts
    (``renews_at``); 404 when it has none."""
    org = path_organization(request)
    subscription = await guard.subscription(org)
    if subscription is None:
        raise Refusal(no_subscription(org))
    return JSONResponse(await subscription_view(guard, subscription), headers=_PRIVATE)


async def put_subscription(request: Request, guard: CreditGuard) -> Response:
    """Put the organization on ``plan_key``: the period under way is granted at once. On
    that plan already, nothing changes (so a retry is safe); on another, that plan ends
    now, its unused credits written off (``on_change: "keep"``: they last to their end).
    201 when the organization had no plan, else 200."""
    org = path_organization(request)
    data = await json_object(request)
    errors: dict[str, str] = {}
    for unknown in sorted(set(data) - {"plan_key", "on_change"}):
        errors[unknown] = "unknown field"
    key = data.get("plan_key")
    if key is None:
        errors["plan_key"] = "is required"
    elif not isinstance(key, str) or not _possible(key):
        errors["plan_key"] = _KEY_RULE
    on_change = data.get("on_change", "expire")
    if on_change not in ON_CHANGE:
        errors["on_change"] = "must be expire (the old plan's unused credits end now) or keep (they last to their end)"
    refuse_if(errors)
    assert isinstance(key, str)
    before = await guard.subscription(org)
    try:
        subscription = await guard.subscribe(org, key, on_change=on_change)
    except PlanNotFound as exc:
        raise Refusal(plan_not_found(key, field="plan_key")) from exc
    if before is None:
        log.info("credit_guard admin: subscribed %s to plan %s", org, key)
    elif before.plan_key != key:
        old = "written off" if on_change == "expire" else "kept to their end"
        log.info("credit_guard admin: moved %s from plan %s to %s (old credits %s)", org, before.plan_key, key, old)
    status = 201 if before is None else 200
    return JSONResponse(await subscription_view(guard, subscription), status_code=status, headers=_PRIVATE)


async def delete_subscription(request: Request, guard: CreditGuard) -> Response:
    """End the organization's plan: no period is granted after. ``?on_change=keep`` (the
    default) lets the period under way keep its credits to its end; ``expire`` writes
    them off now."""
    org = path_organization(request)
    on_change = request.query_params.get("on_change", "keep")
    if on_change not in ON_CHANGE:
        refuse_if({"on_change": "must be keep (the credits last to their end) or expire (they end now)"})
    ended = await guard.unsubscribe(org, on_change=on_change)  # type: ignore[arg-type]  # checked above
    if ended is None:
        raise Refusal(no_subscription(org))
    old = "written off" if on_change == "expire" else "kept to their end"
    log.info("credit_guard admin: ended %s's plan %s (credits %s)", org, ended.plan_key, old)
    return Response(status_code=204, headers=_PRIVATE)


# -- views, checks and problems --------------------------------------------------------------


def plan_view(plan: Plan, subscribers: int) -> dict[str, Any]:
    return {**plan.to_dict(), "subscribers": subscribers}


async def subscription_view(guard: CreditGuard, subscription: Subscription) -> dict[str, Any]:
    plan = await guard.get_plan(subscription.plan_key)
    return {**subscription.to_dict(), "plan": None if plan is None else plan.to_dict()}


def validate_plan_fields(data: dict[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """The plan fields of a body, checked all at once (a 422 names every bad one), as
    ``define_plan`` keywords; ``partial`` for an edit (no key, nothing required)."""
    errors: dict[str, str] = {}
    allowed = _FIELDS[1:] if partial else _FIELDS
    for unknown in sorted(set(data) - set(allowed)):
        errors[unknown] = (
            "cannot be changed: it names the plan and its subscriptions (create a new plan instead)"
            if unknown == "plan_key"
            else "unknown field"
        )
    if not partial:
        for name in ("plan_key", "credits"):
            if data.get(name) is None:
                errors[name] = "is required"
    clean: dict[str, Any] = {}
    if "plan_key" in allowed and "plan_key" not in errors:
        key = data["plan_key"]
        if not isinstance(key, str):
            errors["plan_key"] = "must be a string"
        elif len(key) > FEATURE_KEY_MAX:
            errors["plan_key"] = f"must be at most {FEATURE_KEY_MAX} characters"
        elif not FEATURE_KEY_RE.fullmatch(key):
            errors["plan_key"] = _KEY_RULE
        else:
            clean["plan_key"] = key
    if "name" in data:
        name = data["name"]
        if name is None:
            clean["name"] = None
        elif not isinstance(name, str) or not name.strip():
            errors["name"] = "must be a non-empty string, or null for the key"
        elif len(name) > FEATURE_NAME_MAX:
            errors["name"] = f"must be at most {FEATURE_NAME_MAX} characters"
        elif not _LABEL.fullmatch(name) or not is_storable_text(name):
            errors["name"] = "must be one line of text: no control characters, NULs or unpaired surrogates"
        else:
            clean["name"] = name.strip()
    if "credits" in data and "credits" not in errors:
        clean_credits = whole_number(data["credits"], 1, "credits", errors)
        if clean_credits is not None:
            clean["credits"] = clean_credits
    if "period" in data:
        if data["period"] not in PERIOD_UNITS:
            errors["period"] = f"must be one of {', '.join(PERIOD_UNITS)}"
        else:
            clean["period"] = data["period"]
    if "rollover" in data:
        rollover = data["rollover"]
        if rollover is None:
            clean["rollover"] = None
        else:
            clean_rollover = whole_number(
                rollover, 0, "rollover", errors, null="; or null: every unused credit carries"
            )
            if clean_rollover is not None:
                clean["rollover"] = clean_rollover
    refuse_if(errors)
    return clean


def _possible(key: str) -> bool:
    return len(key) <= FEATURE_KEY_MAX and FEATURE_KEY_RE.fullmatch(key) is not None


def _path_plan_key(request: Request) -> str:
    return str(request.path_params["plan_key"])


async def _existing(request: Request, guard: CreditGuard) -> tuple[Plan, int]:
    """The plan the path names and its subscribers; 404 for a key that does not exist
    (or cannot: a malformed key is looked up nowhere)."""
    key = _path_plan_key(request)
    if _possible(key):
        for plan, count in await guard.store.list_plans():
            if plan.plan_key == key:
                return plan, count
    raise Refusal(plan_not_found(key))


def plan_not_found(key: str, *, field: str | None = None) -> problems.Problem:
    extra: dict[str, Any] = {"plan_key": key}
    if field is not None:
        extra["errors"] = {field: "no plan has this key"}
    return problems.Problem(404, TYPE_PLAN_NOT_FOUND, "Plan not found", f"No plan has the key {key!r:.80}.", extra)


def duplicate_plan(key: str) -> problems.Problem:
    return problems.Problem(
        409,
        TYPE_DUPLICATE_PLAN,
        "Duplicate plan",
        f"A plan with plan_key {key!r} already exists; nothing was changed (PATCH it to edit it).",
        extra={"errors": {"plan_key": "already exists"}, "plan_key": key},
    )


def no_subscription(org: str) -> problems.Problem:
    return problems.Problem(
        404,
        TYPE_NO_SUBSCRIPTION,
        "No subscription",
        f"Organization {org!r:.80} is on no plan.",
        {"organization_id": org},
    )


__all__ = [
    "PLANS_PATH",
    "create_plan",
    "delete_plan",
    "delete_subscription",
    "get_plan",
    "get_subscription",
    "list_plans",
    "put_subscription",
    "update_plan",
    "validate_plan_fields",
]
